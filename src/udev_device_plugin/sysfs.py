"""Devices read straight from sysfs and udev's database: what libudev reads, at a tenth of the cost.

A full scan of 10,000 devices through pyudev costs ~4 s here (a ctypes round trip per field, and
libudev's own enumeration of every subsystem directory); reading the same files from Python costs
~35 us a device.  :class:`SysDevice` is the view matching.py works on (sys_path, sys_name,
subsystem, devtype, driver, devnode, properties, attribute()), filled lazily from:

- the kernel's ``uevent`` file of the device (MAJOR, MINOR, DEVNAME, DEVTYPE, DRIVER, ...);
- udev's database entry in /run/udev/data (``b<maj>:<min>``, ``c<maj>:<min>``, ``n<ifindex>`` or
  ``+<subsystem>:<sysname>``): its ``E:`` properties and ``S:`` symlinks, as libudev merges them;
- attribute files and the ``driver``/``subsystem`` links.

Names are decoded as the file system encoding with surrogates; a name, property or attribute that
is not text raises :class:`Undecodable` (the device is skipped with a warning, never a crash).
umockdev's preload library redirects these paths like libudev's own reads, so the mock testbeds
see the same devices.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

SYS = "/sys"
UDEV_DB = "/run/udev/data"
_ATTRIBUTE_MAX = 65536
_DEVICES = SYS + "/devices/"
_VIRTUAL = SYS + "/devices/virtual/"


def read_file(path: str, limit: int = _ATTRIBUTE_MAX) -> Optional[bytes]:
    """A sysfs file's content (at most ``limit`` bytes), or None; os.open/os.read: a third of open()'s cost."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:  # a directory, or an attribute that refuses reads
        return None
    finally:
        os.close(fd)


class Undecodable(Exception):
    """udev data of a device that is not text in the file system encoding."""

    def __init__(self, what: str, raw: bytes) -> None:
        super().__init__(what)
        self.what = what
        self.raw = raw


def strict(what: str, text: str) -> str:
    """``text`` (decoded with surrogateescape) if it is really text; else raise Undecodable."""
    if text.isascii():  # what sysfs names almost always are: no encoding to try
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Undecodable(what, os.fsencode(text)) from None
    return text


