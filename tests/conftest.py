"""Shared fixtures: a stand-in kubelet on a real UNIX socket under tmp_path, the real daemon as a
subprocess, a NOTIFY_SOCKET listener, and a check that no test leaks threads or child processes."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, List, NamedTuple, Optional

import pytest

from .standin import BEHAVIOURS, NEWEST, StandInKubelet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def process_gone(pid: int) -> bool:
    """``pid`` no longer runs: absent, or a zombie waiting to be reaped. A process reaped between
    opening its stat file and reading it makes the read fail with ESRCH: gone too."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def kubelet_dir(tmp_path) -> str:
    # Short: UNIX socket paths are limited to 107 bytes.
    path = tmp_path / "dp"
    path.mkdir()
    return str(path)


@pytest.fixture
def kubelet_behaviour() -> str:
    """The kubelet release the ``kubelet`` fixture behaves as (tests/standin.py): the newest, or
    ``UDP_KUBELET_BEHAVIOUR`` (a whole run against another release); a test or module picks its own
    with ``@pytest.mark.parametrize("kubelet_behaviour", BEHAVIOURS)``."""
    behaviour = os.environ.get("UDP_KUBELET_BEHAVIOUR", NEWEST)
    if behaviour not in BEHAVIOURS:
        pytest.fail(f"UDP_KUBELET_BEHAVIOUR={behaviour!r}: accepted: {', '.join(BEHAVIOURS)}", pytrace=False)
    return behaviour


@pytest.fixture
def kubelet(kubelet_dir, kubelet_behaviour) -> Iterator[StandInKubelet]:
    k = StandInKubelet(kubelet_dir, behaviour=kubelet_behaviour).start()
    try:
        yield k
    finally:
        k.stop()


class Notification(NamedTuple):
    """One sd_notify datagram: when it arrived, the sending process (from SCM_CREDENTIALS) and its text."""

    time: float  # time.time() on receipt
    pid: Optional[int]
    text: str


class Notifications:
    """A NOTIFY_SOCKET of our own: records every sd_notify datagram and, as systemd does with
    NotifyAccess=main, the PID of its sender (SO_PASSCRED makes the kernel attach it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages: List[str] = []
        self.records: List[Notification] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        creds = struct.Struct("iII")  # struct ucred: pid, uid, gid
        while not self._stop:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds.size))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = creds.unpack(payload[:creds.size])[0]
            text = data.decode()
            self.records.append(Notification(time.time(), pid, text))
            self.messages.append(text)

    def lines(self) -> List[str]:
        return [line for m in list(self.messages) for line in m.splitlines()]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notifications(tmp_path) -> Iterator[Notifications]:
    n = Notifications(str(tmp_path / "notify.sock"))
    try:
        yield n
    finally:
        n.close()


class DaemonProcess:
    """``udev-device-plugin serve`` as a real subprocess."""

    def __init__(self, config_path: str, kubelet_dir: str, env: Optional[dict] = None,
                 wrapper: Optional[List[str]] = None) -> None:
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("WATCHDOG_USEC", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.cmd = (wrapper or []) + [sys.executable, "-m", "udev_device_plugin", "serve", "--config", config_path,
                                      "--kubelet-dir", kubelet_dir]
        self.log_path = os.path.join(os.path.dirname(config_path), "daemon.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


@pytest.fixture
def start_daemon(tmp_path, kubelet_dir) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the daemon with a config text; every daemon is stopped (and must exit 0) at teardown."""
    started: List[DaemonProcess] = []

    def start(config_text: str, env: Optional[dict] = None, directory: Optional[str] = None,
              wrapper: Optional[List[str]] = None) -> DaemonProcess:
        conf_dir = tmp_path / f"etc{len(started)}"
        conf_dir.mkdir()
        path = conf_dir / "udev-device-plugin.conf"
        path.write_text(config_text)
        d = DaemonProcess(str(path), directory or kubelet_dir, env, wrapper)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            code = d.stop()
            assert code == 0, f"daemon exited {code} on SIGTERM; log:\n{d.log()}"


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind (children that outlive one test on
    purpose, as a module's container does, were there before it and do not count)."""
    before = {t.ident for t in threading.enumerate()}
    children_before = set(_children())
    yield
    deadline = time.monotonic() + 5
    while True:
        # grpc.aio's completion-queue poller is one thread per process, started by the first aio
        # server or channel (an in-process daemon's) and never a second: a singleton, not a leak.
        pollers = [t for t in threading.enumerate()
                   if getattr(getattr(t, "_target", None), "__name__", "") == "_poll_wrapper"]
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
                 and not (len(pollers) == 1 and t is pollers[0])]
        children = sorted(set(_children()) - children_before)
        if not extra and not children:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"test leaked threads {[t.name for t in extra]} / child processes {children}")
        time.sleep(0.02)


def _children() -> List[int]:
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
