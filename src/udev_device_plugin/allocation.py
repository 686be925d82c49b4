"""What to answer the kubelet's Allocate and GetPreferredAllocation: pure functions."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .config import ResourceConfig
from .model import Device, natural_key, quote_id

# How many IDs a refusal names; the rest are counted (a request may name thousands).
NAMED_IDS = 8
# Our own IDs are at most 128 characters; unknown ones are sorted by this much of them.
SORT_PREFIX = 256


class AllocationError(Exception):
    """A request we refuse; ``kind`` is ``unknown`` (INVALID_ARGUMENT), ``unhealthy`` or ``conflict``
    (FAILED_PRECONDITION: the config maps two nodes to one container path)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DeviceNode(NamedTuple):
    host_path: str
    container_path: str
    permissions: str


class MountSpec(NamedTuple):
    host_path: str
    container_path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerAllocation:
    devices: Tuple[DeviceNode, ...]
    mounts: Tuple[MountSpec, ...]
    envs: Tuple[Tuple[str, str], ...]
    annotations: Tuple[Tuple[str, str], ...]


def check_ids(resource: str, devices: Mapping[str, Device], ids: Sequence[str]) -> List[Device]:
    """The devices for ``ids``; refuse the whole request on the first unknown, then unhealthy, ID."""
    if not ids:
        raise AllocationError("unknown", f"{resource}: the request names no device")
    unknown = [i for i in dict.fromkeys(ids) if i not in devices]
    if unknown:
        raise AllocationError("unknown", f"{resource}: unknown device ID(s) "
                              f"{', '.join(quote_id(i) for i in unknown[:NAMED_IDS])}{_more(unknown)}")
    sick = [i for i in dict.fromkeys(ids) if not devices[i].healthy]
    if sick:
        reasons = "; ".join(f"{quote_id(i)}: {devices[i].reason or 'unhealthy'}" for i in sick[:NAMED_IDS])
        raise AllocationError("unhealthy", f"{resource}: device(s) not healthy: {reasons}{_more(sick)}")
    return [devices[i] for i in dict.fromkeys(ids)]


def _more(named: Sequence[str]) -> str:
    return f" and {len(named) - NAMED_IDS} more" if len(named) > NAMED_IDS else ""


def allocate(res: ResourceConfig, devices: Mapping[str, Device], ids: Sequence[str]) -> ContainerAllocation:
    """The answer for one ContainerAllocateRequest: device nodes, mounts, env and annotations."""
    chosen = check_ids(res.name, devices, ids)
    nodes: List[DeviceNode] = []
    seen = set()
    for dev in chosen:
        for node in dev.devnodes:
            if node in seen:
                continue
            seen.add(node)
            nodes.append(DeviceNode(node, _container_path(res, dev, node), res.permissions))
    for node in res.extra_devnodes:
        if node not in seen:
            seen.add(node)
            nodes.append(DeviceNode(node, _container_path(res, None, node), res.permissions))
    paths: Dict[str, str] = {}
    for n in nodes:
        if n.container_path in paths:
            raise AllocationError("conflict", f"{res.name}: container_path {res.container_path.text!r} maps both "
                                  f"{paths[n.container_path]} and {n.host_path} to {n.container_path}")
        paths[n.container_path] = n.host_path
    values = {
        "ids": ",".join(d.id for d in chosen),
        "devnodes": ",".join(n.host_path for n in nodes),
        "count": str(len(chosen)),
        "resource": res.name,
    }
    mounts = tuple(MountSpec(os.path.normpath(m.host_path.render(values)),
                             os.path.normpath(m.container_path.render(values)), m.read_only)
                   for m in res.mounts)
    envs = tuple((k, t.render(values)) for k, t in res.env)
    annotations = tuple((k, t.render(values)) for k, t in res.annotations)
    return ContainerAllocation(tuple(nodes), mounts, envs, annotations)


def _container_path(res: ResourceConfig, dev: Optional[Device], node: str) -> str:
    if res.container_path.text == "{devnode}":
        return node  # the default: the host path, already normalized by udev
    if dev is None and ("{id}" in res.container_path.text or "{sys_name}" in res.container_path.text):
        return node  # a shared extra node belongs to no device: it keeps its host path
    values = {
        "devnode": node,
        "name": node[len("/dev/"):] if node.startswith("/dev/") else os.path.basename(node),
        "id": dev.id if dev else "",
        "sys_name": dev.sys_name if dev else "",
        "resource": res.name,
    }
    return os.path.normpath(res.container_path.render(values))


def preferred(devices: Mapping[str, Device], available: Sequence[str], must_include: Sequence[str],
              size: int) -> List[str]:
    """Choose ``size`` IDs from ``available``: ``must_include`` first, then NUMA-aligned ones.

    With devices already chosen, candidates on their NUMA nodes come first; otherwise
    the NUMA node with the most free candidates is filled first, then the next. Ties
    and order within a node follow the natural order of the IDs, so the answer is
    deterministic. IDs we do not know or that are unhealthy come last, only to make up
    the size. Fewer than ``size`` are returned only when ``available`` is short.
    """
    if size <= 0:
        return []
    avail = list(dict.fromkeys(available))
    avail_set = set(avail)
    result = [i for i in dict.fromkeys(must_include) if i in avail_set][:size]
    if len(result) >= size:
        return result
    taken = set(result)
    candidates = [i for i in avail if i not in taken]

    def nodes_of(i: str) -> Tuple[int, ...]:
        dev = devices.get(i)
        return dev.numa_nodes if dev else ()

    def usable(i: str) -> bool:
        dev = devices.get(i)
        return dev is not None and dev.healthy

    free_per_node: Counter = Counter(n for i in candidates if usable(i) for n in nodes_of(i))
    anchor = {n for i in result for n in nodes_of(i)}
    # Rank NUMA nodes: those of already-chosen devices, then by most free, then lowest number.
    node_rank: Dict[int, Tuple[int, int, int]] = {
        n: (0 if n in anchor else 1, -count, n) for n, count in free_per_node.items()
    }

    def rank(i: str) -> Tuple[Tuple[int, int, int], List[Tuple[int, int, str]], str]:
        if not usable(i):
            # Unknown or unhealthy: Allocate would refuse these, so only to make up the size.
            # Any text the kubelet sends (megabytes, say): ordered by a bounded prefix, then the
            # whole ID, which keeps the order total and the cost of a sort linear in the request.
            return (3, 0, 0), natural_key(i[:SORT_PREFIX]), i
        ranks = [node_rank[n] for n in nodes_of(i)]
        # Devices without NUMA information come after every NUMA-local one. The ID itself
        # breaks natural-order ties (loop01/loop1), as the kubelet sends IDs in no set order.
        return (min(ranks) if ranks else (2, 0, 0)), natural_key(i), i

    candidates.sort(key=rank)
    return result + candidates[:size - len(result)]
