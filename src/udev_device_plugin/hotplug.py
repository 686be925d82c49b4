"""The udev monitor (netlink, without libudev): events only ask for a rescan of the resources they can touch."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Set, Tuple

from . import inotify as ino
from .discovery import shown_path

log = logging.getLogger(__name__)

# Enough for a burst of a few thousand events while the main loop rescans.
RECEIVE_BUFFER = 32 * 1024 * 1024
# The kernel's socket is read for removes only, and what it loses udevd's events make up for.
KERNEL_BUFFER = 4 * 1024 * 1024
ACTIONS = ("add", "remove", "change", "bind", "unbind", "move")


class UdevEvent(NamedTuple):
    action: str
    subsystem: Optional[str]
    sys_path: str


class Overflow(Exception):
    """Events were lost (the netlink buffer overflowed): a full rescan is due."""


# The udev netlink protocol (systemd's sd-device/device-monitor.c): udevd multicasts every event it
# has processed to group 2 of NETLINK_KOBJECT_UEVENT, as a "libudev" header and the device's
# properties (KEY=VALUE, NUL-separated); the kernel's raw uevents go to group 1 as "action@devpath".
NETLINK_KOBJECT_UEVENT = 15
GROUPS = {"kernel": 1, "udev": 2}
_UDEV_MAGIC = 0xFEEDCAFE
_HEADER = struct.Struct("@8sIIII")  # prefix, magic (network order), header_size, properties_off, len
_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid
_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SO_RCVBUFFORCE = 33
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
_MESSAGE_MAX = 256 * 1024


def parse_uevent(data: bytes, source: str) -> Optional[Dict[bytes, bytes]]:
    """A netlink uevent's properties, or None when it is not a message of ``source``'s format."""
    if source == "udev":
        if len(data) < _HEADER.size or not data.startswith(b"libudev\0"):
            return None
        _, magic, header_size, offset, length = _HEADER.unpack_from(data)
        if socket.ntohl(magic) != _UDEV_MAGIC or header_size > len(data) or offset + length > len(data):
            return None
        body = data[offset:offset + length]
    else:
        head, sep, body = data.partition(b"\0")
        if not sep or b"@" not in head:
            return None
    return dict(item.partition(b"=")[::2] for item in body.split(b"\0") if b"=" in item)


# A classic BPF program for the kernel's socket: pass a message that starts with "remove@", drop every
# other one in the kernel (adds and changes of every subsystem would otherwise each wake the daemon: a
# burst of 1,000 loop devices sends ~3,000).  Loads are big-endian: "remo", "ve", "@".
_SO_ATTACH_FILTER = 26
_REMOVES_ONLY = b"".join(struct.pack("HBBI", *insn) for insn in (
    (0x20, 0, 0, 0),           # ld  [0]      (4 bytes)
    (0x15, 0, 5, 0x72656D6F),  # jne "remo" -> drop
    (0x28, 0, 0, 4),           # ldh [4]
    (0x15, 0, 3, 0x7665),      # jne "ve"   -> drop
    (0x30, 0, 0, 6),           # ldb [6]
    (0x15, 0, 1, 0x40),        # jne "@"    -> drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret: the whole message
    (0x06, 0, 0, 0),           # drop: ret 0
))


def attach_removes_only(sock: socket.socket) -> None:
    """Let ``sock`` receive only messages that start with "remove@" (SO_ATTACH_FILTER; raises OSError)."""
    import ctypes  # loaded already (inotify.py)

    program = ctypes.create_string_buffer(_REMOVES_ONLY, len(_REMOVES_ONLY))
    fprog = struct.pack("HL", len(_REMOVES_ONLY) // 8, ctypes.addressof(program))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _netlink(group: int, buffer: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                         NETLINK_KOBJECT_UEVENT)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, buffer)
        except OSError:  # CAP_NET_ADMIN is needed above rmem_max
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            except OSError as exc:
                log.debug("cannot enlarge the uevent receive buffer: %s", exc)
        sock.bind((0, group))
    except BaseException:
        sock.close()
        raise
    return sock


class HotplugMonitor:
    """udev's events from the netlink multicast group, read without libudev.

    The ``udev`` source: events arrive after udevd's rules named and chmod-ed the nodes.  Messages
    not sent by root (SCM_CREDENTIALS, as libudev checks) or not in udev's format are dropped.
    umockdev's preload library emulates this socket for its mock devices, as it does for libudev.
    """

    def __init__(self, context: object = None, source: str = "udev", kernel_removes: bool = True) -> None:
        self.source = source
        self.sock = _netlink(GROUPS[source], RECEIVE_BUFFER)
        # The kernel's own remove uevents too: a device that left is gone from the moment the kernel
        # says so, and udevd's event for it follows 1-20 ms later (its rules run first).  Adds and
        # every other action wait for udevd (its rules name and chmod the nodes).  Optional: without
        # it the udev event still removes the device.
        self.kernel: Optional[socket.socket] = None
        if source == "udev" and kernel_removes:
            try:
                self.kernel = _netlink(GROUPS["kernel"], KERNEL_BUFFER)
            except OSError as exc:
                log.debug("no kernel uevent socket (removals wait for udevd): %s", exc)
            else:
                try:
                    attach_removes_only(self.kernel)
                except OSError as exc:  # then drain() drops the others, after a wake-up each
                    log.debug("kernel uevent socket without its filter: %s", exc)

    def fileno(self) -> int:
        return self.sock.fileno()

    def filenos(self) -> List[int]:
        """Every socket to wait on: udev's, and the kernel's where it is open."""
        return [self.sock.fileno()] + ([self.kernel.fileno()] if self.kernel is not None else [])

    def close(self) -> None:
        self.sock.close()
        if self.kernel is not None:
            self.kernel.close()

    def drain(self) -> List[UdevEvent]:
        """Every event waiting now, without blocking; raise Overflow when udev events were lost.

        The kernel's removes come first (they happened before udevd's events for them; a remove
        seen twice is looked at twice, the second time finding nothing).  Kernel messages lost to
        a full buffer cost nothing but their head start: udevd's events follow.
        A device named with bytes that are not UTF-8 (root can make one: ip link add name
        $'x\\xff' ...) keeps its path, undecodable bytes as surrogates, so that refresh() finds it
        and skips it with a warning; an undecodable subsystem or action skips the event.
        """
        events: List[UdevEvent] = []
        if self.kernel is not None:
            lost = self._read(self.kernel, "kernel", events, ("remove",))
            if lost:
                log.debug("kernel uevents were lost (udevd's events follow)")
        if self._read(self.sock, self.source, events, ACTIONS):
            raise Overflow(f"udev events were lost; {len(events)} read after the overflow")
        return events

    def _read(self, sock: socket.socket, source: str, events: List[UdevEvent], actions: Tuple[str, ...]) -> bool:
        """Append the waiting events of ``actions`` from ``sock``; True when some were lost."""
        lost = False
        cmsg_space = socket.CMSG_SPACE(_CREDENTIALS.size)
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(_MESSAGE_MAX, cmsg_space)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            if not self._from_root(ancillary):
                continue
            if source == "kernel" and not data.startswith(b"remove@"):
                continue  # the common case, decided before any parsing: an add or change
            props = parse_uevent(data, source)
            if props is None:
                continue
            devpath = props.get(b"DEVPATH")
            if devpath is None:
                continue
            sys_path = "/sys" + os.fsdecode(devpath)
            try:
                action = props.get(b"ACTION", b"").decode("utf-8")
                raw_subsystem = props.get(b"SUBSYSTEM")
                subsystem = raw_subsystem.decode("utf-8") if raw_subsystem is not None else None
            except UnicodeDecodeError as exc:
                log.warning("udev event for %s skipped: its data is not text (%s)", shown_path(sys_path), exc)
                continue
            if action in actions:
                events.append(UdevEvent(action, subsystem, sys_path))
        return lost

    @staticmethod
    def _from_root(ancillary: List[Tuple[int, int, bytes]]) -> bool:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
                _, uid, _ = _CREDENTIALS.unpack_from(data)
                return uid == 0
        return False


class Coalescer:
    """When to apply the udev changes gathered so far: a pure function of the events and a clock.

    A change after a quiet spell (``quiet`` without a udev event) is applied at once.  Changes
    that follow others closely (a burst: 100 devices plugged at once) wait until ``holdoff``
    after the last application, so the kubelet gets a few full lists, not one growing list
    per device.  A device node that went or came (inotify, no udev event) waits ``node_hold``
    for the event that usually follows it: the kernel deletes an unplugged device's node some
    milliseconds before it sends the remove, and reporting the device unhealthy in between
    would cost the kubelet a full list, and the journal an UNHEALTHY event, per unplug.  The
    event, when it comes, is applied as any other (at once after a quiet spell).
    """

    def __init__(self, quiet: float = 0.005, holdoff: float = 0.02, node_hold: float = 0.05) -> None:
        self.quiet = quiet
        self.holdoff = holdoff
        self.node_hold = node_hold
        self.changes: Dict[str, Dict[str, str]] = {}
        self.full: Set[str] = set()
        self.due: Optional[float] = None
        self._held = False  # ``due`` is a node change's hold, which a udev event may cut short
        self._applied = float("-inf")
        self._arrived = float("-inf")

    def add(self, now: float, changes: Mapping[str, Mapping[str, str]], full: Iterable[str] = (),
            arrival: bool = True) -> Optional[float]:
        """Gather changes (resource -> sys_path -> action) and full rescans; return when to apply.

        ``arrival``: a udev event (counts for quiet spells); a device node seen by inotify is not
        (it waits ``node_hold``).  Returns ``now`` to apply at once, a later time (the caller's
        timer, replacing any earlier one), or None when nothing is pending or an application is
        scheduled already.
        """
        for name, paths in changes.items():
            seen = self.changes.setdefault(name, {})
            for path, action in paths.items():
                if action == "change":
                    seen.setdefault(path, action)  # an event of its own for the device wins
                else:
                    seen[path] = action
        self.full.update(full)
        if not (self.changes or self.full):
            return None
        if not arrival:
            if self.due is not None:
                return None
            self.due, self._held = now + self.node_hold, True
            return self.due
        quiet = now - self._arrived >= self.quiet
        self._arrived = now
        if self.due is not None and not self._held:
            return None
        if quiet or now - self._applied >= self.holdoff:
            return now
        burst_due = self._applied + self.holdoff
        self.due = burst_due if self.due is None else min(self.due, burst_due)
        self._held = False
        return self.due

    def take(self, now: float) -> Tuple[Dict[str, Dict[str, str]], Set[str]]:
        changes, full = self.changes, self.full
        self.changes, self.full, self.due, self._held = {}, set(), None, False
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
        self._uses: Dict[str, int] = {}  # directory -> how many devices' nodes are in it
        self._extra: Set[str] = set()  # the directories of the extra nodes

    def fileno(self) -> int:
        return self.inotify.fileno()

    def adjust(self, added: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
        """Device nodes came (``added``) and went (``removed``), each once per device that has it:
        watch the directories that hold one now, no more those that hold none.  Costs the nodes
        given, not all of them (a hotplug event at 10,000 devices passes one)."""
        self._apply(self._count(added, 1) | self._count(removed, -1))

    def set_extra(self, paths: Iterable[str]) -> None:
        """The nodes watched besides the devices' own (the resources' extra_devnodes), all of them."""
        old, self._extra = self._extra, {self._parent(p) for p in paths if p.startswith("/")}
        self._apply(old ^ self._extra)

    @staticmethod
    def _parent(path: str) -> str:
        return path.rpartition("/")[0] or "/"

    def _count(self, paths: Iterable[str], step: int) -> Set[str]:
        seen = set()
        for path in paths:
            if path.startswith("/"):
                directory = self._parent(path)
                seen.add(directory)
                uses = self._uses.get(directory, 0) + step
                if uses > 0:
                    self._uses[directory] = uses
                else:
                    self._uses.pop(directory, None)
        return seen

    def _apply(self, directories: Iterable[str]) -> None:
        for directory in directories:
            wanted = directory in self._uses or directory in self._extra
            if wanted and directory not in self._dirs:
                self._watch(directory)  # also one that did not exist at the last try
            elif not wanted and directory in self._dirs:
                self._unwatch(directory)

    @property
    def directories(self) -> Set[str]:
        """The directories watched now."""
        return set(self._dirs)

    def _watch(self, directory: str) -> None:
        try:
            wd = self.inotify.add_watch(directory, self.MASK)
        except OSError as exc:
            # A directory that does not exist yet (/dev/accel before its driver loads):
            # its device's add event brings a rescan, which watches it then.
            log.debug("cannot watch %s: %s", directory, exc.strerror)
            return
        self._dirs[directory] = wd
        self._by_wd[wd] = directory

    def _unwatch(self, directory: str) -> None:
        wd = self._dirs.pop(directory)
        self._by_wd.pop(wd, None)
        self.inotify.rm_watch(wd)

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
