"""notify.py: sd_notify over a real datagram socket, through sdnotify and through the built-in fallback."""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid

import pytest

from udev_device_plugin import notify
from udev_device_plugin.notify import Notifier


class Listener:
    """A NOTIFY_SOCKET of our own, at a path or in the abstract namespace."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(5)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    address = str(tmp_path / "notify.sock") if request.param == "path" else f"@udp-test-{uuid.uuid4().hex}"
    lst = Listener(address)
    try:
        yield lst
    finally:
        lst.sock.close()


# The sdnotify path exists only where the library is installed (EL9 and newest; EL10 has no package,
# which tests/stacks/report.py checks): elsewhere there is no such path to test, rather than a skip.
HAVE_SDNOTIFY = importlib.util.find_spec("sdnotify") is not None
PATHS = [True, False] if HAVE_SDNOTIFY else [False]


@pytest.fixture(params=PATHS, ids=["sdnotify", "builtin"][:len(PATHS)] if HAVE_SDNOTIFY else ["builtin"])
def use_sdnotify(request):
    return request.param


def make(listener: Listener, use_sdnotify: bool, monkeypatch) -> Notifier:
    # sdnotify reads NOTIFY_SOCKET itself; the fallback reads it when no address is given.
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    n = Notifier(use_sdnotify=use_sdnotify)
    # The path under test is the one asked for: sdnotify only when wanted.
    assert (n._sd is not None) is use_sdnotify
    assert n.enabled and n.address == listener.address
    return n


def test_lines_arrive_as_one_datagram(listener, use_sdnotify, monkeypatch):
    n = make(listener, use_sdnotify, monkeypatch)
    try:
        n.notify("READY=1", "STATUS=serving 3 device(s)")
        n.notify("WATCHDOG=1")
        n.notify("STOPPING=1", "STATUS=stopping")
        assert listener.recv() == b"READY=1\nSTATUS=serving 3 device(s)"
        assert listener.recv() == b"WATCHDOG=1"
        assert listener.recv() == b"STOPPING=1\nSTATUS=stopping"
        assert listener.nothing_pending()
    finally:
        n.close()


def test_non_ascii_status_arrives_as_utf8(listener, use_sdnotify, monkeypatch):
    n = make(listener, use_sdnotify, monkeypatch)
    try:
        status = "STATUS=waiting for kubelet.sock in /var/lib/k\u00fcbelet \u2192 retry"
        n.notify("READY=1", status)
        n.notify("STATUS=caf\u00e9")
        assert listener.recv() == f"READY=1\n{status}".encode()
        assert listener.recv() == "STATUS=caf\u00e9".encode()
    finally:
        n.close()


def test_close_releases_the_socket(listener, use_sdnotify, monkeypatch):
    before = set(os.listdir("/proc/self/fd"))
    n = make(listener, use_sdnotify, monkeypatch)
    n.notify("READY=1")
    assert listener.recv() == b"READY=1"
    n.close()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_explicit_address_uses_the_builtin_sender(listener, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier(listener.address, use_sdnotify=True)
    try:
        assert n._sd is None  # sdnotify could only reach $NOTIFY_SOCKET
        n.notify("READY=1")
        assert listener.recv() == b"READY=1"
    finally:
        n.close()


def test_without_notify_socket_nothing_is_sent(listener, use_sdnotify, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier(use_sdnotify=use_sdnotify)
    try:
        assert not n.enabled
        n.notify("READY=1")
        assert listener.nothing_pending()
    finally:
        n.close()


def test_unreachable_socket_is_not_an_error(tmp_path, use_sdnotify, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier(use_sdnotify=use_sdnotify)
    try:
        assert n.enabled
        n.notify("READY=1")  # systemd gone: nothing to do, and no exception
    finally:
        n.close()


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("", None, None),
    ("20000000", None, 10.0),
    ("1000000", "self", 0.5),
    ("3", None, 1.5e-6),
    ("20000000", "1", None),  # the watchdog is another process's
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    ("1.5e6", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert notify.watchdog_interval() == expected
