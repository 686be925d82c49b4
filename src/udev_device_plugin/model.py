"""Immutable values the other modules pass around: devices, snapshots and their diff."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import AbstractSet, Dict, List, Mapping, NamedTuple, Tuple

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


# Where the dataclass can have slots (Python 3.10 on), a device takes 200 bytes less: 2 MiB at 10,000.
_SLOTS: Dict[str, bool] = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclass(frozen=True, **_SLOTS)
class Device:
    """One advertised device of one resource."""

    resource: str
    id: str
    sys_path: str
    sys_name: str
    devnodes: Tuple[str, ...]
    numa_nodes: Tuple[int, ...] = ()
    health: str = HEALTHY
    reason: str = ""
    # sys_paths of devices of the same resource left out because they claim this device's ID
    # (see discovery.scan_resource).  When this device leaves or its ID changes, only a scan can
    # tell which of them takes its place.  Not part of equality: it changes nothing the kubelet sees.
    shadows: Tuple[str, ...] = field(default=(), compare=False)

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


@dataclass(frozen=True)
class ResourceDiff:
    added: Tuple[Device, ...] = ()
    changed: Tuple[Tuple[Device, Device], ...] = ()  # (old, new)
    removed: Tuple[Device, ...] = ()

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
