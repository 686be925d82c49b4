"""CDI end to end: the real daemon writes a spec per resource into cdi_spec_dir before the kubelet hears of a
device, answers Allocate with cdi_devices (and no device nodes with cdi_only), follows reloads, removes the
spec when the resource or the daemon goes, and an unwritable directory is refused by check-config and, at
run time, logged while the daemon serves on and retries."""

from __future__ import annotations

import json
import os
import signal
import time

import grpc

from udev_device_plugin import api

from ..conftest import wait_until
from ..unit import cdirules
from .helpers import EXIT_CONFIG, MEM, MEM_CONF, cli, rewrite_config, rpc_error, wait_log
from .test_allocate import specs

SPEC_NAME = "udev-device-plugin-example.com_mem.json"


def conf(cdi_dir: str, extra: str = "") -> str:
    return f"[plugin]\ncdi_spec_dir = {cdi_dir}\n\n" + MEM_CONF + "cdi = yes\n" + extra


def spec(path: str) -> dict:
    with open(path, "rb") as f:
        text = f.read()
    assert cdirules.problems(text) == [], text
    return json.loads(text)


def names(path: str) -> list:
    return [d["name"] for d in spec(path)["devices"]]


def test_spec_written_before_registration_and_allocate_names_cdi_devices(kubelet, start_daemon, tmp_path):
    cdi_dir = tmp_path / "cdi"
    path = str(cdi_dir / SPEC_NAME)
    seen_at_first_list = []

    def on_first_list() -> bool:
        if kubelet.messages.get(MEM):
            seen_at_first_list.append(os.path.exists(path))
            return True
        return False

    daemon = start_daemon(conf(str(cdi_dir), "container_path = /dev/udp/{id}\nextra_devnodes = /dev/urandom\n"
                                             "env =\n    FIXED=yes\n    IDS={ids}\n"))
    assert kubelet.wait_for(on_first_list, 20)
    assert seen_at_first_list == [True]
    kubelet.wait_live(MEM, devices=3)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    got = spec(path)
    assert got["kind"] == MEM and got["cdiVersion"] == "0.5.0"
    assert names(path) == ["full", "null", "zero"]
    assert got["devices"][1]["containerEdits"] == {
        "deviceNodes": [{"path": "/dev/udp/null", "hostPath": "/dev/null", "permissions": "rw"}]}
    assert got["containerEdits"] == {"env": ["FIXED=yes"], "deviceNodes": [
        {"path": "/dev/urandom", "hostPath": "/dev/urandom", "permissions": "rw"}]}

    [r] = kubelet.allocate(MEM, ["zero", "null"]).container_responses
    assert [c.name for c in r.cdi_devices] == [f"{MEM}=zero", f"{MEM}=null"]
    # The device nodes too, for runtimes without CDI, and every template.
    assert specs(r) == [("/dev/zero", "/dev/udp/zero", "rw"), ("/dev/null", "/dev/udp/null", "rw"),
                        ("/dev/urandom", "/dev/urandom", "rw")]
    assert dict(r.envs) == {"FIXED": "yes", "IDS": "zero,null"}

    # inspect says where the spec is and names the CDI devices.
    row = json.loads(cli("inspect", "--kubelet-dir", kubelet.directory, "--json").stdout)["resources"][0]
    assert (row["cdi_kind"], row["cdi_spec"], row["cdi_error"]) == (MEM, path, "")
    assert {d["id"]: d["cdi_devices"] for d in row["devices"]} == {i: [f"{MEM}={i}"] for i in ("full", "null", "zero")}
    assert f"CDI kind {MEM}, spec {path}" in cli("inspect", "--kubelet-dir", kubelet.directory).stdout

    assert daemon.stop() == 0
    assert os.listdir(cdi_dir) == []  # removed on stop


def test_cdi_only_with_replicas(kubelet, start_daemon, tmp_path):
    path = str(tmp_path / "cdi" / SPEC_NAME)
    start_daemon(conf(str(tmp_path / "cdi"), "cdi_only = yes\nreplicas = 3\ncdi_kind = example.org/memory\n"))
    kubelet.wait_live(MEM, devices=9)
    assert spec(path)["kind"] == "example.org/memory"
    assert names(path) == [f"{d}::{k}" for d in ("full", "null", "zero") for k in range(3)]
    [r] = kubelet.allocate(MEM, ["null::2", "null::0", "full::1"]).container_responses
    assert [c.name for c in r.cdi_devices] == ["example.org/memory=null::2", "example.org/memory=full::1"]
    assert not r.devices


