"""Fixtures for the hotplug tests: a real systemd-udevd (session), loop devices, the daemon watching
them, a datagram socket standing in for journald, and a line printer for measured figures."""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, Optional

import pytest

from tests.conftest import DaemonProcess, wait_until
from tests.standin import StandInKubelet

from ..journalwire import Journal
from . import realudev


@pytest.fixture(scope="session")
def udevd(tmp_path_factory) -> Iterator[realudev.Udevd]:
    """Our own systemd-udevd for the whole session (only one can run on the machine)."""
    problem = realudev.Udevd.problem()
    if problem:
        pytest.fail(f"cannot run the real-udev hotplug tests: {problem}", pytrace=False)
    realudev.clean_leftovers()
    daemon = realudev.Udevd(str(tmp_path_factory.mktemp("udevd") / "udevd.log")).start()
    try:
        yield daemon
    finally:
        realudev.clean_leftovers()
        daemon.stop()


@pytest.fixture
def loops(udevd) -> Iterator[realudev.LoopDevices]:
    """Loop devices this test creates; every one is removed afterwards, even on failure."""
    devices = realudev.LoopDevices()
    try:
        yield devices
    finally:
        devices.close()


@pytest.fixture
def say(request) -> Callable[[str], None]:
    """Print a measured figure into the test output, even with output captured."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        text = f"\n    [{request.node.name}] {line}"
        if capture is None:
            print(text)
            return
        with capture.global_and_fixture_disabled():
            print(text, flush=True)

    return write


def start_loop_daemon(start_daemon: Callable[..., DaemonProcess], kubelet: StandInKubelet, log_level: str = "info",
                      events: str = "stderr", env: Optional[Dict[str, str]] = None) -> DaemonProcess:
    """The daemon serving ``loop1[0-9][0-9]`` block disks, registered and past its first message."""
    daemon = start_daemon(realudev.LOOP_CONFIG.format(log_level=log_level, events=events), env=env)
    wait_until(lambda: kubelet.messages.get(realudev.LOOP_RESOURCE, 0) >= 1 or daemon.proc.poll() is not None,
               timeout=20, what="the daemon's first ListAndWatch message")
    assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{daemon.log()}"
    return daemon


# --- a socket standing in for journald's --------------------------------------------------------

@pytest.fixture
def journal(tmp_path) -> Iterator[Journal]:
    # Short: the socket path must fit in 107 bytes.
    j = Journal(os.path.join(str(tmp_path), "j.sock"))
    try:
        yield j
    finally:
        j.close()
