"""The real kubelet v1.20.2 (one per module) against the real daemon: registration and allocation for two
resources, GetPreferredAllocation, PreStart success and failure, hotplug, health, SIGHUP, and streams the
kubelet loses.  Each scenario asserts what the pod's user sees: the container's own /dev (device numbers,
whether a node opens, the device cgroup refusing nodes it was not given), its env and mounts, its OCI
annotations, and the pod's admission status and message as the kubelet reports them.
"""

from __future__ import annotations

import os
import shlex
import signal

from tests.hotplug import realudev

from . import helpers as h
from . import node as nodelib

SHARE_MOUNT = "/mnt/udevdp"


def loop_probe(number: int) -> str:
    major, minor = realudev.devnode_numbers(number)
    return f"b:{major}:{minor}"


def test_two_resources_registered_and_allocated(node, start_daemon, loops, pods, share, say):
    for n in (150, 151, 152):
        loops.add(n)
    realudev.settle()
    mem = h.mem_section(extra=f"mounts = {share['dir']}:{SHARE_MOUNT}:ro")
    started = h.now()
    daemon = start_daemon(h.config(mem, h.loop_section()))
    lines = h.ready(node, {h.MEM: ["full", "null", "zero"], h.LOOP: ["loop150", "loop151", "loop152"]}, started,
                    daemon.log())
    for resource, line in lines.items():
        say(f"{resource}: Register seen {h.ms(line.time - started)} after the daemon started")

    probes = [loop_probe(n) for n in (150, 151, 152)] + ["c:1:1"]  # /dev/mem: never given
    pods.append("alloc")
    name = node.add_pod("alloc", {h.MEM: 2, h.LOOP: 1}, probes=probes, files=[f"{SHARE_MOUNT}/{share['file']}"])
    pod = node.wait_running(name)
    seen = node.report(name)

    mem_ids = seen.env["EXAMPLE_MEM_DEVICES"].split(",")
    loop_ids = seen.env["EXAMPLE_LOOP_DEVICES"].split(",")
    assert len(mem_ids) == 2 and set(mem_ids) <= {"full", "null", "zero"}, seen.env
    assert len(loop_ids) == 1 and loop_ids[0] in ("loop150", "loop151", "loop152"), seen.env
    # Our nodes, with the host's numbers, and they open; nothing else of ours is there.
    for dev in mem_ids:
        kind, major, minor = nodelib.host_numbers(f"/dev/{dev}")
        assert seen.devices.get(f"/dev/udevdp/{dev}") == (kind, major, minor, "opens"), seen.devices
    assert not {p for p in seen.devices if p.startswith("/dev/udevdp/")} - {f"/dev/udevdp/{d}" for d in mem_ids}
    loop_dev = f"/dev/{loop_ids[0]}"
    kind, major, minor = nodelib.host_numbers(loop_dev)
    assert seen.devices.get(loop_dev) == ("b", major, minor, "opens"), seen.devices
    assert [p for p in seen.devices if p.startswith("/dev/loop")] == [loop_dev], seen.devices
    # The device cgroup lets the container open the loop device it was given, and no other one.
    given = loop_probe(int(loop_ids[0][len("loop"):]))
    for probe in probes:
        assert seen.probes[probe] == ("opens" if probe == given else "denied"), seen.probes
    assert f"b {major}:{minor} rw" in seen.cgroup, seen.cgroup
    # The mount, read-only, with the host's file in it.
    assert SHARE_MOUNT in seen.mount_points(), seen.mounts
    assert seen.files[f"{SHARE_MOUNT}/{share['file']}"] == share["text"]
    ro = [m for m in seen.mounts if m.split()[4] == SHARE_MOUNT][0]
    assert "ro" in ro.split()[5].split(","), ro
    # The annotation reached the container's OCI spec; the checkpoint holds the same devices.
    notes = h.oci_annotations(node, nodelib.container_id(pod))
    assert notes.get("example.com/mem-devnodes") == ",".join(f"/dev/{d}" for d in mem_ids), notes
    assert node.allocated(h.uid(pod), h.MEM) == sorted(mem_ids)
    assert node.allocated(h.uid(pod), h.LOOP) == loop_ids
    say(f"pod got {h.MEM}={','.join(mem_ids)} and {h.LOOP}={loop_ids[0]}; /dev/udevdp and {loop_dev} as on the "
        f"host, other loop nodes refused by the device cgroup")


