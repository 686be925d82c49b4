"""The udev monitor: events only ask for a rescan of the resources they can touch."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import List, Optional

import pyudev

log = logging.getLogger(__name__)

# Enough for a burst of a few thousand events while the main loop rescans.
RECEIVE_BUFFER = 32 * 1024 * 1024
ACTIONS = ("add", "remove", "change", "bind", "unbind", "move")


@dataclass(frozen=True)
class UdevEvent:
    action: str
    subsystem: Optional[str]
    sys_path: str


class Overflow(Exception):
    """Events were lost (the netlink buffer overflowed): a full rescan is due."""


class HotplugMonitor:
    """A pyudev monitor on the ``udev`` source: events arrive after rules named and chmod-ed the nodes."""

    def __init__(self, context: pyudev.Context, source: str = "udev") -> None:
        self.monitor = pyudev.Monitor.from_netlink(context, source=source)
        try:
            self.monitor.set_receive_buffer_size(RECEIVE_BUFFER)
        except OSError as exc:  # needs CAP_NET_ADMIN above rmem_max
            log.debug("cannot enlarge the udev receive buffer: %s", exc)
        self.monitor.start()

    def fileno(self) -> int:
        return int(self.monitor.fileno())

    def drain(self) -> List[UdevEvent]:
        """Every event waiting now, without blocking; raise Overflow when some were lost."""
        events: List[UdevEvent] = []
        lost = False
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    break
                raise
            if device is None:
                break
            action = device.action or ""
            if action in ACTIONS:
                events.append(UdevEvent(action, device.subsystem, device.sys_path))
        if lost:
            raise Overflow(f"udev events were lost; {len(events)} read after the overflow")
        return events
