"""Immutable values the other modules pass around: devices, snapshots and their diff."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


@dataclass(frozen=True)
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

    @property
    def healthy(self) -> bool:
        return self.health == HEALTHY


# resource -> device id -> Device.  Built once per scan and never mutated.
Snapshot = Mapping[str, Mapping[str, Device]]


@dataclass(frozen=True)
class ResourceDiff:
    added: Tuple[Device, ...] = ()
    changed: Tuple[Tuple[Device, Device], ...] = ()  # (old, new)
    removed: Tuple[Device, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff(old: Snapshot, new: Snapshot) -> Dict[str, ResourceDiff]:
    """Per resource, what changed from ``old`` to ``new``; resources without change are left out."""
    out: Dict[str, ResourceDiff] = {}
    for name in set(old) | set(new):
        before = old.get(name, {})
        after = new.get(name, {})
        added = tuple(after[i] for i in sorted(set(after) - set(before)))
        removed = tuple(before[i] for i in sorted(set(before) - set(after)))
        changed = tuple((before[i], after[i]) for i in sorted(set(before) & set(after)) if before[i] != after[i])
        d = ResourceDiff(added, changed, removed)
        if d:
            out[name] = d
    return out


def natural_key(text: str) -> List[object]:
    """Sort key that orders loop2 before loop10."""
    parts: List[object] = []
    num = ""
    word = ""
    for ch in text:
        if "0" <= ch <= "9":  # not isdigit(): int() refuses '²'
            if word:
                parts.append((1, word))
                word = ""
            num += ch
        else:
            if num:
                parts.append((0, int(num)))
                num = ""
            word += ch
    if num:
        parts.append((0, int(num)))
    if word:
        parts.append((1, word))
    return parts
