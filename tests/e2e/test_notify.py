"""sd_notify as systemd sees it: READY, STATUS, RELOADING, STOPPING and WATCHDOG, all from the main PID.

The listening socket has SO_PASSCRED, so each datagram carries its sender's PID as the kernel saw it:
the process (thread group), which is what systemd compares with MainPID under NotifyAccess=main.
"""

from __future__ import annotations

import os
import signal
import time
from typing import List

from ..conftest import Notification, wait_until
from .helpers import LOOP, LOOP_CONF, MEM, MEM_CONF, RecordingKubelet, rewrite_config, wait_log

WATCHDOG_USEC = 1_000_000


def with_line(records: List[Notification], line: str) -> List[Notification]:
    return [r for r in records if line in r.text.splitlines()]


def status_lines(records: List[Notification]) -> List[str]:
    return [line[len("STATUS="):] for r in records for line in r.text.splitlines() if line.startswith("STATUS=")]


def test_ready_after_registration_watchdog_reload_stopping(kubelet, start_daemon, notifications):
    daemon = start_daemon(MEM_CONF, env={"NOTIFY_SOCKET": notifications.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    wait_until(lambda: with_line(notifications.records, "READY=1"), what="READY=1")
    kubelet.wait_live(MEM, devices=3)
    [ready] = with_line(notifications.records, "READY=1")
    # READY=1 only once the kubelet had accepted the registration, with a one-line summary.
    assert kubelet.registrations[0]["time"] <= ready.time
    assert ("STATUS=1/1 resource(s) registered with the kubelet (stream connected); 3 device(s)"
            in ready.text.splitlines())

    # WATCHDOG=1 keeps coming, every WATCHDOG_USEC/2: never early, never late enough for systemd to act.
    wait_until(lambda: len(with_line(notifications.records, "WATCHDOG=1")) >= 5, 10, "five WATCHDOG=1")
    pings = [r.time for r in with_line(notifications.records, "WATCHDOG=1")]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    half = WATCHDOG_USEC / 2e6
    assert min(gaps) >= half * 0.9, gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    # SIGHUP: RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload wants), then READY=1.
    rewrite_config(daemon, MEM_CONF + LOOP_CONF)
    seen = len(notifications.records)
    os.kill(daemon.pid, signal.SIGHUP)
    kubelet.wait_live(LOOP, devices=8)
    wait_until(lambda: len(with_line(notifications.records[seen:], "READY=1")) >= 1, what="READY=1 after the reload")
    reload = notifications.records[seen:]
    [reloading] = with_line(reload, "RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.text.splitlines())
    assert reload.index(reloading) < reload.index(with_line(reload, "READY=1")[0])
    wait_until(lambda: "2/2 resource(s) registered with the kubelet (stream connected); 11 device(s)"
               in status_lines(notifications.records), what="STATUS= with both resources")

    assert daemon.stop() == 0
    texts = [r.text for r in notifications.records if r.text != "WATCHDOG=1"]
    assert "STOPPING=1" in texts[-1].splitlines()
    assert len(with_line(notifications.records, "READY=1")) == 2  # start and reload, nothing else
    assert {r.pid for r in notifications.records} == {daemon.pid}


def test_ready_without_kubelet_says_it_waits(kubelet_dir, start_daemon, notifications):
    """Boot ordering cannot deadlock: without kubelet.sock the daemon is READY, saying it waits."""
    daemon = start_daemon(MEM_CONF, env={"NOTIFY_SOCKET": notifications.path})
    wait_until(lambda: with_line(notifications.records, "READY=1"), what="READY=1")
    [ready] = with_line(notifications.records, "READY=1")
    [status] = status_lines([ready])
    assert "waiting for the kubelet" in status and "kubelet.sock" in status

    kubelet = RecordingKubelet(kubelet_dir).start()
    try:
        kubelet.wait_live(MEM, devices=3)
        wait_until(lambda: "1/1 resource(s) registered with the kubelet (stream connected); 3 device(s)"
                   in status_lines(notifications.records), what="STATUS= once registered")
        # Registered later: a new STATUS=, not a second READY=1; no watchdog without WATCHDOG_USEC.
        assert len(with_line(notifications.records, "READY=1")) == 1
        assert not with_line(notifications.records, "WATCHDOG=1")
    finally:
        kubelet.stop()
    assert daemon.stop() == 0
    assert {r.pid for r in notifications.records} == {daemon.pid}


def test_invalid_reload_is_announced_and_ready_again(kubelet, start_daemon, notifications):
    daemon = start_daemon(MEM_CONF, env={"NOTIFY_SOCKET": notifications.path})
    kubelet.wait_live(MEM, devices=3)
    wait_until(lambda: with_line(notifications.records, "READY=1"), what="READY=1")
    rewrite_config(daemon, MEM_CONF + "colour = blue\n")
    seen = len(notifications.records)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_until(lambda: with_line(notifications.records[seen:], "READY=1"), what="READY=1 after the refused reload")
    reload = notifications.records[seen:]
    assert with_line(reload, "RELOADING=1")
    assert any("reload refused (1 error(s))" in s for s in status_lines(reload))
    assert len(kubelet.requests) == 1
    assert {r.pid for r in notifications.records} == {daemon.pid}


def test_ready_waits_for_an_accepted_registration(kubelet_dir, start_daemon, notifications):
    kubelet = RecordingKubelet(kubelet_dir, refuse=3, refusal="not ready yet").start()
    try:
        daemon = start_daemon("[plugin]\nregister_backoff_max = 0.1\n" + MEM_CONF,
                              env={"NOTIFY_SOCKET": notifications.path})
        kubelet.wait_live(MEM, devices=3)
        wait_log(daemon, "ready:")
        wait_until(lambda: with_line(notifications.records, "READY=1"), 5, "READY=1 to arrive")
        [ready] = with_line(notifications.records, "READY=1")
        assert ready.time >= kubelet.registrations[0]["time"]
    finally:
        kubelet.stop()


def test_ready_after_ready_timeout_when_the_kubelet_keeps_refusing(kubelet_dir, start_daemon, notifications):
    """A kubelet that never accepts must not hold the unit's start: READY=1 after ready_timeout, with
    the Register error in STATUS=, and the daemon goes on retrying."""
    kubelet = RecordingKubelet(kubelet_dir, refuse=10**6, refusal="device plugins are disabled").start()
    try:
        started = time.time()
        daemon = start_daemon("[plugin]\nregister_backoff_max = 0.2\nready_timeout = 1\n" + MEM_CONF,
                              env={"NOTIFY_SOCKET": notifications.path})
        wait_until(lambda: with_line(notifications.records, "READY=1"), 10, "READY=1 after ready_timeout")
        [ready] = with_line(notifications.records, "READY=1")
        status = [line for line in ready.text.splitlines() if line.startswith("STATUS=")]
        assert status and "0/1 resource(s) registered" in status[0], ready.text
        assert "device plugins are disabled" in status[0], ready.text
        assert ready.time - started >= 1.0
        retries = len(kubelet.requests)
        wait_until(lambda: len(kubelet.requests) > retries, 5, "Register to be retried after READY=1")
        wait_log(daemon, "ready without every registration")
    finally:
        kubelet.stop()
