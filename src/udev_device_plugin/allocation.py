"""What to answer the kubelet's Allocate and GetPreferredAllocation: pure functions.

IDs here are the advertised IDs (sharing.py): with ``replicas`` above 1 several of them lead to one
device, which an allocation then gives once (its nodes once, its ID once in ``{ids}``, counted once
in ``{count}``: the templates name devices, what a container can open, not shares of them).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .config import ResourceConfig
from .model import CdiView, Device, natural_key, quote_id

# How many IDs a refusal names; the rest are counted (a request may name thousands).
NAMED_IDS = 8
# Our own IDs are at most 128 characters; unknown ones are sorted by this much of them.
SORT_PREFIX = 256


class AllocationError(Exception):
    """A request we refuse; ``kind`` is ``unknown`` (INVALID_ARGUMENT), ``unhealthy``, ``conflict``
    (the config maps two nodes to one container path) or ``cdi`` (cdi_only, and no CDI device to
    give), the last three FAILED_PRECONDITION."""

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


class ContainerAllocation(NamedTuple):
    devices: Tuple[DeviceNode, ...]
    mounts: Tuple[MountSpec, ...]
    envs: Tuple[Tuple[str, str], ...]
    annotations: Tuple[Tuple[str, str], ...]
    cdi_devices: Tuple[str, ...] = ()  # fully qualified CDI device names, one per device


def check_ids(resource: str, devices: Mapping[str, Device], ids: Sequence[str]) -> List[Tuple[str, Device]]:
    """The devices for ``ids``, each once, with the first ID the request names it by (in request
    order); refuse the whole request on the first unknown, then unhealthy, ID."""
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
    picked: Dict[str, Tuple[str, Device]] = {}
    for i in ids:
        dev = devices[i]
        if dev.id not in picked:
            picked[dev.id] = (i, dev)
    return list(picked.values())


def _more(named: Sequence[str]) -> str:
    return f" and {len(named) - NAMED_IDS} more" if len(named) > NAMED_IDS else ""


def allocate(res: ResourceConfig, devices: Mapping[str, Device], ids: Sequence[str],
             cdi: Optional[CdiView] = None) -> ContainerAllocation:
    """The answer for one ContainerAllocateRequest: device nodes, mounts, env, annotations and, with
    ``cdi = yes``, the CDI devices of ``cdi`` (the resource's spec as written; None: not written).

    ``devices`` maps each advertised ID to its device.  With ``cdi_only`` the device nodes are left
    to the CDI devices (still checked for clashing container paths); a device with nodes but no CDI
    device then is refused, as is every request while the spec could not be written.
    """
    picked = check_ids(res.name, devices, ids)
    chosen = [dev for _, dev in picked]
    cdi_devices = _cdi_devices(res, picked, cdi) if res.cdi else ()
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
    return ContainerAllocation(() if res.cdi_only else tuple(nodes), mounts, envs, annotations, cdi_devices)


def _cdi_devices(res: ResourceConfig, picked: Sequence[Tuple[str, Device]], cdi: Optional[CdiView]) -> Tuple[str, ...]:
    """One CDI device per device (the name of the first ID the request gives it by)."""
    if cdi is None or cdi.problem:
        if res.cdi_only:
            why = cdi.problem if cdi is not None else "not written yet"
            raise AllocationError("cdi", f"{res.name}: its CDI spec is not current ({why}), and with cdi_only = yes "
                                  "the CDI devices are all an allocation gives")
        return ()  # the device nodes below serve a runtime without the spec
    names: List[str] = []
    missing: List[str] = []
    for advertised_id, dev in picked:
        name = cdi.names.get(advertised_id)
        if name is not None:
            names.append(name)
        elif dev.devnodes:
            missing.append(advertised_id)
    if missing and res.cdi_only:
        raise AllocationError("cdi", f"{res.name}: no CDI device in the spec for "
                              f"{', '.join(quote_id(i) for i in missing[:NAMED_IDS])}{_more(missing)}, "
                              "and with cdi_only = yes the CDI devices are all an allocation gives")
    return tuple(names)


def container_path(res: ResourceConfig, dev: Optional[Device], node: str) -> str:
    """Where ``node`` (of ``dev``; None: a shared extra node) lands in the container."""
    return _container_path(res, dev, node)


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
              size: int, replica_of: Optional[Mapping[str, int]] = None, replicas: int = 1,
              policy: str = "spread") -> List[str]:
    """Choose ``size`` IDs from ``available``: ``must_include`` first, then NUMA-aligned ones.

    ``devices`` maps each advertised ID to its device; ``replica_of`` gives each ID's replica
    number (sharing.py; absent: 0) and ``replicas`` how many IDs each device has.

    With devices already chosen, candidates on their NUMA nodes come first; otherwise the NUMA
    node with the most free candidates is filled first, then the next.  Within that order, the
    replicas of one device are taken as ``policy`` says: ``spread`` takes one replica of each
    device before a second of any (a device with fewer of its replicas in use by others first),
    ``pack`` fills the devices this request already has, then the devices others use most, so
    that whole devices stay free.  Ties follow the natural order of the device IDs, then the
    replica numbers, so the answer is deterministic.  IDs we do not know or that are unhealthy
    come last, only to make up the size.  Fewer than ``size`` are returned only when
    ``available`` is short.
    """
    if size <= 0:
        return []
    replica_of = replica_of or {}
    avail = list(dict.fromkeys(available))
    avail_set = set(avail)
    result = [i for i in dict.fromkeys(must_include) if i in avail_set][:size]
    if len(result) >= size:
        return result
    taken = set(result)
    # One pass over the candidates groups the usable ones by device; the ranking is per device
    # (the kubelet sends every free ID: 10,000 with 100 devices of 100 replicas).
    of_device: Dict[str, List[str]] = {}
    device_of: Dict[str, Device] = {}
    rest: List[str] = []
    for i in avail:
        if i in taken:
            continue
        dev = devices.get(i)
        if dev is None or not dev.healthy:
            rest.append(i)  # Allocate would refuse these: only to make up the size
            continue
        group = of_device.get(dev.id)
        if group is None:
            group = of_device[dev.id] = []
            device_of[dev.id] = dev
        group.append(i)
    chosen: Counter = Counter(dev.id for dev in (devices.get(i) for i in result) if dev is not None)
    free_per_node: Counter = Counter()
    for device_id, ids in of_device.items():
        for n in device_of[device_id].numa_nodes:
            free_per_node[n] += len(ids)
        if len(ids) > 1:
            ids.sort(key=lambda i: (replica_of.get(i, 0), i))
    anchor = {n for i in result if i in devices for n in devices[i].numa_nodes}
    # Rank NUMA nodes: those of already-chosen devices, then by most free, then lowest number.
    node_rank: Dict[int, Tuple[int, int, int]] = {
        n: (0 if n in anchor else 1, -count, n) for n, count in free_per_node.items()
    }

    def numa(device_id: str) -> Tuple[int, int, int]:
        # Devices without NUMA information come after every NUMA-local one.
        return min((node_rank[n] for n in device_of[device_id].numa_nodes), default=(2, 0, 0))

    def in_use(device_id: str) -> int:
        # Replicas of the device that other containers hold (the kubelet lists must_include as available).
        return replicas - len(of_device[device_id]) - chosen[device_id]

    # Natural order of the device IDs, the ID itself breaking ties (loop01/loop1): the kubelet sends
    # IDs in no set order, and the answer must not depend on it.
    order = {d: k for k, d in enumerate(sorted(of_device, key=lambda d: (natural_key(d), d)))}
    by_numa: Dict[Tuple[int, int, int], List[str]] = {}
    for device_id in sorted(of_device, key=order.__getitem__):
        by_numa.setdefault(numa(device_id), []).append(device_id)
    need = size - len(result)
    out: List[str] = []
    for rank in sorted(by_numa):
        group = by_numa[rank]
        if policy == "pack":
            group.sort(key=lambda d: (0 if chosen[d] else 1, -in_use(d), order[d]))
            for device_id in group:
                out.extend(of_device[device_id][:need - len(out)])
                if len(out) >= need:
                    break
        else:
            # Spread: a device's j-th candidate belongs to round chosen + j; each round takes one
            # replica of each device that has one left, the least used devices first.
            group.sort(key=lambda d: (in_use(d), order[d]))
            last = max(chosen[d] + len(of_device[d]) for d in group)
            r = min(chosen[d] for d in group)
            while r < last and len(out) < need:
                for device_id in group:
                    j = r - chosen[device_id]
                    if 0 <= j < len(of_device[device_id]):
                        out.append(of_device[device_id][j])
                        if len(out) >= need:
                            break
                r += 1
        if len(out) >= need:
            break
    if len(out) < need:
        # Any text the kubelet sends (megabytes, say): ordered by a bounded prefix, then the whole
        # ID, which keeps the order total and the cost of a sort linear in the request.
        rest.sort(key=lambda i: (natural_key(i[:SORT_PREFIX]), i))
        out.extend(rest[:need - len(out)])
    return result + out
