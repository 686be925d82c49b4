"""Device events for the admin: one journal entry per transition, with structured fields.

With journald running, entries go over its native protocol (a datagram of
``KEY=value`` lines on /run/systemd/journal/socket); otherwise a readable line on
stderr.  Query them with ``journalctl SYSLOG_IDENTIFIER=udev-device-plugin HEALTH=Unhealthy``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
import sys
from typing import IO, Deque, Dict, List, NamedTuple, Optional, Protocol, Tuple

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# For tests and debugging only: send journal entries to this datagram socket instead
# (a test binds one and reads the native-protocol datagrams; `socat` can show them).
JOURNAL_SOCKET_ENV = "UDEV_DEVICE_PLUGIN_JOURNAL_SOCKET"
IDENTIFIER = "udev-device-plugin"

# Fixed per event kind, so `journalctl MESSAGE_ID=...` finds every occurrence.
MESSAGE_IDS = {
    "added": "ae55706b3807494abdfb8ddeedab6bc8",
    "removed": "7ee66d2b5c8a4f33b92a3263d5f3fe7c",
    "unhealthy": "a270d599b26f48e7a0f26dcaf809d7d3",
    "recovered": "ae3cb32e9a704e8b8b3d040f5a8b23d8",
    "registered": "6aa40bf482854e7eaafe4d045295bdcc",
    "registration_failed": "54c11eed21dc414aa66cab3f09f119b7",
}

# syslog priorities
WARNING, NOTICE, INFO = 4, 5, 6


class Event(NamedTuple):
    kind: str
    resource: str
    message: str
    priority: int = INFO
    device_id: str = ""
    devnodes: Tuple[str, ...] = ()
    health: str = ""
    reason: str = ""

    def fields(self) -> List[Tuple[str, str]]:
        out = [
            ("MESSAGE", self.message),
            ("MESSAGE_ID", MESSAGE_IDS[self.kind]),
            ("PRIORITY", str(self.priority)),
            ("SYSLOG_IDENTIFIER", IDENTIFIER),
            ("EVENT", self.kind.upper()),
            ("RESOURCE", self.resource),
        ]
        if self.device_id:
            out.append(("DEVICE_ID", self.device_id))
        # One DEVNODE field per node: the journal keeps repeated fields, and
        # `journalctl DEVNODE=/dev/x` matches any of them.
        out.extend(("DEVNODE", node) for node in self.devnodes)
        for key, value in (("HEALTH", self.health), ("REASON", self.reason)):
            if value:
                out.append((key, value))
        return out


def encode(fields: List[Tuple[str, str]]) -> bytes:
    """The journal's native wire format: ``KEY=value\\n``, or for values with a newline
    ``KEY\\n`` + 64-bit little-endian length + value + ``\\n``."""
    parts = []
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            parts.append(key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key.encode() + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSink:
    """Entries to journald's socket, never blocking the daemon.

    journald reads its socket as fast as it can, but a datagram socket takes only so many entries
    unread (net.unix.max_dgram_qlen: 512 under systemd, 10 on a bare kernel), and a blocking send
    past that waits for journald: through a burst (10,000 ADDED entries at the start of a big
    node) every RPC waits, and with a journald that hangs, forever.  So the socket does not
    block: what journald cannot take yet waits here, in order, and is sent again every ``RETRY``
    seconds from the event loop (and before any newer entry).  Bounded: past ``BACKLOG_BYTES`` the
    oldest entries waiting are dropped (the newest say how the devices are now), and a warning
    in the log counts them.
    """

    RETRY = 0.05
    BACKLOG_BYTES = 4 * 1024 * 1024

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._backlog: Deque[Tuple[bytes, str]] = collections.deque()  # (entry, its message)
        self._backlog_bytes = 0
        self._dropped = 0
        self._retry: Optional[asyncio.TimerHandle] = None

    def emit(self, event: Event) -> None:
        entry = (encode(event.fields()), event.message)
        if self._backlog:
            self._flush()
        if self._backlog or not self._send(entry):
            self._keep(entry)

    def pending(self) -> int:
        """Entries waiting for journald to take them."""
        return len(self._backlog)

    def _send(self, entry: Tuple[bytes, str]) -> bool:
        """Sent, or logged instead; False when journald's queue is full (try again later)."""
        try:
            self._sock.sendto(entry[0], self.path)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            # Never lose the event: fall back to the log (stderr, which journald also collects).
            log.warning("journal unreachable (%s): %s", exc.strerror, entry[1])
        return True

    def _keep(self, entry: Tuple[bytes, str]) -> None:
        self._backlog.append(entry)
        self._backlog_bytes += len(entry[0])
        while self._backlog_bytes > self.BACKLOG_BYTES and len(self._backlog) > 1:
            self._backlog_bytes -= len(self._backlog.popleft()[0])
            self._dropped += 1
        if self._retry is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a test, a command): the next entry tries again
                return
            self._retry = loop.call_later(self.RETRY, self._retried)

    def _retried(self) -> None:
        self._retry = None
        self._flush()
        if self._backlog:
            self._retry = asyncio.get_running_loop().call_later(self.RETRY, self._retried)

    def _flush(self) -> None:
        while self._backlog and self._send(self._backlog[0]):
            self._backlog_bytes -= len(self._backlog.popleft()[0])
        if self._dropped and not self._backlog:
            log.warning("journald fell behind: %d journal entries were dropped, the oldest first "
                        "(%d MiB of them waited)", self._dropped, self.BACKLOG_BYTES >> 20)
            self._dropped = 0

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._flush()
        if self._backlog:
            log.warning("journald did not take %d journal entries before the sink closed (and %d "
                        "were dropped before); their messages follow", len(self._backlog), self._dropped)
            for _, message in self._backlog:
                log.warning("%s", message)
            self._backlog.clear()
        self._sock.close()


class StderrSink:
    def __init__(self, stream: Optional[IO[str]] = None) -> None:
        self.stream = stream

    def emit(self, event: Event) -> None:
        extra = " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k, v in event.fields()[4:])
        stream = self.stream or sys.stderr
        stream.write(f"{event.message} [{extra}]\n")
        stream.flush()

    def close(self) -> None:
        pass


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


def make_sink(mode: str, journal_socket: Optional[str] = None) -> Sink:
    """The sink for ``[plugin] events``; the journal socket is $UDEV_DEVICE_PLUGIN_JOURNAL_SOCKET if set."""
    if journal_socket is None:
        journal_socket = os.environ.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
    if mode == "journal" or (mode == "auto" and os.path.exists(journal_socket)):
        return JournalSink(journal_socket)
    return StderrSink()


def devices_event(kind: str, resource: str, device_id: str, devnodes: Tuple[str, ...], health: str,
                  reason: str, extra: str = "") -> Event:
    """The event for one device transition, with a message an admin can read alone."""
    node = devnodes[0] if devnodes else ""
    where = f" ({node})" if node else ""
    text: Dict[str, Tuple[str, int]] = {
        "added": (f"{resource}: device {device_id}{where} added, {health}", INFO),
        "removed": (f"{resource}: device {device_id}{where} removed", NOTICE),
        "unhealthy": (f"{resource}: device {device_id}{where} became unhealthy: {reason}", WARNING),
        "recovered": (f"{resource}: device {device_id}{where} recovered", NOTICE),
    }
    message, priority = text[kind]
    if extra:
        message += f"; {extra}"
        priority = min(priority, WARNING)
    if kind == "added" and reason:
        message += f": {reason}"
    return Event(kind, resource, message, priority, device_id, tuple(devnodes), health, reason)