def test_the_spec_follows_reloads_and_goes_with_the_resource(kubelet, start_daemon, tmp_path):
    cdi_dir = tmp_path / "cdi"
    path = str(cdi_dir / SPEC_NAME)
    daemon = start_daemon(conf(str(cdi_dir)))
    kubelet.wait_live(MEM, devices=3)
    inode = os.stat(path).st_ino

    # A reload that changes nothing in the spec does not touch it (a health rule: not in the spec).
    rewrite_config(daemon, conf(str(cdi_dir), "health.attribute.dev = 1:3\n"))
    os.kill(daemon.pid, signal.SIGHUP)
    assert kubelet.wait_for(lambda: kubelet.allocatable(MEM) == 1, 10)
    assert os.stat(path).st_ino == inode and names(path) == ["full", "null", "zero"]

    # Fewer devices, another kind: rewritten.
    rewrite_config(daemon, conf(str(cdi_dir), "cdi_kind = example.org/mem\n").replace("null zero full", "null"))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: os.path.exists(path) and spec(path)["kind"] == "example.org/mem", 10, "the spec rewritten")
    assert names(path) == ["null"]
    assert kubelet.wait_for(lambda: list(kubelet.health(MEM)) == ["null"], 10)
    assert [c.name for c in kubelet.allocate(MEM, ["null"]).container_responses[0].cdi_devices] == [
        "example.org/mem=null"]

    # Another directory: the spec moves.
    rewrite_config(daemon, conf(str(tmp_path / "other")))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: os.path.exists(tmp_path / "other" / SPEC_NAME), 10, "the spec in the new directory")
    assert not os.path.exists(path)

    # CDI off: the spec goes, Allocate names no CDI device.
    rewrite_config(daemon, MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "configuration reloaded", count=4)
    assert os.listdir(tmp_path / "other") == []
    assert not kubelet.allocate(MEM, ["null"]).container_responses[0].cdi_devices

    # On again, then the resource removed from the configuration: the spec goes with it.
    rewrite_config(daemon, conf(str(cdi_dir)))
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: os.path.exists(path), 10, "the spec back")
    rewrite_config(daemon, f"[plugin]\ncdi_spec_dir = {cdi_dir}\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "configuration reloaded: 0 resource(s)")
    assert os.listdir(cdi_dir) == []


def test_an_unwritable_directory_is_logged_and_retried_while_serving(kubelet, start_daemon, tmp_path):
    blocker = tmp_path / "cdi"
    blocker.write_text("a file where the directory should be")
    daemon = start_daemon(conf(str(blocker)) + "\n[resource example.com/only]\nsubsystem = mem\nkernel = zero\n"
                          "cdi = yes\ncdi_only = yes\n")
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live("example.com/only", devices=1)
    wait_log(daemon, "[plugin] cdi_spec_dir")
    log = daemon.log()
    assert f"{MEM}: cannot write the CDI spec {blocker}/{SPEC_NAME}: {blocker} is not a directory" in log
    assert "Traceback" not in log
    # cdi = yes: served by the device nodes meanwhile; cdi_only: refused, saying why.
    [r] = kubelet.allocate(MEM, ["zero"]).container_responses
    assert not r.cdi_devices and specs(r) == [("/dev/zero", "/dev/zero", "rw")]
    code, details = rpc_error(kubelet.allocate, "example.com/only", ["zero"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "cdi_only" in details and "cdi_spec_dir" in details
    row = {r["resource"]: r for r in json.loads(cli("inspect", "--kubelet-dir", kubelet.directory,
                                                    "--json").stdout)["resources"]}[MEM]
    assert "is not a directory" in row["cdi_error"]

    # The admin fixes it: the next retry writes both specs, and Allocate names the CDI devices.
    blocker.unlink()
    wait_until(lambda: os.path.exists(blocker / SPEC_NAME) and os.path.exists(blocker / "udev-device-plugin-"
                                                                              "example.com_only.json"),
               15, "the retried specs")
    wait_until(lambda: bool(kubelet.allocate(MEM, ["zero"]).container_responses[0].cdi_devices), 5,
               "Allocate to name the CDI device")
    [r] = kubelet.allocate("example.com/only", ["zero"]).container_responses
    assert [c.name for c in r.cdi_devices] == ["example.com/only=zero"] and not r.devices
    wait_log(daemon, "written at last")
    assert daemon.proc.poll() is None


def test_check_config_refuses_an_unwritable_directory(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "udev-device-plugin.conf"
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path)
    for directory, why in ((tmp_path / "file", "is not a directory"), (tmp_path / "link", "symbolic link"),
                           (tmp_path / "file" / "cdi", "is a file")):
        path.write_text(conf(str(directory)))
        done = cli("check-config", "--config", str(path))
        assert done.returncode == EXIT_CONFIG, done.stdout
        assert done.stderr.startswith(f"{path}: [plugin] cdi_spec_dir = '{directory}': ") and why in done.stderr
    # Without a resource that uses CDI, the directory does not matter.
    path.write_text(f"[plugin]\ncdi_spec_dir = {tmp_path / 'file'}\n" + MEM_CONF)
    assert cli("check-config", "--config", str(path)).returncode == 0
    path.write_text(conf(str(tmp_path / "new" / "cdi")))
    assert cli("check-config", "--config", str(path)).returncode == 0


def test_a_spec_left_by_a_killed_daemon_is_replaced_and_strays_removed(kubelet, start_daemon, tmp_path):
    cdi_dir = tmp_path / "cdi"
    daemon = start_daemon(conf(str(cdi_dir)) + "\n[resource example.com/zero]\nsubsystem = mem\nkernel = zero\n"
                          "cdi = yes\n")
    kubelet.wait_live(MEM, devices=3)
    zero = cdi_dir / "udev-device-plugin-example.com_zero.json"
    wait_until(zero.exists, 10, "the second spec")
    daemon.proc.kill()
    daemon.proc.wait()
    assert sorted(os.listdir(cdi_dir)) == [SPEC_NAME, zero.name]  # left behind
    (cdi_dir / "nvidia.com-gpu.json").write_text("{}")  # not ours: never touched

    # Started again without example.com/zero: its stale spec goes, ours is rewritten, the foreign one stays.
    before = time.time()
    again = start_daemon(conf(str(cdi_dir)))
    kubelet.wait_live(MEM, count=2, devices=3)
    assert sorted(os.listdir(cdi_dir)) == ["nvidia.com-gpu.json", SPEC_NAME]
    assert os.stat(cdi_dir / SPEC_NAME).st_mtime >= before - 1
    assert "left by an earlier run" in again.log()
    assert names(str(cdi_dir / SPEC_NAME)) == ["full", "null", "zero"]
    kubelet_stub = kubelet.client(MEM).stub
    assert kubelet_stub.Allocate(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(
        devices_ids=["full"])]), timeout=10).container_responses[0].cdi_devices[0].name == f"{MEM}=full"
