"""The udev monitor: events only ask for a rescan of the resources they can touch."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

import pyudev

from . import inotify as ino
from .discovery import safe_sys_path, shown_path

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
        """Every event waiting now, without blocking; raise Overflow when some were lost.

        An event whose data does not decode (a device named with bytes that are not UTF-8,
        which root can create) is skipped with a WARNING naming its path, escaped.
        """
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
            # A device named with bytes that are not UTF-8 (root can make one: ip link add name
            # $'x\xff' ...) keeps its path, undecodable bytes as surrogates, so that refresh()
            # finds it and skips it with a warning; any other undecodable field skips the event.
            sys_path = safe_sys_path(device)
            try:
                action = device.action or ""
                subsystem = device.subsystem
            except (UnicodeDecodeError, ValueError) as exc:
                log.warning("udev event for %s skipped: its data is not text (%s)", shown_path(sys_path), exc)
                continue
            if action in ACTIONS:
                events.append(UdevEvent(action, subsystem, sys_path))
        if lost:
            raise Overflow(f"udev events were lost; {len(events)} read after the overflow")
        return events


class Coalescer:
    """When to apply the udev changes gathered so far: a pure function of the events and a clock.

    A change after a quiet spell (``quiet`` without a udev event) is applied at once.  Changes
    that follow others closely (a burst: 100 devices plugged at once) wait until ``holdoff``
    after the last application, so the kubelet gets a few full lists, not one growing list
    per device.
    """

    def __init__(self, quiet: float = 0.005, holdoff: float = 0.02) -> None:
        self.quiet = quiet
        self.holdoff = holdoff
        self.changes: Dict[str, Dict[str, str]] = {}
        self.full: Set[str] = set()
        self.due: Optional[float] = None
        self._applied = float("-inf")
        self._arrived = float("-inf")

    def add(self, now: float, changes: Mapping[str, Mapping[str, str]], full: Iterable[str] = (),
            arrival: bool = True) -> Optional[float]:
        """Gather changes (resource -> sys_path -> action) and full rescans; return when to apply.

        ``arrival``: a udev event (counts for quiet spells); a device node seen by inotify is not,
        since its udev event follows at once.  Returns ``now`` to apply at once, a later time, or
        None when nothing is pending or an application is scheduled already.
        """
        for name, paths in changes.items():
            seen = self.changes.setdefault(name, {})
            for path, action in paths.items():
                if action == "change":
                    seen.setdefault(path, action)  # an event of its own for the device wins
                else:
                    seen[path] = action
        self.full.update(full)
        quiet = True
        if arrival:
            quiet = now - self._arrived >= self.quiet
            self._arrived = now
        if not (self.changes or self.full) or self.due is not None:
            return None
        if quiet or now - self._applied >= self.holdoff:
            return now
        self.due = self._applied + self.holdoff
        return self.due

    def take(self, now: float) -> Tuple[Dict[str, Dict[str, str]], Set[str]]:
        changes, full = self.changes, self.full
        self.changes, self.full, self.due = {}, set(), None
        self._applied = now
        return changes, full


class DevnodeWatch:
    """inotify on the directories that hold our device nodes.

    udev sends no event when a node is deleted or created by hand (``rm /dev/loop150``),
    yet a device whose node vanished is unhealthy: this watch turns such changes into
    rescan requests, still without polling.
    """

    MASK = ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_ONLYDIR

    def __init__(self) -> None:
        self.inotify = ino.Inotify()
        self._dirs: Dict[str, int] = {}
        self._by_wd: Dict[int, str] = {}

    def fileno(self) -> int:
        return self.inotify.fileno()

    def watch(self, paths: Iterable[str]) -> None:
        """Watch exactly the parent directories of ``paths``."""
        wanted = {os.path.dirname(p) for p in paths if p.startswith("/")}
        for directory in set(self._dirs) - wanted:
            wd = self._dirs.pop(directory)
            self._by_wd.pop(wd, None)
            self.inotify.rm_watch(wd)
        for directory in wanted - set(self._dirs):
            try:
                wd = self.inotify.add_watch(directory, self.MASK)
            except OSError as exc:
                # A directory that does not exist yet (/dev/accel before its driver loads):
                # its device's add event brings a rescan, which watches it then.
                log.debug("cannot watch %s: %s", directory, exc.strerror)
                continue
            self._dirs[directory] = wd
            self._by_wd[wd] = directory

    def changed(self) -> Set[str]:
        """Paths created or removed since the last call; ``{""}`` when events were lost."""
        out: Set[str] = set()
        for event in self.inotify.read():
            if event.mask & ino.IN_Q_OVERFLOW:
                out.add("")
            elif event.mask & ino.IN_IGNORED:
                directory = self._by_wd.pop(event.wd, None)
                if directory is not None:
                    self._dirs.pop(directory, None)
            elif event.wd in self._by_wd and event.name:
                out.add(os.path.join(self._by_wd[event.wd], event.name))
        return out

    def close(self) -> None:
        self.inotify.close()
