"""sharing.py: replica IDs, the hand-encoded ListAndWatch message (the bytes protobuf writes, on every
stack), the tables Allocate looks replica IDs up in, and the 4 MiB limit."""

from __future__ import annotations

from typing import Dict, Tuple

import pytest

from udev_device_plugin import api, sharing
from udev_device_plugin.model import HEALTHY, UNHEALTHY, Device

RESOURCE = "example.com/fuse"


def dev(id_: str, numa: Tuple[int, ...] = (), health: str = HEALTHY) -> Device:
    return Device(RESOURCE, id_, f"/sys/devices/virtual/misc/{id_}", id_, (f"/dev/{id_}",), numa, health)


def table(*devices: Device) -> Dict[str, Device]:
    return {d.id: d for d in devices}


def protobuf_list(devices: Dict[str, Device], replicas: int) -> bytes:
    """What the generic protobuf encoder writes for the same list."""
    return api.ListAndWatchResponse(devices=[
        api.Device(ID=i, health=d.health, topology=api.TopologyInfo(nodes=[api.NUMANode(ID=n) for n in d.numa_nodes])
                   if d.numa_nodes else None)
        for d in devices.values() for i in sharing.replica_ids(d.id, replicas)]).SerializeToString()


def test_replica_ids():
    assert sharing.replica_ids("fuse", 1) == ("fuse",)
    assert sharing.replica_ids("fuse", 3) == ("fuse::0", "fuse::1", "fuse::2")
    # An ID that holds '::' itself is no ambiguity: replica IDs are looked up, never parsed.
    assert sharing.replica_ids("a::1", 2) == ("a::1::0", "a::1::1")


@pytest.mark.parametrize("replicas", [1, 2, 100])
@pytest.mark.parametrize("devices", [
    table(dev("fuse")),
    table(dev("loop0", (0,)), dev("loop1", (1,)), dev("loop2", (0, 1), UNHEALTHY), dev("loop3")),
    table(dev("n", (7, 300, 2 ** 40)), dev("negative", (-1,))),  # multi-byte varints; an int64 below zero
    table(dev("x" * 128, (0,)), dev("é-ü", (1,))),  # the longest IDs (two-byte lengths); UTF-8
    table(Device(RESOURCE, "odd", "/sys/x", "odd", (), (), "")),  # empty health: left out, as protobuf does
    {},
], ids=["one", "numa-health", "varints", "long-utf8", "empty-health", "none"])
def test_the_hand_encoded_list_is_what_protobuf_writes(devices, replicas):
    got = sharing.Encoder().advertise(devices, replicas)
    assert got.payload == protobuf_list(devices, replicas)
    parsed = api.ListAndWatchResponse.FromString(got.payload)
    assert [d.ID for d in parsed.devices] == [i for d in devices.values() for i in sharing.replica_ids(d.id, replicas)]


def test_tables_with_replicas():
    devices = table(dev("fuse"), dev("kvm", (1,), UNHEALTHY))
    got = sharing.Encoder().advertise(devices, 3)
    assert got.replicas == 3 and got.left_out == ()
    assert got.ids_of == {"fuse": ("fuse::0", "fuse::1", "fuse::2"), "kvm": ("kvm::0", "kvm::1", "kvm::2")}
    assert {i: d.id for i, d in got.devices.items()} == {
        "fuse::0": "fuse", "fuse::1": "fuse", "fuse::2": "fuse", "kvm::0": "kvm", "kvm::1": "kvm", "kvm::2": "kvm"}
    assert got.replica_of == {"fuse::0": 0, "fuse::1": 1, "fuse::2": 2, "kvm::0": 0, "kvm::1": 1, "kvm::2": 2}
    # Every replica has its device's health and NUMA nodes.
    listed = {d.ID: (d.health, [n.ID for n in d.topology.nodes])
              for d in api.ListAndWatchResponse.FromString(got.payload).devices}
    assert listed == {**{f"fuse::{k}": (HEALTHY, []) for k in range(3)},
                      **{f"kvm::{k}": (UNHEALTHY, [1]) for k in range(3)}}


def test_one_replica_is_the_device_table_itself():
    devices = table(dev("null"), dev("zero"))
    got = sharing.Encoder().advertise(devices, 1)
    assert got.devices is devices and got.replica_of == {} and got.ids_of == {"null": ("null",), "zero": ("zero",)}