def test_preferred_allocation_is_what_the_pod_gets(node, start_daemon, loops, pods, say):
    for n in range(150, 155):
        loops.add(n)
    realudev.settle()
    started = h.now()
    start_daemon(h.config(h.loop_section()))
    h.ready(node, {h.LOOP: [f"loop{n}" for n in range(150, 155)]}, started)
    # Our preference is the natural order of the free IDs; the kubelet's own pick is a Go map's order.
    expected = [["loop150", "loop151"], ["loop152", "loop153"]]
    for i, want in enumerate(expected):
        pods.append(f"pref{i}")
        name = node.add_pod(f"pref{i}", {h.LOOP: 2})
        pod = node.wait_running(name)
        seen = node.report(name)
        got = seen.env["EXAMPLE_LOOP_DEVICES"].split(",")
        assert sorted(got) == want, f"the kubelet gave {got}, the daemon preferred {want}"
        assert sorted(p for p in seen.devices if p.startswith("/dev/loop")) == [f"/dev/{d}" for d in want]
        calls = node.kubelet.find(f"Issuing a GetPreferredAllocation call for container, c, of pod {h.uid(pod)}")
        assert calls, "the kubelet did not call GetPreferredAllocation"
        say(f"pod {i + 1} asked for 2, got {','.join(sorted(got))} (GetPreferredAllocation called)")


PRESTART = r"""
echo "$@" >> "$1/calls"
if [ -e "$1/refuse" ]; then echo "gate closed for $2 by the test" >&2; exit 3; fi
exit 0
"""


def test_prestart_success_and_failure(node, start_daemon, pods, tmp_path, say):
    state = tmp_path / "gate"
    state.mkdir()
    script = tmp_path / "prestart.sh"
    script.write_text(PRESTART)
    section = h.mem_section("null zero", f"prestart_command = /bin/sh {shlex.quote(str(script))} "
                                         f"{shlex.quote(str(state))}")
    started = h.now()
    start_daemon(h.config(section))
    h.ready(node, {h.MEM: ["null", "zero"]}, started)

    pods.append("gate-open")
    name = node.add_pod("gate-open", {h.MEM: 1})
    pod = node.wait_running(name)
    seen = node.report(name)
    dev = seen.env["EXAMPLE_MEM_DEVICES"]
    assert f"/dev/udevdp/{dev}" in seen.devices
    assert node.kubelet.find(f"Issuing an PreStartContainer call for container, c, of pod {h.uid(pod)}")
    assert (state / "calls").read_text().split() == [str(state), dev]
    say(f"PreStartContainer ran for {dev} before the container started")

    (state / "refuse").write_text("")
    pods.append("gate-closed")
    name = node.add_pod("gate-closed", {h.MEM: 1})
    pod = node.wait_pod(name, lambda p: nodelib.waiting(p)[0] == "CreateContainerConfigError",
                        "to report CreateContainerConfigError")
    reason, message = nodelib.waiting(pod)
    assert nodelib.phase(pod) == "Pending"
    assert h.MEM in message and "gate closed for" in message, message
    assert node.output(name) == [], "the container must not have started"
    say(f"refused start as the kubelet reports it: {reason}: {message}")


