"""A kubelet that hangs without closing its connections (stopped with SIGSTOP, as a frozen cgroup or a
paused VM would leave it): the daemon's check that the kubelet answers on kubelet.sock ([plugin]
kubelet_keepalive) notices it, the resource no longer counts as registered (STALLED, its stream kept),
and it counts as registered again the moment the kubelet answers, without registering again.

The kubelet is the stand-in as a process of its own (tests/standin.py), so that it can be stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import pytest

from udev_device_plugin.config import KUBELET_SOCKET

from ..conftest import wait_until
from .helpers import MEM, MEM_CONF, cli, rewrite_config, wait_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = "[plugin]\nkubelet_keepalive = 1\nregister_timeout = 2\nregister_backoff_max = 2\n\n"


def status(kubelet_dir: str) -> Dict[str, Any]:
    """``inspect``'s row for MEM (empty: the daemon did not answer)."""
    report = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
    if report.returncode != 0:
        return {}
    rows = {r["resource"]: r for r in json.loads(report.stdout)["resources"]}
    return dict(rows.get(MEM, {}))


def registered(kubelet_dir: str) -> Optional[bool]:
    """Whether ``inspect`` reports MEM as registered (None: the daemon did not answer)."""
    row = status(kubelet_dir)
    return bool(row.get("registered")) if row else None


def connections(path: str) -> int:
    """Connections to the socket at ``path`` the kernel lists (/proc/net/unix): accepted (St 03), and
    waiting in its backlog (St 02), which is where they wait while the stand-in is stopped."""
    with open("/proc/net/unix") as f:
        rows = [line.split(None, 7) for line in f]
    return sum(1 for r in rows[1:] if len(r) == 8 and r[5] in ("02", "03") and r[7].rstrip("\n") == path)


def standin_view(state: str) -> Dict[str, Any]:
    try:
        with open(state) as f:
            return dict(json.load(f)["resources"].get(MEM, {}))
    except (OSError, ValueError):
        return {}


def start_standin(kubelet_dir: str, state: str) -> subprocess.Popen:
    if os.path.exists(state):
        os.unlink(state)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "standin.py"), "--kubelet-dir", kubelet_dir,
                             "--state-file", state], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: os.path.exists(state), 20, "the stand-in kubelet's state file")
    return proc


def stop_standin(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
    proc.wait(10)


@pytest.fixture
def standin_process(kubelet_dir, tmp_path):
    state = str(tmp_path / "standin.json")
    procs = [start_standin(kubelet_dir, state)]
    try:
        yield procs, state
    finally:
        for proc in procs:
            stop_standin(proc)


SILENT = f"the kubelet has not answered on {KUBELET_SOCKET}"


def test_a_kubelet_that_hangs_is_noticed_and_counts_again_once_it_answers(standin_process, start_daemon,
                                                                           kubelet_dir):
    (proc,), state = standin_process
    daemon = start_daemon(FAST + MEM_CONF)
    wait_until(lambda: standin_view(state).get("connected") and len(standin_view(state)["devices"]) == 3, 20,
               "the stand-in's stream")
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]
    kubelet_sock = os.path.join(kubelet_dir, KUBELET_SOCKET)

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # A check every second, unanswered for a second.
        wait_log(daemon, SILENT, timeout=15)
        row = status(kubelet_dir)
        assert row["registered"] is False and row["state"] == "stalled", row
        assert "once the kubelet answers" in row["last_error"]
        # Stopped for several more intervals: still one check waiting, not one per interval.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert connections(kubelet_sock) <= 1
            time.sleep(0.2)
        assert connections(kubelet_sock) == 1
        assert daemon.log().count(SILENT) == 1
        # The path unit's SIGUSR1 meanwhile: said as it is, not "nothing to do", and no new Register.
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_log(daemon, f"{MEM}: registered, but the kubelet does not answer on {KUBELET_SOCKET}; not registering "
                         "again", timeout=10)
        assert "nothing to do" not in daemon.log()
        assert status(kubelet_dir)["state"] == "stalled"
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    # Answering again: the same stream on the same socket, no new registration.
    wait_log(daemon, f"the kubelet answers on {KUBELET_SOCKET} again", timeout=10)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered again")
    view = standin_view(state)
    assert view["endpoint"] == endpoint and view["connected"] and len(view["devices"]) == 3
    assert status(kubelet_dir)["registrations"] == 1
    assert "ended the ListAndWatch stream" not in daemon.log()
    # The check's connections are closed, also on the stand-in's side.
    wait_until(lambda: connections(kubelet_sock) == 0, 10, "no connection to kubelet.sock left")


def test_a_kubelet_killed_while_it_hangs_is_registered_with_once_it_is_back(standin_process, start_daemon,
                                                                              kubelet_dir):
    """STALLED, then the stopped kubelet is killed: its stream ends, and the next kubelet gets us."""
    procs, state = standin_process
    daemon = start_daemon(FAST + MEM_CONF)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]
    os.kill(procs[0].pid, signal.SIGSTOP)
    wait_log(daemon, SILENT, timeout=15)
    assert status(kubelet_dir)["state"] == "stalled"
    procs[0].kill()
    procs[0].wait(10)
    wait_log(daemon, f"{MEM}: the kubelet ended the ListAndWatch stream", timeout=10)
    procs.append(start_standin(kubelet_dir, state))
    wait_until(lambda: standin_view(state).get("connected") and len(standin_view(state).get("devices", [])) == 3
               and standin_view(state)["endpoint"] != endpoint, 30, "a registration with the new kubelet")
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered with the new kubelet")


def test_with_the_default_keepalive_a_short_pause_is_not_a_hang(standin_process, start_daemon, kubelet_dir):
    """A 3 s pause under the default (a check every 30 s): nothing is noticed, nothing ends."""
    (proc,), state = standin_process
    daemon = start_daemon(MEM_CONF)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(AssertionError):
            wait_log(daemon, SILENT, timeout=3)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert registered(kubelet_dir) is True
    assert standin_view(state)["endpoint"] == endpoint and standin_view(state)["connected"]
    assert "ended the ListAndWatch stream" not in daemon.log()


def test_a_reload_that_shortens_the_interval_applies_it_without_registering_again(standin_process, start_daemon,
                                                                                   kubelet_dir):
    """kubelet_keepalive is no part of a registration: a reload changes the checks, nothing else."""
    (proc,), state = standin_process
    daemon = start_daemon(MEM_CONF)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]
    rewrite_config(daemon, "[plugin]\nkubelet_keepalive = 1\n\n" + MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "kubelet_keepalive changed: checking that the kubelet answers every 1 s")
    assert "serving every resource again" not in daemon.log()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_log(daemon, SILENT, timeout=15)  # at the default, the first check would be 30 s away
        assert status(kubelet_dir)["state"] == "stalled"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered again")
    row = status(kubelet_dir)
    assert row["registrations"] == 1 and standin_view(state)["endpoint"] == endpoint, row