def test_a_device_is_encoded_again_only_when_it_changed(monkeypatch):
    encoded = []
    encode = sharing.encode_device
    monkeypatch.setattr(sharing, "encode_device", lambda d, ids: encoded.append((d.id, len(ids))) or encode(d, ids))
    encoder = sharing.Encoder()
    devices = table(dev("a"), dev("b"))
    first = encoder.advertise(devices, 2)
    assert encoded == [("a", 2), ("b", 2)]
    sick = table(dev("a"), dev("b", health=UNHEALTHY))
    del encoded[:]
    second = encoder.advertise(sick, 2)
    # a's bytes are kept (an equal device, even another object), b's are new.
    assert encoded == [("b", 2)]
    assert second.payload == protobuf_list(sick, 2) != first.payload
    # Only the ID, health and NUMA nodes are in the bytes: another sys_path keeps them.
    moved = table(dev("a").replace(sys_path="/sys/devices/elsewhere/a"), dev("b", health=UNHEALTHY))
    del encoded[:]
    assert encoder.advertise(moved, 2).payload == protobuf_list(moved, 2)
    assert encoded == []
    # Other NUMA nodes: new bytes.
    near = table(dev("a", numa=(1,)), dev("b", health=UNHEALTHY))
    assert encoder.advertise(near, 2).payload == protobuf_list(near, 2)
    assert encoded == [("a", 2)]
    # A device added, one removed, in the middle of the list: only the new one is encoded.
    del encoded[:]
    grown = table(dev("a", numa=(1,)), dev("a2"), dev("b", health=UNHEALTHY))
    assert encoder.advertise(grown, 2).payload == protobuf_list(grown, 2)
    assert encoded == [("a2", 2)]
    shrunk = table(dev("a2"), dev("b", health=UNHEALTHY))
    del encoded[:]
    assert encoder.advertise(shrunk, 2).payload == protobuf_list(shrunk, 2)
    assert encoded == []
    # Other replicas: every device again.
    assert encoder.advertise(shrunk, 3).payload == protobuf_list(shrunk, 3)
    assert encoded == [("a2", 3), ("b", 3)]


