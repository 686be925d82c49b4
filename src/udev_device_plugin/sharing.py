"""Sharing: each device advertised as ``replicas`` IDs, and the ListAndWatch message that lists them.

Pure: plain values in, plain values out (no gRPC, no udev).

With ``replicas = 1`` (the default) a device's ID is advertised as it is.  With ``replicas = N > 1``
a device ``fuse`` is advertised as ``fuse::0`` ... ``fuse::N-1``, the scheme NVIDIA's device plugin
uses for time-slicing (so dashboards and scripts that know it read ours); the kubelet treats an ID
as an opaque string (it validates none) and counts each as one unit of the resource.  Every
replica carries its device's health and NUMA nodes, so a device that turns unhealthy takes all its
replicas with it, and one that leaves takes all of them away.  Replica IDs are looked up in a table
built with the list, never parsed: a device whose own ID contains ``::`` is no ambiguity.

The list is encoded by hand (``encode_device``): the message is ``repeated Device devices = 1``,
whose bytes are the concatenation of each entry, so a device's entries are built once and kept
while the device stays as it is.  The generic protobuf encoder took 245 ms for 10,000 entries on
EL9's pure-Python protobuf 3.14 (19 ms with upb), on the event loop, at every health change;
this takes 9-14 ms once, and a health change re-encodes only that device.  The bytes are those
protobuf writes (tests/unit/test_sharing.py compares them on every stack).

The kubelet's gRPC client reads messages of at most 4 MiB (grpc-go's default; the device manager
sets no other).  A list that would be larger would break the stream and lose the whole resource,
so :func:`advertise` leaves out whole devices, last in the list first, until it fits, and says so.
"""

from __future__ import annotations

from array import array
from itertools import accumulate, compress, islice, repeat
from operator import is_not, not_
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

from .model import Device, ResourceDiff, natural_key
from .wire import encode_varint as _varint

# grpc-go's default receive limit, which the kubelet's device plugin client keeps, less room for
# the frame and a margin.
LIST_LIMIT = 4 * 1024 * 1024 - 64 * 1024
SEPARATOR = "::"


def replica_ids(device_id: str, replicas: int) -> Tuple[str, ...]:
    """The IDs ``device_id`` is advertised as: itself with one replica, else ``<id>::<k>`` for k < replicas."""
    if replicas <= 1:
        return (device_id,)
    return tuple(f"{device_id}{SEPARATOR}{k}" for k in range(replicas))


def _field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data


def encode_device(dev: Device, ids: Tuple[str, ...]) -> bytes:
    """The ListAndWatchResponse entries (field 1, one per ID) of ``dev`` advertised as ``ids``."""
    # Device: 1 ID string; 2 health string; 3 topology TopologyInfo (1 nodes repeated NUMANode (1 ID int64)).
    tail = _field(0x12, dev.health.encode()) if dev.health else b""
    if dev.numa_nodes:
        # proto3 leaves a zero ID out: NUMA node 0 is an empty NUMANode message.
        tail += _field(0x1A, b"".join(_field(0x0A, b"\x08" + _varint(n) if n else b"") for n in dev.numa_nodes))
    parts: List[bytes] = []
    for device_id in ids:
        raw = device_id.encode("utf-8", "surrogateescape")
        body = (_field(0x0A, raw) if raw else b"") + tail
        parts.append(_field(0x0A, body))
    return b"".join(parts)


class Advertised(NamedTuple):
    """What the kubelet sees of one resource, and the tables Allocate and the rest look IDs up in."""

    devices: Mapping[str, Device]  # advertised ID -> its device (the devices themselves with one replica)
    replica_of: Mapping[str, int]  # advertised ID -> its replica number (empty with one replica)
    ids_of: Mapping[str, Tuple[str, ...]]  # device ID -> its advertised IDs (left-out devices absent)
    replicas: int
    payload: bytes  # the serialized ListAndWatchResponse
    left_out: Tuple[str, ...]  # devices not advertised: the list would pass LIST_LIMIT


def _own_entry(dev: Device) -> bytes:
    """The entry of ``dev`` advertised as itself (one replica)."""
    return encode_device(dev, (dev.id,))


