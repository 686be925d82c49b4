"""Immutable values the other modules pass around: devices, snapshots and their diff."""

from __future__ import annotations

import re
from typing import AbstractSet, Any, Dict, List, Mapping, NamedTuple, Tuple

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


class Frozen:
    """A value that cannot change once built (its ``__init__`` sets its slots with object.__setattr__).

    The values here are written out rather than frozen dataclasses: dataclasses generate and compile
    code for each class when its module is imported, which is on the daemon's start path."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")


class Device(Frozen):
    """One advertised device of one resource; immutable (scans and list versions share them).

    Slots on every Python: a device takes 200 bytes less, 2 MiB at 10,000.  Equal (and hashed) by
    every field but ``shadows``.
    """

    __slots__ = ("resource", "id", "sys_path", "sys_name", "devnodes", "numa_nodes", "health", "reason",
                 "shadows")

    resource: str
    id: str
    sys_path: str
    sys_name: str
    devnodes: Tuple[str, ...]
    numa_nodes: Tuple[int, ...]
    health: str
    reason: str
    # sys_paths of devices of the same resource left out because they claim this device's ID
    # (see discovery.scan_resource).  When this device leaves or its ID changes, only a scan can
    # tell which of them takes its place.  Not part of equality: it changes nothing the kubelet sees.
    shadows: Tuple[str, ...]

    def __init__(self, resource: str, id: str, sys_path: str, sys_name: str,
                 devnodes: Tuple[str, ...], numa_nodes: Tuple[int, ...] = (), health: str = HEALTHY,
                 reason: str = "", shadows: Tuple[str, ...] = ()) -> None:
        init = object.__setattr__
        init(self, "resource", resource)
        init(self, "id", id)
        init(self, "sys_path", sys_path)
        init(self, "sys_name", sys_name)
        init(self, "devnodes", devnodes)
        init(self, "numa_nodes", numa_nodes)
        init(self, "health", health)
        init(self, "reason", reason)
        init(self, "shadows", shadows)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        that: Device = other  # type: ignore[assignment]  # the class is ours (not an assert: the hot path)
        # One tuple comparison, as a dataclass's: a rescan compares every device it finds.
        return ((self.id, self.sys_path, self.health, self.devnodes, self.reason, self.numa_nodes, self.sys_name,
                 self.resource) ==
                (that.id, that.sys_path, that.health, that.devnodes, that.reason, that.numa_nodes, that.sys_name,
                 that.resource))

    def __hash__(self) -> int:
        return hash((self.resource, self.id, self.sys_path, self.sys_name, self.devnodes, self.numa_nodes,
                     self.health, self.reason))

    def __repr__(self) -> str:
        return "Device(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"

    def replace(self, **changes: Any) -> Device:
        """A copy with ``changes`` (field name -> value)."""
        unknown = changes.keys() - set(self.__slots__)
        if unknown:
            raise TypeError(f"Device has no field(s) {', '.join(sorted(unknown))}")
        return Device(**{**{n: getattr(self, n) for n in self.__slots__}, **changes})

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY


# resource -> device id -> Device.  Built once per scan and never mutated.
Snapshot = Mapping[str, Mapping[str, Device]]


class CdiView(NamedTuple):
    """A resource's CDI spec as the runtime reads it now (cdi.py), for Allocate to name its devices."""

    names: Mapping[str, str]  # advertised ID -> fully qualified CDI device name (kind=name)
    path: str  # the spec file
    problem: str = ""  # why the file does not hold ``names`` ("": it does)


class ResourceDiff(Frozen):
    """How one resource's devices changed: added, changed (old, new) and removed; immutable."""

    __slots__ = ("added", "changed", "removed")

    added: Tuple[Device, ...]
    changed: Tuple[Tuple[Device, Device], ...]  # (old, new)
    removed: Tuple[Device, ...]

    def __init__(self, added: Tuple[Device, ...] = (), changed: Tuple[Tuple[Device, Device], ...] = (),
                 removed: Tuple[Device, ...] = ()) -> None:
        object.__setattr__(self, "added", added)
        object.__setattr__(self, "changed", changed)
        object.__setattr__(self, "removed", removed)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ResourceDiff)
        return (self.added, self.changed, self.removed) == (other.added, other.changed, other.removed)

    def __hash__(self) -> int:
        return hash((self.added, self.changed, self.removed))

    def __repr__(self) -> str:
        return f"ResourceDiff(added={self.added!r}, changed={self.changed!r}, removed={self.removed!r})"

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def __len__(self) -> int:
        """How many devices the diff names."""
        return len(self.added) + len(self.changed) + len(self.removed)


