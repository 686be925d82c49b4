"""sysfs -> Snapshot: which devices each resource has, with rule-based health.

Devices are read through sysfs.py (sysfs and udev's database, as libudev reads them, at a
fraction of pyudev's cost per device); pyudev is used only for what needs libudev's whole
device list: the descendants of a device (``child_devnodes``), and subsystems without a
directory to list.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import (
    AbstractSet,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from . import sysfs
from .config import ResourceConfig
from .matching import device_id, matches, rule_health
from .model import HEALTHY, UNHEALTHY, Device, Snapshot, natural_key
from .sysfs import SysDevice, Undecodable

log = logging.getLogger(__name__)

# pyudev decodes every name, path and value strictly with the file system encoding (UTF-8 here;
# 0.22 as 0.24), and raises UnicodeDecodeError, a ValueError, for anything else: a net device
# named b"x\xff" (root can create one), a property or an attribute holding such bytes.  That
# device is skipped with a warning naming what could not be read; the rest are served.
SHOWN_BYTES = 128


def escaped(raw: bytes) -> str:
    """``raw`` as one printable line: undecodable bytes and control characters escaped
    (``x\\xff``), cut to SHOWN_BYTES with the length."""
    text = raw[:SHOWN_BYTES].decode("utf-8", "backslashreplace")
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return text if len(raw) <= SHOWN_BYTES else f"{text}... ({len(raw)} bytes)"


def safe_sys_path(device) -> str:  # type: ignore[no-untyped-def]
    """The device's sys_path even when it is not UTF-8: undecodable bytes as surrogates
    (os.fsdecode), so that :func:`shown_path` can print it and :func:`refresh` find it again."""
    try:
        return str(device.sys_path)
    except UnicodeDecodeError as exc:
        return os.fsdecode(bytes(exc.object))


def shown_path(sys_path: str) -> str:
    """A sys_path (possibly from :func:`safe_sys_path`) for a message: bytes escaped."""
    return escaped(os.fsencode(sys_path))


class ScanResult(NamedTuple):
    snapshot: Snapshot
    problems: Tuple[str, ...]


def udev_context(context=None):  # type: ignore[no-untyped-def]
    """``context``, or a pyudev Context made on first use: the daemon loads pyudev only if it needs it."""
    global _CONTEXT
    if context is not None:
        return context
    if _CONTEXT is None:
        import pyudev

        _CONTEXT = pyudev.Context()
    return _CONTEXT


_CONTEXT = None


class Vanished(LookupError):
    """The device left while it was being read; its remove event follows."""


def descendant_devnodes(context, dev: SysDevice) -> List[Tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(node, subsystem) of every descendant with a device node (a PCI card's /dev/accel/accel0),
    in natural order of the nodes.  Raises Undecodable for a descendant that is not text, Vanished
    when the device is gone from sysfs (unplugged since it was read)."""
    import pyudev

    context = udev_context(context)
    own = dev.sys_path
    try:
        device = pyudev.Devices.from_sys_path(context, os.fsencode(own))
    except pyudev.DeviceNotFoundError as exc:  # no LookupError (pyudev 0.22 to 0.24): ours is one
        raise Vanished(str(exc)) from None
    nodes = []
    for child in context.list_devices().match_parent(device):
        try:
            node = child.device_node
            if node and child.sys_path != own:
                nodes.append((node, child.subsystem or ""))
        except UnicodeDecodeError as exc:
            raise Undecodable(f"the udev data of its descendant {shown_path(safe_sys_path(child))}",
                              bytes(exc.object)) from None
    return sorted(nodes, key=lambda n: natural_key(n[0]))


def child_devnodes(context, dev: SysDevice) -> List[str]:  # type: ignore[no-untyped-def]
    """Device nodes of every descendant, sorted (whatever the resource grants)."""
    return [node for node, _ in descendant_devnodes(context, dev)]


def vfio_group_devnode(sys_path: str) -> Tuple[Optional[str], str]:
    """The VFIO group node of the device at ``sys_path`` (/dev/vfio/<n> for its ``iommu_group``
    link to /sys/kernel/iommu_groups/<n>), or None and why not.

    The group node is no sysfs child of the device (it is a class device of its own), so the
    link is the one way from the device to it.
    """
    try:
        target = os.readlink(os.path.join(sys_path, "iommu_group"))
    except OSError:
        return None, "it has no iommu_group (the IOMMU is off, or the device is not isolated)"
    group = os.path.basename(target)
    if not (group.isascii() and group.isdigit()):
        return None, f"its iommu_group link points to {shown_path(target)}, not a group number"
    return f"/dev/vfio/{group}", ""