def test_hotplug_reaches_the_kubelet_and_its_pods(node, start_daemon, loops, pods, say):
    loops.add(150)
    realudev.settle()
    started = h.now()
    start_daemon(h.config(h.loop_section()))
    h.ready(node, {h.LOOP: ["loop150"]}, started)

    added = h.now()
    loops.add(151)
    h.healthy(node, h.LOOP, ["loop150", "loop151"])
    say(f"loop151 added: State pushed {h.ms(h.pushed(node, h.LOOP, added).time - added)} after LOOP_CTL_ADD")
    pods.append("both")
    name = node.add_pod("both", {h.LOOP: 2})
    node.wait_running(name)
    seen = node.report(name)
    for n in (150, 151):
        kind, major, minor = nodelib.host_numbers(f"/dev/loop{n}")
        assert seen.devices.get(f"/dev/loop{n}") == (kind, major, minor, "opens"), seen.devices
    node.delete_pods(["both"])

    removed = h.now()
    loops.remove(151)
    h.healthy(node, h.LOOP, ["loop150"])
    say(f"loop151 removed: State pushed {h.ms(h.pushed(node, h.LOOP, removed).time - removed)} after "
        f"LOOP_CTL_REMOVE")
    pods.append("two")
    refused = node.wait_failed(node.add_pod("two", {h.LOOP: 2}))
    assert h.LOOP in h.status_text(refused), h.status_text(refused)
    pods.append("one")
    name = node.add_pod("one", {h.LOOP: 1})
    node.wait_running(name)
    assert "/dev/loop150" in node.report(name).devices
    say(f"a pod asking for 2 is refused ({h.status_text(refused)}); one asking for 1 runs")


HEALTH = r"""
if [ -e "$1/sick" ]; then echo "marked sick by the test"; exit 1; fi
exit 0
"""


def test_unhealthy_device_refuses_pods_then_recovers(node, start_daemon, pods, tmp_path, say):
    state = tmp_path / "health"
    state.mkdir()
    script = tmp_path / "health.sh"
    script.write_text(HEALTH)
    section = h.mem_section("null", f"health_command = /bin/sh {shlex.quote(str(script))} {shlex.quote(str(state))}"
                                    "\nhealth_interval = 0.5\nhealth_timeout = 0.4")
    started = h.now()
    start_daemon(h.config(section))
    h.ready(node, {h.MEM: ["null"]}, started)
    pods.append("fit")
    node.wait_running(node.add_pod("fit", {h.MEM: 1}))
    node.delete_pods(["fit"])

    sick = h.now()
    (state / "sick").write_text("")
    h.healthy(node, h.MEM, [])
    say(f"null unhealthy: State pushed {h.ms(h.pushed(node, h.MEM, sick).time - sick)} after the check failed "
        "(health_interval 0.5 s)")
    pods.append("sick")
    refused = node.wait_failed(node.add_pod("sick", {h.MEM: 1}))
    assert h.MEM in h.status_text(refused)
    say(f"pod refused: {h.status_text(refused)}")

    well = h.now()
    (state / "sick").unlink()
    h.healthy(node, h.MEM, ["null"])
    say(f"null recovered: State pushed {h.ms(h.pushed(node, h.MEM, well).time - well)} after the check passed")
    pods.append("well")
    name = node.add_pod("well", {h.MEM: 1})
    node.wait_running(name)
    assert "/dev/udevdp/null" in node.report(name).devices


