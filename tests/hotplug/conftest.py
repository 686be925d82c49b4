"""Fixtures for the hotplug tests: a real systemd-udevd (session), loop devices, the daemon watching
them, a datagram socket standing in for journald, and a line printer for measured figures."""

from __future__ import annotations

import os
import socket
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.conftest import DaemonProcess, wait_until
from tests.standin import StandInKubelet

from .. import journalwire
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


# --- journald's native protocol -------------------------------------------------------------

def parse_native(data: bytes) -> List[Tuple[str, str]]:
    """Fields of one native-protocol datagram, values as text."""
    return [(key, value.decode()) for key, value in journalwire.parse_native(data)]


class Journal:
    """A datagram socket where the daemon sends what it would send journald."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.entries: List[List[Tuple[str, str]]] = []

    def read(self) -> List[Dict[str, str]]:
        """Every entry so far (repeated keys such as DEVNODE joined with a space)."""
        while True:
            try:
                self.entries.append(parse_native(self.sock.recv(1 << 20)))
            except BlockingIOError:
                break
        out = []
        for fields in self.entries:
            entry: Dict[str, str] = {}
            for key, value in fields:
                entry[key] = f"{entry[key]} {value}" if key in entry else value
            out.append(entry)
        return out

    def find(self, **match: str) -> List[Dict[str, str]]:
        return [e for e in self.read() if all(e.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path) -> Iterator[Journal]:
    # Short: the socket path must fit in 107 bytes.
    j = Journal(os.path.join(str(tmp_path), "j.sock"))
    try:
        yield j
    finally:
        j.close()