def evaluate(context, res: ResourceConfig, view: SysDevice,  # type: ignore[no-untyped-def]
             exists: Callable[[str], bool] = os.path.exists,
             withheld: Optional[List[str]] = None) -> Tuple[Optional[Device], str]:
    """One udev device seen as a device of ``res``: (Device, "") if it matches, else (None, why or "").

    Raises :class:`Undecodable`.  ``withheld``, when given, receives the descendants' nodes the
    resource does not grant (``list`` shows them), as ``node (subsystem)``.
    """
    # The subsystem first: a refresh may hand over any device, and one of another subsystem is
    # none of this resource's business, decodable or not.
    if view.subsystem != res.subsystem:
        return None, ""
    sys_path = sysfs.strict("its sys_path", view.sys_path)
    if not matches(res, view):
        return None, ""
    dev_id, why = device_id(res, view)
    if dev_id is None:
        return None, f"{res.name}: {sys_path} skipped: {why}"
    node = view.devnode
    nodes = [node] if node else []
    healthy, reason = rule_health(res, view)
    if res.vfio_group_devnode:
        group_node, no_group = vfio_group_devnode(sys_path)
        if group_node is None:
            healthy, reason = False, f"no VFIO group node: {no_group}"
        elif group_node not in nodes:
            nodes.append(group_node)
    if res.child_devnodes or withheld is not None:
        for node, subsystem in descendant_devnodes(context, view):
            if res.grants_child(subsystem):
                if node not in nodes:
                    nodes.append(node)
            elif withheld is not None:
                withheld.append(f"{node} ({subsystem or 'no subsystem'})")
    gone = [n for n in nodes if not exists(n)]
    missing_extra = [n for n in res.extra_devnodes if not exists(n)] if res.extra_devnodes else []
    if gone:
        healthy, reason = False, f"device node {gone[0]} is missing"
    elif missing_extra:
        healthy, reason = False, f"extra device node {missing_extra[0]} is missing"
    return Device(res.name, dev_id, sys_path, view.sys_name, tuple(nodes), view.numa_nodes(),
                  HEALTHY if healthy else UNHEALTHY, reason), ""


def _evaluate_safely(context, res: ResourceConfig, udev: SysDevice,  # type: ignore[no-untyped-def]
                     exists: Callable[[str], bool],
                     withheld: Optional[List[str]] = None) -> Tuple[Optional[Device], str]:
    try:
        return evaluate(context, res, udev, exists, withheld)
    except Undecodable as exc:
        # The path itself is shown escaped; any other value follows the words naming it.
        value = "" if exc.what == "its sys_path" else f": {escaped(exc.raw)}"
        return None, (f"{res.name}: {shown_path(udev.sys_path)} skipped: {exc.what} is not "
                      f"{sys.getfilesystemencoding()} text{value}")
    except UnicodeDecodeError as exc:  # undecodable data read where no wrapper named it (pyudev's)
        return None, (f"{res.name}: {shown_path(udev.sys_path)} skipped: its udev data is not "
                      f"{sys.getfilesystemencoding()} text: {escaped(bytes(exc.object))}")
    except (OSError, LookupError, ValueError) as exc:  # Vanished is a LookupError
        # A device that vanishes mid-scan: its remove event will follow.
        log.debug("%s: %s vanished during the scan: %s", res.name, shown_path(udev.sys_path), exc)
        return None, ""


class NodeListing:
    """``exists`` for a full scan: each directory of device nodes read once, by name.

    A scan of 10,000 devices otherwise stats 10,000 nodes; one getdents of /dev is a fraction of
    that.  A symlink is followed as os.path.exists would (a dangling one is missing), and so is
    anything that is no plain name in a directory.  Holds the listings for one scan only.
    """

    __slots__ = ("_dirs",)

    def __init__(self) -> None:
        self._dirs: Dict[str, Dict[str, bool]] = {}

    def __call__(self, path: str) -> bool:
        head, _, name = path.rpartition("/")
        if name in ("", ".", "..") or not head:
            return os.path.exists(path)
        entries = self._dirs.get(head)
        if entries is None:
            try:
                with os.scandir(head) as listing:
                    entries = {e.name: e.is_symlink() for e in listing}
            except OSError:
                entries = {}
            self._dirs[head] = entries
        link = entries.get(name)
        if link is None:
            return False
        return os.path.exists(path) if link else True


