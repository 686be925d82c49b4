"""sd_notify for Type=notify units.

Uses the ``sdnotify`` package when it is installed (EPEL 9 has python3-sdnotify;
RHEL 10 and EPEL 10 have none, so the RPM requires it on EL9 only).  Without it this
module speaks the protocol itself: one datagram to $NOTIFY_SOCKET (a path, or ``@name``
for the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

log = logging.getLogger(__name__)

try:
    import sdnotify
except ImportError:  # EL10: no python3-sdnotify
    sdnotify = None


class Notifier:
    """Sends state lines to systemd; does nothing without NOTIFY_SOCKET."""

    def __init__(self, address: Optional[str] = None, use_sdnotify: Optional[bool] = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if use_sdnotify is None:
            use_sdnotify = sdnotify is not None
        self._sd = None
        self._sock: Optional[socket.socket] = None
        if not self.address:
            return
        if use_sdnotify and sdnotify is not None and self.address == os.environ.get("NOTIFY_SOCKET"):
            self._sd = sdnotify.SystemdNotifier()
        else:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        message = "\n".join(lines)
        if self._sd is not None:
            # sdnotify encodes latin-1 and silently drops what does not fit: hand it
            # the UTF-8 bytes systemd expects, spelled as latin-1.
            self._sd.notify(message.encode("utf-8", "replace").decode("latin-1"))
            return
        assert self._sock is not None
        addr = self.address
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), target)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", addr, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._sd is not None and self._sd.socket is not None:
            self._sd.socket.close()


def watchdog_interval() -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC) when the watchdog is ours."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
