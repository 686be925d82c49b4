"""Registration through the kubelet's plugin watcher (issue 12, item 3): the daemon serves each resource on
a socket in plugins_registry that answers GetInfo and the DevicePlugin API; the stand-in kubelet's plugin
watcher (as pkg/kubelet/pluginmanager does) finds it, registers it, tells NotifyRegistrationStatus."""

from __future__ import annotations

import json
import os
import signal
from typing import Iterator

import pytest

from tests.standin import BEHAVIOURS

from ..conftest import wait_until
from .helpers import MEM, MEM_CONF, RecordingKubelet, cli, our_sockets, wait_log


@pytest.fixture
def registry(tmp_path) -> str:
    path = tmp_path / "pr"
    path.mkdir()
    return str(path)


@pytest.fixture
def watching(kubelet_dir, registry, kubelet_behaviour) -> Iterator[RecordingKubelet]:
    k = RecordingKubelet(kubelet_dir, behaviour=kubelet_behaviour)
    k.plugins_registry = registry
    k.start()
    try:
        yield k
    finally:
        k.stop()


def watcher_conf(registry: str, how: str = "plugin-watcher", extra: str = "") -> str:
    return f"[plugin]\nregistration = {how}\nplugins_registry_dir = {registry}\n{extra}" + MEM_CONF


def inspect(kubelet_dir: str, registry: str) -> dict:
    out = cli("inspect", "--kubelet-dir", kubelet_dir, "--plugins-registry-dir", registry, "--json")
    assert out.returncode == 0, out.stderr
    return {r["resource"]: r for r in json.loads(out.stdout)["resources"]}


@pytest.mark.parametrize("kubelet_behaviour", BEHAVIOURS)
def test_registered_through_the_plugin_watcher_and_again_after_kubelet_restarts(watching, start_daemon,
                                                                                 kubelet_dir, registry):
    daemon = start_daemon(watcher_conf(registry))
    watching.wait_live(MEM, devices=3)
    [first] = our_sockets(registry)
    assert watching.endpoints(MEM) == [os.path.join(registry, first)]
    assert our_sockets(kubelet_dir) == [], "nothing of ours in the kubelet's socket directory"
    row = inspect(kubelet_dir, registry)[MEM]
    assert row["registered"] and row["registered_via"] == "plugin-watcher"
    assert "through the plugin watcher" in cli("inspect", "--kubelet-dir", kubelet_dir, "--plugins-registry-dir",
                                               registry).stdout
    assert watching.allocate(MEM, ["null"]).container_responses[0].devices[0].host_path == "/dev/null"
    for n in range(2, 6):
        watching.restart()
        watching.wait_live(MEM, count=n, devices=3, timeout=20)
        assert watching.allocatable(MEM) == 3
    wait_until(lambda: len(our_sockets(registry)) == 1, what="one socket of ours in plugins_registry")
    assert os.path.join(registry, our_sockets(registry)[0]) == watching.client(MEM).endpoint
    assert "Traceback" not in daemon.log()


def test_a_socket_removed_from_plugins_registry_is_served_again(watching, start_daemon, registry):
    start_daemon(watcher_conf(registry))
    watching.wait_live(MEM, devices=3)
    [first] = our_sockets(registry)
    os.unlink(os.path.join(registry, first))  # the watcher deregisters the resource
    watching.wait_live(MEM, count=2, devices=3)
    [second] = our_sockets(registry)
    assert second != first


def test_a_registration_the_watcher_reports_failed_is_offered_again(watching, start_daemon, registry):
    watching.refuse = 1
    daemon = start_daemon(watcher_conf(registry))
    watching.wait_live(MEM, devices=3)
    wait_log(daemon, "the kubelet's plugin watcher could not register")
    assert any(e["error"] for e in watching.watcher_events) and len(watching.requests) == 2


def test_a_stream_the_kubelet_ends_is_registered_again_through_the_watcher(watching, start_daemon, registry):
    daemon = start_daemon(watcher_conf(registry))
    watching.wait_live(MEM, devices=3)
    watching.drop(MEM)
    watching.wait_live(MEM, count=2, devices=3)
    wait_log(daemon, "the kubelet ended the ListAndWatch stream")
    assert len(our_sockets(registry)) == 1


def test_sigusr1_and_kubelet_sock_changes_leave_a_watcher_registration_alone(watching, start_daemon, registry):
    daemon = start_daemon(watcher_conf(registry))
    watching.wait_live(MEM, devices=3)
    watching.touch_socket(mode=0o600)
    os.kill(daemon.pid, signal.SIGUSR1)
    wait_log(daemon, "nothing to do")
    assert len(watching.endpoints(MEM)) == 1 and watching.connected(MEM)


def test_both_registers_through_the_watcher_when_there_is_one(watching, start_daemon, kubelet_dir, registry):
    start_daemon(watcher_conf(registry, "both"))
    watching.wait_live(MEM, devices=3)
    assert inspect(kubelet_dir, registry)[MEM]["registered_via"] == "plugin-watcher"
    assert our_sockets(kubelet_dir) == []


def test_both_falls_back_to_kubelet_sock_without_a_plugin_watcher(kubelet, start_daemon, kubelet_dir, registry):
    """A kubelet that never looks at plugins_registry: after 3 x register_timeout, kubelet.sock."""
    daemon = start_daemon(watcher_conf(registry, "both", "register_timeout = 1\n"))
    kubelet.wait_live(MEM, devices=3, timeout=20)
    wait_log(daemon, "did not take our socket within 3 s; registering through kubelet.sock instead")
    assert inspect(kubelet_dir, registry)[MEM]["registered_via"] == "kubelet-socket"
    assert our_sockets(registry) == [] and len(our_sockets(kubelet_dir)) == 1


def test_watcher_only_with_plugins_registry_replaced_by_a_file_waits(tmp_path, start_daemon, kubelet_dir):
    registry = str(tmp_path / "pr")
    with open(registry, "w") as f:
        f.write("not a directory")
    daemon = start_daemon(watcher_conf(registry))
    wait_log(daemon, "plugins_registry directory: ")
    assert daemon.proc.poll() is None and "Traceback" not in daemon.log()