def _ordered(found: Mapping[str, Device]) -> Dict[str, Device]:
    return {k: found[k] for k in sorted(found, key=natural_key)}


def scan_resource(context, res: ResourceConfig,  # type: ignore[no-untyped-def]
                  exists: Optional[Callable[[str], bool]] = None,
                  withheld: Optional[Dict[str, List[str]]] = None,
                  previous: Optional[Mapping[str, Device]] = None) -> Tuple[Mapping[str, Device], List[str]]:
    """Every device of one resource, keyed by ID, with rule-based health; and the problems met.

    ``exists`` tells whether a device node is there (default: a :class:`NodeListing` of this scan).
    ``previous``: the resource's devices as the last scan or refresh left them.  A device equal to
    its previous one is that very object, and a scan that finds them all and no other returns
    ``previous`` itself (what a rescan finds most often: no sort, no diff, no index to build again).

    Two devices claiming one ID: the one first in sys_path order is advertised, and records the
    other in its ``shadows`` so that :func:`refresh` knows to scan again when it leaves.
    ``withheld``, when given, receives per sys_path the descendants' nodes not granted.
    """
    problems: List[str] = []
    found: Dict[str, Device] = {}
    if exists is None:
        exists = NodeListing()
    for udev in subsystem_devices(context, res.subsystem):
        left_out: Optional[List[str]] = [] if withheld is not None else None
        device, problem = _evaluate_safely(context, res, udev, exists, left_out)
        if problem:
            problems.append(problem)
        if device is None:
            continue
        if withheld is not None and left_out:
            withheld[device.sys_path] = left_out
        if device.id in found:
            other = found[device.id]
            keep, drop = (other, device) if other.sys_path <= device.sys_path else (device, other)
            problems.append(f"{res.name}: ID {device.id!r} of {drop.sys_path} collides with {keep.sys_path}; "
                            f"only {keep.sys_path} is advertised")
            device = keep.replace(shadows=keep.shadows + drop.shadows + (drop.sys_path,))
        found[device.id] = device
    return _kept(found, previous), problems


def _kept(found: Dict[str, Device], previous: Optional[Mapping[str, Device]]) -> Mapping[str, Device]:
    """``found`` in natural order of its IDs, each device equal to its ``previous`` one (shadows too) that
    very object; ``previous`` itself when it holds them all and no other."""
    if not previous:
        return _ordered(found)
    same = True
    was_of = previous.get
    for dev_id, dev in found.items():
        was = was_of(dev_id)
        if was is not None and was == dev and was.shadows == dev.shadows:
            found[dev_id] = was  # the key is there: the dict's size does not change as it is walked
        else:
            same = False
    if len(found) == len(previous) and found.keys() == previous.keys():
        # previous is in natural order already (the last scan's, or as a refresh placed its new IDs).
        return previous if same else {k: found[k] for k in previous}
    return _ordered(found)


def subsystem_devices(context, subsystem: str) -> Iterator[SysDevice]:  # type: ignore[no-untyped-def]
    """Every device of ``subsystem``: listed from sysfs, or by libudev for a subsystem sysfs has no
    directory for.  One at a time: a device's view (its uevent, its properties) is garbage once it
    was looked at, so a scan of 10,000 devices never holds 10,000 of them."""
    paths = sysfs.subsystem_paths(subsystem)
    if paths is None:
        paths = [safe_sys_path(d) for d in udev_context(context).list_devices(subsystem=subsystem)]
    return (SysDevice(p, subsystem) for p in paths)


class Refreshed(NamedTuple):
    devices: Dict[str, Device]  # the resource's devices now, in natural order of their IDs
    problems: List[str]
    at: Dict[str, Optional[Device]]  # each changed sys_path -> its device now (None: none of ours)