def test_a_list_past_the_kubelets_limit_leaves_out_the_last_devices():
    devices = table(*(dev(f"d{i:03d}") for i in range(10)))
    entry = len(sharing.encode_device(devices["d000"], sharing.replica_ids("d000", 4)))
    got = sharing.Encoder().advertise(devices, 4, limit=entry * 6 + entry // 2)
    assert got.left_out == tuple(f"d{i:03d}" for i in range(6, 10))
    assert set(got.ids_of) == {f"d{i:03d}" for i in range(6)}
    assert len(got.devices) == 24 and "d006::0" not in got.devices
    assert len(api.ListAndWatchResponse.FromString(got.payload).devices) == 24
    assert sharing.Encoder().advertise(devices, 1, limit=entry).left_out == tuple(f"d{i:03d}" for i in range(4, 10))


def test_the_limit_holds_for_the_documented_maximum():
    """100 devices x 256 replicas (config.MAX_REPLICAS) of the longest IDs stay within the kubelet's 4 MiB."""
    from udev_device_plugin import config

    devices = table(*(dev(f"{i:03d}" + "x" * 125, (i % 4,)) for i in range(100)))
    got = sharing.Encoder().advertise(devices, config.MAX_REPLICAS)
    assert got.left_out == () and len(got.devices) == 100 * config.MAX_REPLICAS
    assert len(got.payload) <= sharing.LIST_LIMIT


def test_ten_thousand_replicas():
    devices = table(*(dev(f"loop{i}", (i % 2,)) for i in range(100)))
    got = sharing.Encoder().advertise(devices, 100)
    assert len(got.devices) == 10_000 and got.payload == protobuf_list(devices, 100)


def spied_state():
    """A ResourceState of a misc resource, and the list of whether each call of its encoder's short way
    (``_update``, given what changed) held."""
    from udev_device_plugin import config
    from udev_device_plugin.servicer import ResourceState

    res = config.parse([("t.conf", f"[resource {RESOURCE}]\nsubsystem = misc\n")]).resources[0]
    state = ResourceState(res)
    calls = []
    encoder_update = state._encoder._update

    def spy(*args):
        got = encoder_update(*args)
        calls.append(got is not None)
        return got

    state._encoder._update = spy
    return state, calls


def test_a_list_told_what_changed_is_the_list_encoded_from_scratch():
    """ResourceState passes the inventory's diff to the encoder, which then re-encodes only those
    devices: after every step of a random walk (adds anywhere in the order, removals, health and
    NUMA changes, several publishes between two reads), the bytes are the generic encoder's."""
    import random

    from udev_device_plugin import discovery
    from udev_device_plugin.model import diff

    state, updated = spied_state()
    rng = random.Random(12)
    current: Dict[str, Device] = {}
    for step in range(400):
        new = dict(current)
        for _ in range(rng.choice([1, 1, 1, 2, 5])):
            i = f"d{rng.randrange(60)}"
            if i in new and rng.random() < 0.5:
                del new[i]
            else:
                new[i] = dev(i, numa=rng.choice([(), (0,), (1,)]), health=rng.choice([HEALTHY, UNHEALTHY]))
        new = discovery._ordered(new)
        change = diff({"r": current}, {"r": new}).get("r")
        if change is not None:
            state.publish(new, change)
        current = new
        if rng.random() < 0.8:  # sometimes two changes reach the encoder at once (it takes neither)
            assert state.list_payload()[1] == protobuf_list(current, 1), f"step {step}"
            assert dict(state.advertised().ids_of) == {i: (i,) for i in current}
    assert sum(updated) > 200 and all(updated)  # most steps went the short way, and it always held


def test_a_list_updated_as_refresh_changes_it_with_equal_keys():
    """The walk a refresh makes: the order of discovery._placed (new IDs after equal keys, which
    "d01" and "d1" are), the diff of only the touched IDs (model.diff_of, which must have the full
    diff's parts), published as known.  The bytes are the generic encoder's after every step."""
    import random

    from udev_device_plugin import discovery
    from udev_device_plugin.model import diff, diff_of

    state, calls = spied_state()
    rng = random.Random(5)
    current: Dict[str, Device] = {}
    names = [f"d{n}" for n in range(40)] + [f"d0{n}" for n in range(10)] + [f"d00{n}" for n in range(5)]
    for step in range(600):
        gone, new = set(), {}
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            i = rng.choice(names)
            if i in current and rng.random() < 0.5:
                gone.add(i)
                new.pop(i, None)
            else:
                gone.discard(i)
                new[i] = dev(i, numa=rng.choice([(), (0,), (1,)]), health=rng.choice([HEALTHY, UNHEALTHY]))
        after = discovery._placed(current, gone, new)
        change = diff_of(current, after, gone | set(new))
        full = diff({"r": current}, {"r": after}).get("r") or type(change)()
        for part in ("added", "changed", "removed"):  # the same parts (in order but for equal keys)
            assert sorted(map(repr, getattr(change, part))) == sorted(map(repr, getattr(full, part))), f"step {step}"
        state.publish(after, change if change else None, known=True)
        assert state.current()[1] is after
        current = after
        if rng.random() < 0.8:
            assert state.list_payload()[1] == protobuf_list(current, 1), f"step {step}"
    assert sum(calls) > 300


def test_a_change_of_many_devices_builds_the_list_again():
    """Told of more than _MAX_EDITS changes, the encoder does not copy the message once per change: it
    builds the list from the devices (keeping the others' bytes), and the next small change goes the
    short way again.  The bytes are the generic encoder's at each step."""
    from udev_device_plugin import discovery
    from udev_device_plugin.model import diff

    state, calls = spied_state()
    current: Dict[str, Device] = {}
    steps = [
        {f"d{n}": dev(f"d{n}") for n in range(0, 200, 2)},  # the first list: no diff to follow
        {f"d{n}": dev(f"d{n}") for n in range(0, 200, 2)} | {"d7": dev("d7")},  # one added: short way
        {f"d{n}": dev(f"d{n}") for n in range(0, 200)},  # 99 added in between: built again
        {f"d{n}": dev(f"d{n}", health=UNHEALTHY if n % 50 == 0 else HEALTHY) for n in range(1, 200)},  # 1 + 4
        {f"d{n}": dev(f"d{n}") for n in range(1, 200) if n % 3},  # 66 gone, 3 healthy again: built again
    ]
    expected_calls = [[], [True], [True], [True, True], [True, True]]
    for step, new in enumerate(steps):
        new = discovery._ordered(new)
        change = diff({"r": current}, {"r": new}).get("r")
        state.publish(new, change)
        current = new
        assert state.list_payload()[1] == protobuf_list(current, 1), f"step {step}"
        assert calls == expected_calls[step], f"step {step}"