def _decode(what: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Undecodable(what, raw) from None


def _heads(base: str) -> List[str]:
    """``base`` (absolute, normal) and each of its parents, without a trailing slash: [base, its
    parent, ..., "" for /]."""
    heads = [base.rstrip("/")]
    while heads[-1]:
        heads.append(heads[-1].rpartition("/")[0])
    return heads


def resolved(base: str, heads: List[str], target: str) -> str:
    """The link ``target`` read in directory ``base`` (absolute and normal; ``heads``: :func:`_heads` of it),
    as a normal path.  The kernel writes its links as "../" repeated, then a plain path: that form is
    joined at once, anything else goes through os.path.normpath (one Python function per link,
    a twentieth of a scan of 10,000 devices)."""
    rest = target.lstrip("./")
    ups, odd = divmod(len(target) - len(rest), 3)
    if (odd or ups >= len(heads) or not rest or "/." in rest or "//" in rest or rest.endswith("/")
            or target[:3 * ups] != "../" * ups):
        return os.path.normpath(os.path.join(base, target))
    return f"{heads[ups]}/{rest}"


def subsystem_paths(subsystem: str) -> Optional[List[str]]:
    """The sys_paths of every device of ``subsystem`` (bus devices, class devices), or None when the
    subsystem has no directory to list (the caller asks libudev)."""
    bases = [f"{SYS}/bus/{subsystem}/devices", f"{SYS}/class/{subsystem}"]
    found: Dict[str, None] = {}
    listed = False
    for base in bases:
        try:
            names = os.listdir(base)
        except (FileNotFoundError, NotADirectoryError):
            continue
        listed = True
        base = os.path.normpath(base)
        heads = _heads(base) if base.startswith("/") else [base]  # a relative SYS: no parents to take
        readlink = os.readlink
        for name in names:
            try:
                target = readlink(f"{base}/{name}")
            except OSError:
                continue  # not a link (a class directory's own files): not a device
            found[resolved(base, heads, target)] = None
    return list(found) if listed else None


class _Properties(Mapping[str, str]):
    """A device's properties, each decoded when asked for (an undecodable one raises Undecodable)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Dict[bytes, bytes]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        value = self._raw[name.encode("utf-8", "surrogateescape")]
        return _decode(f"property {name}", value)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter([_decode("a property name", k) for k in self._raw])

    def __len__(self) -> int:
        return len(self._raw)


# A uevent file's KEY=value lines: each line split at its first "=", a line without one left out (a
# later line of a key wins).  One findall instead of a loop: a third of a full scan's parsing cost.
_UEVENT_LINE = re.compile(rb"^([^=\n]*)=([^\n]*)", re.MULTILINE)


class SysDevice:
    """One device, read from sysfs when a field is first asked for."""

    __slots__ = ("sys_path", "_subsystem", "_uevent", "_props", "_db_read", "_initialized", "_devnode", "_name")

    def __init__(self, sys_path: str, subsystem: Optional[str] = None) -> None:
        self.sys_path = sys_path
        self._subsystem = subsystem
        self._uevent: Optional[Dict[bytes, bytes]] = None
        self._props: Optional[Dict[bytes, bytes]] = None
        self._db_read = False
        self._initialized = False
        self._devnode: Optional[Tuple[Optional[str]]] = None
        self._name: Optional[str] = None

    # --- names ------------------------------------------------------------------------------------

    @property
    def sys_name(self) -> str:
        if self._name is None:
            self._name = strict("its kernel name", self.sys_path.rpartition("/")[2])
        return self._name

    @property
    def subsystem(self) -> str:
        if self._subsystem is None:
            try:
                self._subsystem = os.path.basename(os.readlink(os.path.join(self.sys_path, "subsystem")))
            except OSError:
                self._subsystem = ""
        return strict("its subsystem", self._subsystem)

    def exists(self) -> bool:
        return os.path.exists(f"{self.sys_path}/uevent")

    # --- the uevent file and udev's database ---------------------------------------------------------

    def uevent(self) -> Dict[bytes, bytes]:
        if self._uevent is None:
            self._uevent = dict(_UEVENT_LINE.findall(read_file(f"{self.sys_path}/uevent") or b""))
        return self._uevent

    def _db_id(self) -> str:
        event = self.uevent()
        major, minor = event.get(b"MAJOR"), event.get(b"MINOR")
        subsystem = self._subsystem if self._subsystem is not None else self.subsystem
        if major is not None and minor is not None:
            kind = "b" if subsystem == "block" else "c"
            return f"{kind}{major.decode('ascii', 'replace')}:{minor.decode('ascii', 'replace')}"
        ifindex = event.get(b"IFINDEX")
        if ifindex is not None:
            return f"n{ifindex.decode('ascii', 'replace')}"
        return f"+{subsystem}:{os.path.basename(self.sys_path)}"

    def _all_properties(self) -> Dict[bytes, bytes]:
        """uevent's keys, then udev's (E: lines, DEVLINKS from S: lines), as libudev merges them."""
        if self._props is None:
            props = dict(self.uevent())
            devname = props.get(b"DEVNAME")
            if devname is not None and not devname.startswith(b"/"):
                props[b"DEVNAME"] = b"/dev/" + devname
            props[b"DEVPATH"] = os.fsencode(self.sys_path)[len(SYS):]
            props[b"SUBSYSTEM"] = os.fsencode(self._subsystem if self._subsystem is not None else self.subsystem)
            found = read_file(f"{UDEV_DB}/{self._db_id()}", 1024 * 1024)
            self._initialized = found is not None
            db = found or b""
            links = []
            for line in db.split(b"\n"):
                if line.startswith(b"E:"):
                    key, _, value = line[2:].partition(b"=")
                    props[key] = value
                elif line.startswith(b"S:"):
                    links.append(b"/dev/" + line[2:])
            if links:
                props[b"DEVLINKS"] = b" ".join(links)
            self._props = props
        return self._props

    @property
    def properties(self) -> Mapping[str, str]:
        return _Properties(self._all_properties())

    @property
    def is_initialized(self) -> bool:
        self._all_properties()
        return self._initialized

    @property
    def devtype(self) -> Optional[str]:
        raw = self.uevent().get(b"DEVTYPE")
        return _decode("its DEVTYPE", raw) if raw is not None else None

    @property
    def driver(self) -> Optional[str]:
        raw = self.uevent().get(b"DRIVER")
        if raw is not None:
            return _decode("its driver", raw)
        try:
            return strict("its driver", os.path.basename(os.readlink(os.path.join(self.sys_path, "driver"))))
        except OSError:
            return None

    @property
    def devnode(self) -> Optional[str]:
        if self._devnode is None:
            raw = self.uevent().get(b"DEVNAME")
            name = None if raw is None else _decode("its device node", raw)
            self._devnode = (None if name is None else name if name.startswith("/") else "/dev/" + name,)
        return self._devnode[0]

    # --- attributes and ancestors -----------------------------------------------------------------------

    def attribute(self, name: str) -> Optional[str]:
        """A sysfs attribute as text, stripped; None when absent or unreadable.  Raises Undecodable."""
        raw = read_file(f"{self.sys_path}/{name}")  # None: absent, a directory, or not readable
        # libudev drops the trailing newlines before anything else looks at the value.
        return None if raw is None else _decode(f"attribute {name}", raw.rstrip(b"\n")).strip()

    def numa_nodes(self) -> Tuple[int, ...]:
        """NUMA node of the device or its nearest ancestor that has one (>= 0).  Virtual devices have none."""
        path = self.sys_path
        if path.startswith(_VIRTUAL):
            return ()
        while path.startswith(_DEVICES):
            raw = read_file(f"{path}/numa_node", 32)
            try:
                node = int(raw.strip()) if raw else -1
            except ValueError:
                node = -1
            if node >= 0:
                return (node,)
            path = path.rpartition("/")[0]
        return ()