def refresh(context, res: ResourceConfig, current: Mapping[str, Device],  # type: ignore[no-untyped-def]
            changes: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists,
            by_path: Optional[Mapping[str, Device]] = None) -> Optional[Refreshed]:
    """``current`` with only the devices at ``changes`` (sys_path -> udev action) looked at again.

    What keeps an event's cost independent of the resource's size: ``by_path`` (``current`` by
    sys_path, which the caller keeps; built here when not given) finds the devices the event
    names, every other device is kept as the very object it was, and the order is kept by
    placing only the new IDs.  None when only a full scan can tell: two devices claiming one
    ID, or a device that hid others with its ID (its ``shadows``) leaving or changing its ID, so
    that one of them is advertised in its place.  The caller then scans the resource.  A
    sys_path may hold surrogates (:func:`safe_sys_path`).
    """
    if by_path is None:
        by_path = {d.sys_path: d for d in current.values()}
    gone: Set[str] = set()
    new: Dict[str, Device] = {}
    at: Dict[str, Optional[Device]] = {}
    problems: List[str] = []
    for sys_path, action in changes.items():
        old = by_path.get(sys_path)
        at[sys_path] = None
        if old is not None:
            gone.add(old.id)
        if action == "remove":
            if old is not None and old.shadows:
                return None
            continue
        udev = SysDevice(sys_path)
        if not udev.exists():
            if old is not None and old.shadows:
                return None
            continue  # gone already; its remove event follows
        device, problem = _evaluate_safely(context, res, udev, exists)
        if problem:
            problems.append(problem)
        if old is not None and old.shadows:
            if device is None or device.id != old.id:
                return None
            device = device.replace(shadows=old.shadows)
        if device is None:
            continue
        other = new.get(device.id) or (current.get(device.id) if device.id not in gone else None)
        if other is not None and other.sys_path != sys_path:
            return None
        new[device.id] = device
        at[sys_path] = device
    return Refreshed(_placed(current, gone, new), problems, at)


def _placed(current: Mapping[str, Device], gone: AbstractSet[str], new: Mapping[str, Device]) -> Dict[str, Device]:
    """``current`` (in natural order) without the IDs ``gone``, with ``new``: an ID ``current`` has
    keeps its place, another goes where a stable sort by :func:`natural_key` puts it (after equal
    keys).  Costs a copy of ``current`` and a binary search per new ID, not a sort.  The copy is
    dict.copy(), whose memcpy-like clone also takes a dict with removed entries (dict() of one
    then inserts entry by entry: 0.5-3 ms at 10,000 devices, at every event after a removal)."""
    out = current.copy() if isinstance(current, dict) else dict(current)
    for dev_id in gone:
        if dev_id not in new:
            del out[dev_id]
    inserted = [dev_id for dev_id in new if dev_id not in out]
    last = next(reversed(out), None) if inserted else None
    out.update(new)  # an ID out has keeps its place; the others are appended
    if not inserted:
        return out
    if len(inserted) == 1 and (last is None or natural_key(last) <= natural_key(inserted[0])):
        return out  # appended, which is its place (a loop device with the highest number)
    if len(inserted) > len(out) // 16:
        return _ordered(out)
    keys = list(out)[:len(out) - len(inserted)]
    for dev_id in inserted:
        key = natural_key(dev_id)
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi) // 2
            if key < natural_key(keys[mid]):
                hi = mid
            else:
                lo = mid + 1
        keys.insert(lo, dev_id)
    return dict(zip(keys, map(out.__getitem__, keys)))


def scan(context, resources: Iterable[ResourceConfig],  # type: ignore[no-untyped-def]
         exists: Optional[Callable[[str], bool]] = None,
         previous: Optional[Mapping[str, Mapping[str, Device]]] = None) -> ScanResult:
    """Every resource scanned (:func:`scan_resource`); ``previous``: their devices now, by resource."""
    previous = previous or {}
    snapshot: Dict[str, Mapping[str, Device]] = {}
    problems: List[str] = []
    for res in resources:
        snapshot[res.name], found = scan_resource(context, res, exists, previous=previous.get(res.name))
        problems.extend(found)
    return ScanResult(snapshot, tuple(problems))


def touched(resources: Sequence[ResourceConfig], paths_of: Mapping[str, AbstractSet[str]],
            subsystem: Optional[str], sys_path: str) -> Dict[str, List[str]]:
    """Per resource, the devices a udev event on (subsystem, sys_path) asks to look at again.

    The event's own device, for resources of its subsystem; and any device of ours above
    it in sysfs, whose child nodes count as its own.  ``paths_of``: per resource, the sys_paths
    of its devices (the inventory keeps them: ``Inventory.paths``).
    The cost is the depth of ``sys_path``, not the number of devices: a burst of 10,000
    loop devices' 20,000 events once took a minute of CPU here.
    """
    ancestors = []
    parent = sys_path.rpartition("/")[0]
    while parent.count("/") > 1:  # below /sys/devices (no device is /sys itself)
        ancestors.append(parent)
        parent = parent.rpartition("/")[0]
    out: Dict[str, List[str]] = {}
    for res in resources:
        paths = [sys_path] if res.subsystem == subsystem else []
        ours = paths_of.get(res.name, ())
        paths.extend(a for a in reversed(ancestors) if a in ours)
        if paths:
            out[res.name] = paths
    return out
