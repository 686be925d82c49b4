"""The daemon's CDI specs fed to a real consumer: Debian's podman 4.3 runs containers with the CDI devices
the Allocate answer names (``--device KIND=ID``), and the container sees the nodes, with the spec's shared
nodes and environment; hotplugged loop devices become usable that way as they appear, and go.  Also what
needs root to arrange: a cdi_spec_dir on a read-only file system, refused by check-config and logged by
the daemon, which serves on."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import wait_until
from tests.e2e.helpers import EXIT_CONFIG, cli, wait_log

from ..unit import cdirules


def node_numbers(path: str) -> str:
    """``major:minor`` in hex, as busybox ``stat -c %t:%T`` prints them."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev):x}:{os.minor(rdev):x}"


def spec_path(resource: str) -> str:
    return os.path.join("/var/run/cdi", f"udev-device-plugin-{resource.replace('/', '_')}.json")


def test_podman_runs_containers_with_the_allocated_cdi_devices(system_cdi_dir, cdi_vendor, podman, kubelet,
                                                                start_daemon, tmp_path):
    mem = f"{cdi_vendor}/mem"
    share = tmp_path / "share"
    share.mkdir()
    (share / "note").write_text("from the host\n")
    daemon = start_daemon(f"[plugin]\ncdi_spec_dir = {system_cdi_dir}\n\n[resource {mem}]\nsubsystem = mem\n"
                          "kernel = null zero full\nreplicas = 2\ncontainer_path = /dev/udp/{id}\n"
                          "extra_devnodes = /dev/urandom\nenv =\n    UDP_FIXED=yes\n    UDP_IDS={ids}\n"
                          f"mounts = {share}:/udp/share:ro\ncdi = yes\n")
    assert kubelet.wait_for(lambda: len(kubelet.devices.get(mem, {})) == 6, 20), kubelet.devices
    with open(spec_path(mem), "rb") as f:
        assert cdirules.problems(f.read()) == []

    # The kubelet's Allocate answer names the CDI devices; the runtime is handed exactly those.
    [answer] = kubelet.allocate(mem, ["zero::1", "full::0", "zero::0"]).container_responses
    names = [c.name for c in answer.cdi_devices]
    assert names == [f"{mem}=zero::1", f"{mem}=full::0"]
    done = podman.run(names, 'stat -c "%n %t:%T" /dev/udp/zero /dev/udp/full /dev/urandom; '
                             "head -c 5 /dev/udp/zero | wc -c; echo \"fixed=$UDP_FIXED ids=${UDP_IDS:-none}\"; "
                             "test -e /dev/udp/null && echo null-too || echo no-null; cat /udp/share/note; "
                             "echo x > /udp/share/new 2>/dev/null && echo writable || echo read-only")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"/dev/udp/zero {node_numbers('/dev/zero')}", f"/dev/udp/full {node_numbers('/dev/full')}",
        f"/dev/urandom {node_numbers('/dev/urandom')}", "5",
        # The spec carries the fixed entries; {ids} is the allocation's, in the Allocate answer only.
        "fixed=yes ids=none", "no-null", "from the host", "read-only"]
    assert dict(answer.envs) == {"UDP_FIXED": "yes", "UDP_IDS": "zero,full"}

    # Any replica resolves; without a CDI device nothing of ours is there; an unknown one is refused.
    assert podman.run([f"{mem}=null::1"], "stat -c %t:%T /dev/udp/null").stdout.strip() == node_numbers("/dev/null")
    assert podman.run([], "test ! -e /dev/udp && echo absent").stdout.strip() == "absent"
    refused = podman.run([f"{mem}=null::2"], "true")
    assert refused.returncode != 0 and f"{mem}=null::2" in refused.stderr, refused.stderr

    # Stopped: the spec goes, and with it the CDI devices.
    assert daemon.stop() == 0 and not os.path.exists(spec_path(mem))
    gone = podman.run([f"{mem}=zero::1"], "true")
    assert gone.returncode != 0 and "unresolvable CDI devices" in gone.stderr, gone.stderr


def test_podman_follows_hotplug(system_cdi_dir, cdi_vendor, podman, loops, kubelet, start_daemon):
    loop = f"{cdi_vendor}/loop"
    start_daemon(f"[plugin]\ncdi_spec_dir = {system_cdi_dir}\n\n[resource {loop}]\nsubsystem = block\n"
                 "kernel = loop1[0-9][0-9]\ndevtype = disk\ncdi = yes\ncdi_only = yes\n")
    assert kubelet.wait_for(lambda: loop in kubelet.devices, 20)
    loops.add(150)
    assert kubelet.wait_for(lambda: "loop150" in kubelet.devices.get(loop, {}), 10)
    [answer] = kubelet.allocate(loop, ["loop150"]).container_responses
    assert [c.name for c in answer.cdi_devices] == [f"{loop}=loop150"] and not answer.devices
    done = podman.run([f"{loop}=loop150"], "stat -c %t:%T /dev/loop150")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == node_numbers("/dev/loop150")

    loops.remove(150)
    assert kubelet.wait_for(lambda: "loop150" not in kubelet.devices.get(loop, {}), 10)
    wait_until(lambda: not os.path.exists(spec_path(loop)), 10, "the spec gone with the last device")
    gone = podman.run([f"{loop}=loop150"], "true")
    assert gone.returncode != 0 and "unresolvable CDI devices" in gone.stderr, gone.stderr


def test_a_read_only_cdi_spec_dir(kubelet, start_daemon, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "udp-cdi-ro", str(ro)], check=True)
    try:
        conf = f"[plugin]\ncdi_spec_dir = {ro}/cdi\n\n[resource example.com/mem]\nsubsystem = mem\ncdi = yes\n"
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "udev-device-plugin.conf").write_text(conf)
        done = cli("check-config", "--config", str(etc / "udev-device-plugin.conf"))
        assert done.returncode == EXIT_CONFIG
        assert f"[plugin] cdi_spec_dir = '{ro}/cdi': {ro}/cdi does not exist, and {ro} is on a read-only file " \
               "system to create it in" in done.stderr, done.stderr

        daemon = start_daemon(conf)
        assert kubelet.wait_for(lambda: len(kubelet.devices.get("example.com/mem", {})) > 3, 20)
        wait_log(daemon, "[plugin] cdi_spec_dir")
        assert "read-only file system" in daemon.log() and "Traceback" not in daemon.log()
        [answer] = kubelet.allocate("example.com/mem", ["null"]).container_responses
        assert not answer.cdi_devices and answer.devices[0].host_path == "/dev/null"
        assert daemon.stop() == 0
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert sys.executable  # the daemon ran under this interpreter's package