def diff(old: Snapshot, new: Snapshot) -> Dict[str, ResourceDiff]:
    """Per resource, what changed from ``old`` to ``new``; resources without change are left out.

    Each part is in the order of its snapshot (natural order of the IDs: discovery keeps it).  A
    device that is the very same object in both is unchanged without being compared: a refresh
    keeps every device it did not look at, so an event at 10,000 devices compares only its own.
    """
    out: Dict[str, ResourceDiff] = {}
    for name in set(old) | set(new):
        before = old.get(name, {})
        after = new.get(name, {})
        if before is after:
            continue
        added: List[Device] = []
        changed: List[Tuple[Device, Device]] = []
        get = before.get
        for key, dev in after.items():
            was = get(key)
            if was is None:
                added.append(dev)
            elif was is not dev and was != dev:
                changed.append((was, dev))
        kept = len(after) - len(added)
        removed = tuple(dev for key, dev in before.items() if key not in after) if len(before) > kept else ()
        d = ResourceDiff(tuple(added), tuple(changed), removed)
        if d:
            out[name] = d
    return out


def diff_of(before: Mapping[str, Device], after: Mapping[str, Device], ids: AbstractSet[str]) -> ResourceDiff:
    """The diff of one resource from ``before`` to ``after`` where only ``ids`` may differ: every other ID
    is the very same object in both (what a refresh keeps), so the cost is that of ``ids``, not of the
    resource.  Parts in the natural order of their IDs (the snapshots' order, but for equal keys)."""
    added: List[Device] = []
    changed: List[Tuple[Device, Device]] = []
    removed: List[Device] = []
    for dev_id in sorted(ids, key=lambda i: (natural_key(i), i)):
        was, now = before.get(dev_id), after.get(dev_id)
        if was is None:
            if now is not None:
                added.append(now)
        elif now is None:
            removed.append(was)
        elif was is not now and was != now:
            changed.append((was, now))
    return ResourceDiff(tuple(added), tuple(changed), tuple(removed))


# How much of a request's text an error message or log line repeats: the kubelet and local
# clients may send IDs of megabytes, and an echo of each would fill the log and the gRPC
# status (whose metadata the peer refuses above its limit).
QUOTE_LIMIT = 128

_RUNS = re.compile(r"[0-9]+|[^0-9]+")


def quote_id(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a message shows it: repr() of at most ``limit`` characters, and the length when cut.

    ``quote_id("a" * 300)`` is the repr() of 128 a's followed by ``... (300 characters)``; repr()
    escapes control characters, so the result is one printable line of bounded length.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def natural_key(text: str) -> Tuple[object, ...]:
    """Sort key that orders loop2 before loop10.

    A run of ASCII digits (not isdigit(): '\u00b2' is no number here) compares as a number: by its
    length without leading zeros, then by its digits, which is numeric order without int() and
    its limit on long runs (IDs come from the kubelet and local clients: any text, any length).
    Numbers sort before words at the same position; runs that differ only in leading zeros (01, 1)
    compare equal, so callers that need a total order break the tie with the text itself.
    Each run is three items of one flat tuple, (0, length, digits) or (1, 0, word): the order of the
    runs' triples, and a third cheaper to compare than a list of them (a sort of 10,000 IDs: 72 -> 45 ms).
    """
    parts: List[object] = []
    for run in _RUNS.findall(text):
        if "0" <= run[0] <= "9":
            digits = run.lstrip("0")
            parts += (0, len(digits), digits)
        else:
            parts += (1, 0, run)
    return tuple(parts)
