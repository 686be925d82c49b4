"""The real kubelet v1.20.2 restarting under the daemon, and the daemon stopping or dying under the kubelet:
running pods keep their devices, a new pod is admitted once the daemon has registered again, and the
pod's user sees the refusal in between.  One node per module; the kubelet is restarted only as often as
these scenarios need (each start takes about 6 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics

from udev_device_plugin.kubelet import kubelet_answers

from . import helpers as h
from . import node as nodelib

RESTARTS = 10
MEM_IDS = ["full", "null", "zero"]


def held_devices(node, full_name: str):
    """The /dev/udevdp nodes a running container sees now (``ctr tasks exec`` into it)."""
    out = node.exec(full_name, ["/bin/sh", "-c", "for f in /dev/udevdp/*; do echo \"$f $(stat -c '%t %T' $f)\"; "
                                                 "done"])
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith("/dev/udevdp/"))


def test_kubelet_restarts_keep_running_pods_and_admit_new_ones(node, start_daemon, pods, say):
    started = h.now()
    daemon = start_daemon(h.config(h.mem_section()))
    h.ready(node, {h.MEM: MEM_IDS}, started, daemon.log())
    pods.append("keep")
    keep = node.wait_running(node.add_pod("keep", {h.MEM: 1}))
    keep_name = keep["metadata"]["name"]
    keep_id = node.report(keep_name).env["EXAMPLE_MEM_DEVICES"]
    keep_container = nodelib.container_id(keep)
    assert held_devices(node, keep_name) == [f"/dev/udevdp/{keep_id}"]

    delays = []
    for i in range(1, RESTARTS + 1):
        kubelet = node.restart_kubelet()
        served = kubelet.served_at()
        assert served is not None
        line = h.registered(node, h.MEM, served, daemon_log=daemon.log())
        h.pushed(node, h.MEM, line.time)
        delays.append(line.time - served)
        # The running pod: same container, never restarted, its device still there and still its own.
        now_keep = node.wait_running(keep_name)
        assert nodelib.container_id(now_keep) == keep_container
        assert nodelib.container_status(now_keep).get("restartCount") == 0
        assert held_devices(node, keep_name) == [f"/dev/udevdp/{keep_id}"]
        assert node.allocated(h.uid(keep), h.MEM) == [keep_id]
        # A new pod is admitted and gets another device.
        pods.append(f"new{i}")
        name = node.add_pod(f"new{i}", {h.MEM: 1})
        node.wait_running(name)
        got = node.report(name).env["EXAMPLE_MEM_DEVICES"]
        assert got != keep_id and f"/dev/udevdp/{got}" in node.report(name).devices
        node.delete_pods([f"new{i}"])
        say(f"restart {i}: Register seen {h.ms(line.time - served)} after kubelet.sock was served "
            f"(kubelet up in {node.kubelet_start_seconds[-1]:.1f} s); pod new{i} admitted with {got}")
    say(f"{RESTARTS} restarts: Register after kubelet.sock served p50 {h.ms(statistics.median(delays))}, "
        f"max {h.ms(max(delays))}")
    assert daemon.proc.poll() is None, daemon.log()


def test_daemon_sigterm_and_sigkill(node, start_daemon, pods, say):
    started = h.now()
    daemon = start_daemon(h.config(h.mem_section()))
    h.ready(node, {h.MEM: MEM_IDS}, started, daemon.log())
    pods.append("running")
    running = node.wait_running(node.add_pod("running", {h.MEM: 1}))
    running_name = running["metadata"]["name"]
    running_id = node.report(running_name).env["EXAMPLE_MEM_DEVICES"]

    for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
        sockets = h.daemon_sockets(node, h.MEM)
        stopped = h.now()
        code = daemon.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.log()
        ended = h.stream_ended(node, h.MEM, stopped)
        left = [s for s in sockets if os.path.exists(s)]
        say(f"{sig.name}: the kubelet saw the stream end {h.ms(ended.time - stopped)} after the signal; "
            f"sockets left behind: {[os.path.basename(s) for s in left] or 'none'}")
        if sig == signal.SIGTERM:
            assert not left, f"SIGTERM must remove the daemon's sockets: {left}"
        # No plugin: the kubelet refuses a new pod, the running one keeps its device.
        pods.append(f"refused{round_}")
        refused = node.wait_failed(node.add_pod(f"refused{round_}", {h.MEM: 1}))
        assert h.MEM in h.status_text(refused), h.status_text(refused)
        assert held_devices(node, running_name) == [f"/dev/udevdp/{running_id}"]
        say(f"{sig.name}: new pod refused ({h.status_text(refused)}); the running pod keeps {running_id}")
        # A new daemon registers and the next pod runs.
        again = h.now()
        daemon = start_daemon(h.config(h.mem_section()))
        line = h.ready(node, {h.MEM: MEM_IDS}, again, daemon.log())[h.MEM]
        pods.append(f"admitted{round_}")
        node.wait_running(node.add_pod(f"admitted{round_}", {h.MEM: 1}))
        say(f"{sig.name}: a new daemon's Register seen {h.ms(line.time - again)} after it started; a new pod runs")


def test_daemon_started_before_the_kubelet(node, start_daemon, pods, say):
    node.stop_kubelet()
    stale = os.path.join(node.dp, "kubelet.sock")
    say(f"kubelet stopped (SIGTERM); kubelet.sock {'left behind' if os.path.exists(stale) else 'removed'}")
    daemon = start_daemon(h.config(h.mem_section()))
    nodelib.wait_for(lambda: h.daemon_sockets(node, h.MEM), 20, "the daemon to serve its socket")
    assert daemon.proc.poll() is None, daemon.log()
    kubelet = node.start_kubelet()
    served = kubelet.served_at()
    assert served is not None
    line = h.ready(node, {h.MEM: MEM_IDS}, served, daemon.log())[h.MEM]
    say(f"Register seen {h.ms(line.time - served)} after the kubelet served kubelet.sock "
        f"(kubelet up in {node.kubelet_start_seconds[-1]:.1f} s)")
    pods.append("first")
    name = node.add_pod("first", {h.MEM: 2})
    node.wait_running(name)
    assert len([p for p in node.report(name).devices if p.startswith("/dev/udevdp/")]) == 2


def test_a_stopped_kubelet_is_noticed_and_counts_again_once_it_runs(node, start_daemon, pods, say):
    """SIGSTOP, as a frozen cgroup or a paused VM leaves a kubelet: nothing is closed, nothing answers.
    The daemon's check on kubelet.sock notices it (the resource is stalled, not registered); after
    SIGCONT the same stream counts again at once, with no new registration, and the kubelet still
    admits a pod with our device.  The check itself leaves nothing in the kubelet's log."""
    started = h.now()
    daemon = start_daemon(h.config("kubelet_keepalive = 1\n", h.mem_section()))
    h.ready(node, {h.MEM: MEM_IDS}, started, daemon.log())
    endpoint = h.current_endpoint(node, h.MEM)
    assert node.kubelet is not None
    kubelet = node.kubelet
    before = h.cli_inspect(node)
    assert before["registered"] and before["registrations"] == 1, before
    logged = len(kubelet.lines())

    kubelet.process.send(signal.SIGSTOP)
    stopped = h.now()
    try:
        row = nodelib.wait_for(lambda: (lambda r: r if r["state"] == "stalled" else None)(h.cli_inspect(node)), 20,
                               "inspect to say stalled")
        noticed = h.now() - stopped
        assert row["registered"] is False and "has not answered on kubelet.sock" in row["last_error"], row
    finally:
        kubelet.process.send(signal.SIGCONT)
    resumed = h.now()
    row = nodelib.wait_for(lambda: (lambda r: r if r["registered"] else None)(h.cli_inspect(node)), 20,
                           "inspect to say registered again")
    back = h.now() - resumed
    say(f"SIGSTOP noticed after {noticed:.2f} s (kubelet_keepalive = 1); registered again {h.ms(back)} "
        "after SIGCONT (the time includes `inspect`'s own start)")
    assert row["registrations"] == 1 and row["streams_lost"] == 0, row
    assert h.current_endpoint(node, h.MEM) == endpoint
    assert not kubelet.find(nodelib.stream_ended_line(h.MEM), started)
    assert "ended the ListAndWatch stream" not in daemon.log()
    # Checks before, during and after the stop (one a second), and 50 more at once: the kubelet logged none.
    for _ in range(50):
        asyncio.run(asyncio.wait_for(kubelet_answers(os.path.join(node.dp, "kubelet.sock")), 10))
    nodelib.wait_for(lambda: h.now() - resumed > 3, 10, "three more checks")
    noise = [line.text for line in kubelet.lines()[logged:]
             if any(word in line.text for word in ("ServerTransport", "preface", "http2Server", "GOAWAY"))]
    assert not noise, noise
    pods.append("after-stop")
    name = node.add_pod("after-stop", {h.MEM: 1})
    node.wait_running(name)
    assert node.report(name).env["EXAMPLE_MEM_DEVICES"] in MEM_IDS
    assert daemon.proc.poll() is None, daemon.log()