def _same_entry(old: Optional[Device], new: Device) -> bool:
    """Whether ``old``'s entries (of the same ID) are ``new``'s: the bytes hold only its ID, health and NUMA nodes."""
    return old is not None and old.health == new.health and old.numa_nodes == new.numa_nodes


# Told of more changes than this at once, the encoder builds the list again from the devices (one
# pass of C-level lookups) rather than copy the whole message once for each.
_MAX_EDITS = 32


def _spliced(payload: bytes, start: int, length: int, part: bytes) -> bytes:
    """``payload`` with the ``length`` bytes at ``start`` replaced by ``part``: one copy."""
    view = memoryview(payload)
    return b"".join((view[:start], part, view[start + length:]))


def _bisect(ids: List[str], key: Tuple[object, ...], right: bool) -> int:
    """Where ``key`` goes in ``ids`` (natural order): before (left) or after (right) the equal keys."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        k = natural_key(ids[mid])
        if k < key or (right and k == key):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _find(ids: List[str], device_id: str) -> int:
    """The index of ``device_id`` in ``ids`` (the list in natural order): a binary search, then the run of
    equal keys (which may be in any order).  ValueError when it is not there."""
    key = natural_key(device_id)
    i = _bisect(ids, key, right=False)
    while i < len(ids) and ids[i] != device_id and natural_key(ids[i]) == key:
        i += 1
    if i < len(ids) and ids[i] == device_id:
        return i
    raise ValueError(device_id)


def _places(ids: List[str], devices: Mapping[str, Device], added: Tuple[Device, ...]) -> List[Tuple[int, Device]]:
    """Where each added device goes in ``ids``, in insertion order: after the equal keys, where discovery
    places a new ID (``discovery._placed``).  Two added devices with one key (whose order among
    themselves discovery decides) are placed by their order in ``devices``: a pass over it."""
    keys = [natural_key(d.id) for d in added]
    if len(set(keys)) == len(keys):
        # Positions in the list before any insertion, in order; each one before shifts the rest by one.
        found = sorted((_bisect(ids, k, right=True), k, n) for n, k in enumerate(keys))
        return [(pos + shift, added[n]) for shift, (pos, _, n) in enumerate(found)]
    order = list(devices)
    return sorted(((order.index(d.id), d) for d in added), key=lambda pd: pd[0])


class _OwnIds(Mapping[str, Tuple[str, ...]]):
    """``ids_of`` with one replica: each advertised device is its one ID (no table to build)."""

    __slots__ = ("_table",)

    def __init__(self, table: Mapping[str, Device]) -> None:
        self._table = table

    def __getitem__(self, device_id: str) -> Tuple[str, ...]:
        if device_id in self._table:
            return (device_id,)
        raise KeyError(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class Encoder:
    """Keeps each device's encoded entries while the device's ID, health and NUMA nodes and ``replicas``
    stay the same.

    A list that differs in one device of 10,000 costs a pass of C-level lookups and one join,
    not 10,000 comparisons: the ListAndWatch message after a hotplug event is built in ~1 ms.
    The entries are kept where they are, in the last message: what the encoder holds per device is
    one ID in a list and the entry's size (12 bytes; separate bytes objects took ~200 at 10,000
    devices), besides the device table and the message, which the resource holds anyway.
    """

    def __init__(self) -> None:
        self._replicas = 0
        # The last list as advertised: the table it was made of, its device IDs in order, the size of
        # each one's entries, and the message (what :meth:`advertise` updates when told what changed).
        self._devices: Mapping[str, Device] = {}
        self._ids: List[str] = []
        self._sizes = array("I")
        self._payload = b""
        self._ids_of: Mapping[str, Tuple[str, ...]] = {}  # with replicas > 1: each device's advertised IDs
        self._complete = False  # the last list left out no device

    def advertise(self, devices: Mapping[str, Device], replicas: int, limit: int = LIST_LIMIT,
                  change: Optional[ResourceDiff] = None) -> Advertised:
        """The list of ``devices``.  ``change``: what differs from the last list this encoder made
        (the inventory's diff), so that only those devices are looked at: at 10,000 devices a
        hotplug event then costs a few list operations and one copy of the message (~1 ms here)
        instead of a pass over every device (~5 ms).  Without it, where it cannot apply, or where
        it names more than a few devices, every device."""
        if change is not None and replicas == self._replicas == 1 and self._complete and len(change) <= _MAX_EDITS:
            got = self._update(devices, change, limit)
            if got is not None:
                return got
        return self._advertise(devices, replicas, limit)

    def _update(self, devices: Mapping[str, Device], change: ResourceDiff, limit: int) -> Optional[Advertised]:
        ids, sizes, payload = self._ids, self._sizes, self._payload
        try:
            for dev in change.removed:
                i = _find(ids, dev.id)
                payload = _spliced(payload, sum(islice(sizes, i)), sizes[i], b"")
                del ids[i], sizes[i]
            for _, dev in change.changed:
                i = _find(ids, dev.id)
                part = _own_entry(dev)
                payload = _spliced(payload, sum(islice(sizes, i)), sizes[i], part)
                sizes[i] = len(part)
            if change.added:
                for pos, dev in _places(ids, devices, change.added):
                    part = _own_entry(dev)
                    payload = _spliced(payload, sum(islice(sizes, pos)), 0, part)
                    ids.insert(pos, dev.id)
                    sizes.insert(pos, len(part))
        except ValueError:  # not the list it was told about: build it from the devices
            self._replicas = 0
            return None
        if len(ids) != len(devices) or len(payload) > limit:
            self._replicas = 0
            return None
        self._devices, self._payload = devices, payload
        return Advertised(devices, {}, _OwnIds(devices), 1, payload, ())

    def _advertise(self, devices: Mapping[str, Device], replicas: int, limit: int) -> Advertised:
        if replicas != self._replicas:
            self._devices, self._ids, self._sizes, self._payload, self._ids_of = {}, [], array("I"), b"", {}
            self._replicas = replicas
        # The entries kept, by ID: views into the last message, for this pass only.
        last = memoryview(self._payload)
        kept = dict(zip(self._ids, map(last.__getitem__, map(slice, accumulate(self._sizes, initial=0),
                                                               accumulate(self._sizes)))))
        values = list(devices.values())
        was = list(map(self._devices.get, devices))
        parts: List[Union[bytes, memoryview]] = list(map(kept.get, devices, repeat(b"")))  # b"": none kept
        del kept
        ids_of = self._ids_of
        for i in compress(range(len(values)), map(is_not, was, values)):
            if parts[i] and not _same_entry(was[i], values[i]):
                parts[i] = b""
        for i in compress(range(len(values)), map(not_, parts)):  # an entry is never empty
            dev = values[i]
            parts[i] = encode_device(dev, ids_of.get(dev.id) or replica_ids(dev.id, replicas))
        left_out: List[str] = []
        if sum(map(len, parts)) > limit:
            size, cut = 0, len(parts)
            for i, part in enumerate(parts):
                if size + len(part) > limit:
                    cut = i
                    break
                size += len(part)
            left_out = list(devices)[cut:]  # and every device after the first too many: the list keeps its order
            del parts[cut:], values[cut:]
        payload = b"".join(parts)
        self._devices, self._payload, self._complete = devices, payload, not left_out
        self._ids = list(devices) if not left_out else list(devices)[:len(parts)]
        self._sizes = array("I", map(len, parts))
        if replicas <= 1:
            table: Mapping[str, Device] = devices if not left_out else dict(zip(devices, values))
            return Advertised(table, {}, _OwnIds(table), 1, payload, tuple(left_out))
        by_id: Dict[str, Device] = {}
        replica_of: Dict[str, int] = {}
        new_ids_of: Dict[str, Tuple[str, ...]] = {}
        numbers = range(replicas)
        for dev in values:
            ids = new_ids_of[dev.id] = ids_of.get(dev.id) or replica_ids(dev.id, replicas)
            by_id.update(dict.fromkeys(ids, dev))
            replica_of.update(zip(ids, numbers))
        self._ids_of = new_ids_of
        return Advertised(by_id, replica_of, new_ids_of, replicas, payload, tuple(left_out))
