"""Registration through the real kubelet's plugin watcher (issue 12, item 3): kubelet v1.20.2 finds the
daemon's socket in <root-dir>/plugins_registry, asks GetInfo, dials it as the DevicePlugin endpoint, and
finds it again by itself after each of its restarts.  A pod is admitted with the device every time, and a
running pod keeps its own."""

from __future__ import annotations

import os

from . import helpers as h
from . import node as nodelib

RESTARTS = 3
MEM_IDS = ["full", "null", "zero"]


def registry_of(node) -> str:
    return os.path.join(node.kroot, "plugins_registry")


def watcher_config(node, how: str = "plugin-watcher") -> str:
    return h.config(f"registration = {how}\nplugins_registry_dir = {registry_of(node)}\n", h.mem_section())


def watcher_registered(node, resource: str, after: float, daemon_log: str) -> nodelib.LogLine:
    """The kubelet's plugin watcher registering ``resource`` (RegisterPlugin), at or after ``after``."""
    assert node.kubelet is not None
    kubelet = node.kubelet
    try:
        return h.wait_for(lambda: kubelet.first(f"Registering Plugin {resource} at endpoint", after),
                          h.REGISTER_TIMEOUT, f"kubelet run {kubelet.run} to register {resource} from plugins_registry")
    except nodelib.NodeError as exc:
        raise nodelib.NodeError(f"{exc}\ndaemon log:\n{h.tail(daemon_log)}") from None


def test_plugin_watcher_registration_survives_kubelet_restarts(node, start_daemon, pods, say):
    started = h.now()
    daemon = start_daemon(watcher_config(node))
    line = watcher_registered(node, h.MEM, started, daemon.log())
    h.pushed(node, h.MEM, line.time)
    h.healthy(node, h.MEM, MEM_IDS)
    sockets = [n for n in os.listdir(registry_of(node)) if n.startswith("udevdp-")]
    assert len(sockets) == 1 and sockets[0] in line.text, (sockets, line.text)
    assert h.daemon_sockets(node, h.MEM) == [], "nothing of ours in device-plugins: no Register on kubelet.sock"
    assert node.kubelet.first(nodelib.registration_line(h.MEM), started) is None
    say(f"plugin watcher: {h.MEM} registered {h.ms(line.time - started)} after the daemon started")

    pods.append("keep")
    keep = node.wait_running(node.add_pod("keep", {h.MEM: 1}))
    keep_name = keep["metadata"]["name"]
    keep_id = node.report(keep_name).env["EXAMPLE_MEM_DEVICES"]
    assert f"/dev/udevdp/{keep_id}" in node.report(keep_name).devices
    for i in range(1, RESTARTS + 1):
        kubelet = node.restart_kubelet()
        served = kubelet.served_at()
        assert served is not None
        line = watcher_registered(node, h.MEM, served, daemon.log())
        h.pushed(node, h.MEM, line.time)
        h.healthy(node, h.MEM, MEM_IDS)
        assert node.kubelet.first(nodelib.registration_line(h.MEM), served) is None
        now_keep = node.wait_running(keep_name)
        assert nodelib.container_id(now_keep) == nodelib.container_id(keep)
        assert node.allocated(h.uid(keep), h.MEM) == [keep_id]
        pods.append(f"w{i}")
        name = node.add_pod(f"w{i}", {h.MEM: 1})
        node.wait_running(name)
        got = node.report(name).env["EXAMPLE_MEM_DEVICES"]
        assert got != keep_id and f"/dev/udevdp/{got}" in node.report(name).devices
        node.delete_pods([f"w{i}"])
        say(f"restart {i}: the plugin watcher registered {h.MEM} {h.ms(line.time - served)} after kubelet.sock "
            f"was served; pod w{i} admitted with {got}")
    out = h.cli_inspect(node)
    assert out["registered"] and out["registered_via"] == "plugin-watcher", out
    assert "Traceback" not in daemon.log()
