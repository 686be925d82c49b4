"""A kubelet that hangs without closing its connections (stopped with SIGSTOP, as a frozen cgroup or a
paused VM would leave it): the daemon's keepalive pings ([plugin] kubelet_keepalive) notice it, the
resource no longer counts as registered, and it registers again once the kubelet answers.

The kubelet is the stand-in as a process of its own (tests/standin.py), so that it can be stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, Dict, Optional

import pytest

from ..conftest import wait_until
from .helpers import MEM, MEM_CONF, cli, wait_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = "[plugin]\nkubelet_keepalive = 1\nregister_timeout = 2\nregister_backoff_max = 2\n\n"


def registered(kubelet_dir: str) -> Optional[bool]:
    """Whether ``inspect`` reports MEM as registered (None: the daemon did not answer)."""
    report = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
    if report.returncode != 0:
        return None
    rows = {r["resource"]: r for r in json.loads(report.stdout)["resources"]}
    return bool(rows.get(MEM, {}).get("registered"))


def standin_view(state: str) -> Dict[str, Any]:
    try:
        with open(state) as f:
            return dict(json.load(f)["resources"].get(MEM, {}))
    except (OSError, ValueError):
        return {}


@pytest.fixture
def standin_process(kubelet_dir, tmp_path):
    state = str(tmp_path / "standin.json")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "standin.py"), "--kubelet-dir", kubelet_dir,
                             "--state-file", state], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(state), 20, "the stand-in kubelet's state file")
        yield proc, state
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def test_a_kubelet_that_hangs_is_noticed_and_registered_with_again(standin_process, start_daemon, kubelet_dir):
    proc, state = standin_process
    daemon = start_daemon(FAST + MEM_CONF)
    wait_until(lambda: standin_view(state).get("connected") and len(standin_view(state)["devices"]) == 3, 20,
               "the stand-in's stream")
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # A ping every second, unanswered for a second: the connection closes and the stream ends.
        wait_log(daemon, f"{MEM}: the kubelet ended the ListAndWatch stream", timeout=15)
        assert registered(kubelet_dir) is False
    finally:
        os.kill(proc.pid, signal.SIGCONT)

    # Answering again, the kubelet gets a fresh socket and a stream from it.
    wait_until(lambda: standin_view(state).get("connected") and standin_view(state)["endpoint"] != endpoint, 30,
               "a registration on a fresh socket once the kubelet answers")
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered again")
    assert len(standin_view(state)["devices"]) == 3


def test_with_the_default_keepalive_a_short_pause_is_not_a_hang(standin_process, start_daemon, kubelet_dir):
    """The same pause as above, 3 s, under the default (a ping every 30 s): nothing ends."""
    proc, state = standin_process
    daemon = start_daemon(MEM_CONF)
    wait_until(lambda: registered(kubelet_dir) is True, 20, "inspect: registered")
    endpoint = standin_view(state)["endpoint"]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(AssertionError):
            wait_log(daemon, "the kubelet ended the ListAndWatch stream", timeout=3)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert registered(kubelet_dir) is True
    assert standin_view(state)["endpoint"] == endpoint and standin_view(state)["connected"]