def test_sighup_adds_a_resource_without_touching_the_others(node, start_daemon, pods, say):
    started = h.now()
    daemon = start_daemon(h.config(h.mem_section("null zero")))
    h.ready(node, {h.MEM: ["null", "zero"]}, started)
    pods.append("before")
    name = node.add_pod("before", {h.MEM: 1})
    before = node.wait_running(name)
    mem_sockets = h.daemon_sockets(node, h.MEM)

    full = """
[resource example.com/full]
subsystem = mem
kernel = full
container_path = /dev/udevdp/{name}
"""
    config_path = daemon.cmd[daemon.cmd.index("--config") + 1]
    with open(config_path, "a") as f:
        f.write(full)
    hup = h.now()
    daemon.proc.send_signal(signal.SIGHUP)
    line = h.ready(node, {"example.com/full": ["full"]}, hup, daemon.log())["example.com/full"]
    say(f"SIGHUP: Register for example.com/full seen {h.ms(line.time - hup)} after the signal")
    # example.com/mem untouched: no new Register, its stream never ended, same socket, same devices.
    assert not node.kubelet.find(nodelib.registration_line(h.MEM), hup)
    assert not node.kubelet.find(nodelib.stream_ended_line(h.MEM), hup)
    assert h.daemon_sockets(node, h.MEM) == mem_sockets
    assert node.healthy_devices(h.MEM) == ["null", "zero"]
    after = node.pod(name)
    assert after is not None and nodelib.container_id(after) == nodelib.container_id(before)

    pods.append("full")
    name = node.add_pod("full", {"example.com/full": 1})
    node.wait_running(name)
    assert "/dev/udevdp/full" in node.report(name).devices
    pods.append("mem")
    name = node.add_pod("mem", {h.MEM: 1})
    node.wait_running(name)
    say("a pod of the new resource and one of the old both run")


def test_stream_the_kubelet_ends_is_recovered_by_a_new_registration(node, start_daemon, pods, say):
    """The kubelet loses its ListAndWatch stream while it keeps running and kubelet.sock stays the same.

    The kubelet's end of the connection is shut down under it: it logs "listAndWatch ended
    unexpectedly", marks every device unhealthy and never dials again (there is no reconnect in the
    device manager).  Only a new Register from the daemon brings the resource back.
    """
    started = h.now()
    daemon = start_daemon(h.config(h.mem_section("null zero")))
    h.ready(node, {h.MEM: ["null", "zero"]}, started)
    pods.append("held")
    held = node.wait_running(node.add_pod("held", {h.MEM: 1}))

    endpoint = h.current_endpoint(node, h.MEM)
    cut = h.now()
    assert node.cut_kubelet_connections(endpoint) >= 1, f"the kubelet holds no connection to {endpoint}"
    ended = h.stream_ended(node, h.MEM, cut)
    say(f"the kubelet ended the stream {h.ms(ended.time - cut)} after its connection was shut down")
    assert node.kubelet.first(f"Mark all resources Unhealthy for resource {h.MEM}", cut)

    line = h.registered(node, h.MEM, cut, daemon_log=daemon.log())
    h.pushed(node, h.MEM, line.time)
    say(f"the daemon registered again {h.ms(line.time - ended.time)} after the kubelet ended the stream")
    pods.append("after")
    name = node.add_pod("after", {h.MEM: 1})
    node.wait_running(name)
    assert nodelib.container_id(node.pod(held["metadata"]["name"]) or {}) == nodelib.container_id(held)


def test_socket_removed_under_the_daemon_is_served_and_registered_again(node, start_daemon, pods, say):
    started = h.now()
    daemon = start_daemon(h.config(h.mem_section("null zero")))
    h.ready(node, {h.MEM: ["null", "zero"]}, started)
    old = h.current_endpoint(node, h.MEM)
    removed = h.now()
    os.unlink(old)
    line = h.registered(node, h.MEM, removed, daemon_log=daemon.log())
    back = h.pushed(node, h.MEM, line.time)
    new = h.current_endpoint(node, h.MEM)
    assert new != old and os.path.exists(new)
    say(f"socket removed: Register on {os.path.basename(new)} seen {h.ms(line.time - removed)} later")
    # The daemon ends the old stream before it registers the new socket (the order kubelets 1.25-1.35
    # need, kubernetes#121994); kubelet 1.20 then marks the resource unhealthy until the new stream's
    # first message, since the old endpoint was still its current one.
    marked = node.kubelet.first(f"Mark all resources Unhealthy for resource {h.MEM}", removed)
    say("the kubelet " + (f"had the resource unhealthy for {h.ms(back.time - marked.time)} (old stream ended "
                          f"{h.ms(marked.time - removed)} after the removal)" if marked and marked.time <= back.time
                          else "kept the resource healthy throughout"))
    pods.append("after")
    node.wait_running(node.add_pod("after", {h.MEM: 1}))
