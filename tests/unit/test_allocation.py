"""allocation.py: Allocate answers and refusals, and GetPreferredAllocation choices."""

from __future__ import annotations

import itertools
import random
from typing import Dict, Sequence, Tuple

import pytest

from udev_device_plugin import allocation, config
from udev_device_plugin.allocation import AllocationError, ContainerAllocation, DeviceNode, MountSpec
from udev_device_plugin.config import ResourceConfig
from udev_device_plugin.model import HEALTHY, UNHEALTHY, Device

RESOURCE = "example.com/accel"


def res(lines: str = "") -> ResourceConfig:
    return config.parse([("t.conf", f"[resource {RESOURCE}]\nsubsystem = pci\n{lines}")]).resources[0]


def dev(id_: str, *devnodes: str, numa: Tuple[int, ...] = (), health: str = HEALTHY, reason: str = "",
        sys_name: str = "") -> Device:
    return Device(RESOURCE, id_, f"/sys/devices/x/{id_}", sys_name or f"sys-{id_}", tuple(devnodes), numa,
                  health, reason)


def table(*devices: Device) -> Dict[str, Device]:
    return {d.id: d for d in devices}


DEVICES = table(
    dev("a0", "/dev/accel/accel0", "/dev/dri/renderD128", sys_name="0000:3b:00.0"),
    dev("a1", "/dev/accel/accel1", sys_name="0000:3c:00.0"),
    dev("a2", sys_name="0000:3d:00.0"),  # no device node of its own
    dev("shared1", "/dev/shared", "/dev/own1"),
    dev("shared2", "/dev/shared", "/dev/own2"),
    dev("sick", "/dev/sick0", health=UNHEALTHY, reason="attribute status is 'failed', expected ok"),
    dev("sick2", "/dev/sick2", health=UNHEALTHY),
)


# --- allocate(): the answer ---------------------------------------------------------------------


def test_one_device_spec_per_devnode_including_children():
    got = allocation.allocate(res(), DEVICES, ["a0"])
    assert got == ContainerAllocation(
        devices=(DeviceNode("/dev/accel/accel0", "/dev/accel/accel0", "rw"),
                 DeviceNode("/dev/dri/renderD128", "/dev/dri/renderD128", "rw")),
        mounts=(), envs=(), annotations=())


def test_several_devices_in_request_order():
    got = allocation.allocate(res(), DEVICES, ["a1", "a0"])
    assert [n.host_path for n in got.devices] == ["/dev/accel/accel1", "/dev/accel/accel0", "/dev/dri/renderD128"]


def test_a_node_shared_by_two_devices_is_given_once():
    got = allocation.allocate(res(), DEVICES, ["shared1", "shared2"])
    assert [n.host_path for n in got.devices] == ["/dev/shared", "/dev/own1", "/dev/own2"]


def test_repeated_id_counts_once():
    got = allocation.allocate(res("env = N={count}\n  IDS={ids}"), DEVICES, ["a1", "a1"])
    assert [n.host_path for n in got.devices] == ["/dev/accel/accel1"]
    assert got.envs == (("N", "1"), ("IDS", "a1"))


def test_extra_devnodes_once_after_the_devices():
    r = res("extra_devnodes = /dev/vfio/vfio /dev/accel/accel1")
    got = allocation.allocate(r, DEVICES, ["a0", "a1"])
    assert [n.host_path for n in got.devices] == [
        "/dev/accel/accel0", "/dev/dri/renderD128", "/dev/accel/accel1", "/dev/vfio/vfio"]
    # A device without nodes of its own still gets the extra ones.
    got = allocation.allocate(r, DEVICES, ["a2"])
    assert [n.host_path for n in got.devices] == ["/dev/vfio/vfio", "/dev/accel/accel1"]


def test_device_without_nodes_gets_none():
    assert allocation.allocate(res(), DEVICES, ["a2"]).devices == ()


@pytest.mark.parametrize("perms, expected", [("", "rw"), ("permissions = r", "r"), ("permissions = mwr", "rwm"),
                                             ("permissions = m", "m")])
def test_permissions_on_every_node(perms, expected):
    got = allocation.allocate(res(perms + "\nextra_devnodes = /dev/vfio/vfio"), DEVICES, ["a0"])
    assert {n.permissions for n in got.devices} == {expected}
    assert len(got.devices) == 3


@pytest.mark.parametrize("template, expected", [
    ("{devnode}", ["/dev/accel/accel0", "/dev/dri/renderD128", "/dev/vfio/vfio"]),
    ("/dev/{name}", ["/dev/accel/accel0", "/dev/dri/renderD128", "/dev/vfio/vfio"]),
    # The shared extra node belongs to no device: with {id} or {sys_name} it keeps its host path.
    ("/fpga/{id}/{name}", ["/fpga/a0/accel/accel0", "/fpga/a0/dri/renderD128", "/dev/vfio/vfio"]),
    ("/x/{sys_name}/{name}", ["/x/0000:3b:00.0/accel/accel0", "/x/0000:3b:00.0/dri/renderD128", "/dev/vfio/vfio"]),
    ("/{resource}/{name}", ["/example.com/accel/accel/accel0", "/example.com/accel/dri/renderD128",
                            "/example.com/accel/vfio/vfio"]),
])
def test_container_path_templates(template, expected):
    r = res(f"container_path = {template}\nextra_devnodes = /dev/vfio/vfio")
    got = allocation.allocate(r, DEVICES, ["a0"])
    assert [n.container_path for n in got.devices] == expected
    assert [n.host_path for n in got.devices] == ["/dev/accel/accel0", "/dev/dri/renderD128", "/dev/vfio/vfio"]


@pytest.mark.parametrize("template", ["/dev/same", "/dev/fpga/{id}"])
def test_two_nodes_on_one_container_path_are_refused_naming_both(template):
    r = res(f"container_path = {template}\nextra_devnodes = /dev/vfio/vfio")
    with pytest.raises(allocation.AllocationError) as info:
        allocation.allocate(r, DEVICES, ["a0"])
    assert info.value.kind == "conflict"
    assert "/dev/accel/accel0" in str(info.value) and "/dev/dri/renderD128" in str(info.value)


def test_mounts_env_annotations_rendered():
    r = res("extra_devnodes = /dev/vfio/vfio\n"
            "mounts = /var/lib/accel/{ids}/:/run/accel:ro\n  /opt/{resource}:/opt/x/{count}/../y\n"
            "env = IDS={ids}\n  NODES={devnodes}\n  COUNT={count}\n  RES={resource}\n"
            "annotations = example.com/ids={ids}\n  plain=n={count}")
    got = allocation.allocate(r, DEVICES, ["a1", "a0"])
    assert got.mounts == (MountSpec("/var/lib/accel/a1,a0", "/run/accel", True),
                          MountSpec("/opt/example.com/accel", "/opt/x/y", False))
    assert got.envs == (
        ("IDS", "a1,a0"),
        ("NODES", "/dev/accel/accel1,/dev/accel/accel0,/dev/dri/renderD128,/dev/vfio/vfio"),
        ("COUNT", "2"),
        ("RES", RESOURCE),
    )
    assert got.annotations == (("example.com/ids", "a1,a0"), ("plain", "n=2"))


# --- allocate(): refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("ids, kind, named, not_named", [
    ([], "unknown", [], []),
    (["nope"], "unknown", ["'nope'"], []),
    (["a0", "nope"], "unknown", ["'nope'"], ["'a0'"]),
    (["nope", "a0", "gone"], "unknown", ["'nope'", "'gone'"], ["'a0'"]),
    (["sick"], "unhealthy", ["'sick'", "attribute status is 'failed', expected ok"], []),
    (["a0", "sick"], "unhealthy", ["'sick'"], ["'a0'"]),
    (["sick2", "a1", "sick"], "unhealthy", ["'sick2': unhealthy", "'sick'"], ["'a1'"]),
    # an unknown ID is the first thing refused, even beside an unhealthy one
    (["sick", "nope"], "unknown", ["'nope'"], ["'sick'"]),
    (["A0"], "unknown", ["'A0'"], []),  # IDs are exact
])
def test_refusals(ids, kind, named, not_named):
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), DEVICES, ids)
    assert info.value.kind == kind
    message = str(info.value)
    assert message.startswith(f"{RESOURCE}: ")
    for text in named:
        assert text in message
    for text in not_named:
        assert text not in message


def test_empty_request_message():
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), DEVICES, [])
    assert (info.value.kind, str(info.value)) == ("unknown", f"{RESOURCE}: the request names no device")


def test_a_huge_unknown_id_is_quoted_truncated():
    # A 3.9 MB ID was echoed whole into the gRPC status and the log.
    huge = "x" * 3_900_000
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), DEVICES, [huge, "a0"])
    message = str(info.value)
    assert info.value.kind == "unknown" and len(message) < 300, len(message)
    assert message == f"{RESOURCE}: unknown device ID(s) {'x' * 128!r}... (3900000 characters)"


def test_many_unknown_ids_are_counted_not_listed():
    ids = [f"nope{i}" for i in range(10_000)] + ["nope0"]
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), DEVICES, ids)
    message = str(info.value)
    assert message.endswith(" and 9992 more") and "'nope7'" in message and "'nope8'" not in message


def test_many_unhealthy_ids_are_counted_not_listed():
    sick = table(*(dev(f"s{i}", health=UNHEALTHY, reason="r" * 100) for i in range(20)))
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), sick, list(sick))
    assert info.value.kind == "unhealthy" and str(info.value).endswith(" and 12 more")
    assert str(info.value).count("r" * 100) == allocation.NAMED_IDS


def test_an_unhealthy_id_with_control_characters_is_escaped():
    odd = table(dev("a\x1b[2J", health=UNHEALTHY, reason="gone"))
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), odd, ["a\x1b[2J"])
    assert "\x1b" not in str(info.value) and "'a\\x1b[2J': gone" in str(info.value)


def test_refusals_against_an_empty_resource():
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), {}, ["a0"])
    assert info.value.kind == "unknown"


# --- preferred() ------------------------------------------------------------------------------------

# Two NUMA nodes: n0 has 2 free, n1 has 3; plus devices without NUMA information and one on both nodes.
NUMA = table(
    dev("n0-a", numa=(0,)), dev("n0-b", numa=(0,)),
    dev("n1-a", numa=(1,)), dev("n1-b", numa=(1,)), dev("n1-c", numa=(1,)),
    dev("none-a"), dev("none-b"),
)
LOOPS = table(*(dev(f"loop{i}") for i in range(12)))


def pref(devices: Dict[str, Device], available: Sequence[str], must: Sequence[str] = (), size: int = 1):
    return allocation.preferred(devices, list(available), list(must), size)


@pytest.mark.parametrize("available, size, expected", [
    (["loop10", "loop2", "loop1"], 2, ["loop1", "loop2"]),
    (["loop10", "loop9", "loop11"], 2, ["loop9", "loop10"]),
    ([f"loop{i}" for i in range(12)][::-1], 3, ["loop0", "loop1", "loop2"]),
    (["loop3"], 1, ["loop3"]),
])
def test_natural_order(available, size, expected):
    assert pref(LOOPS, available, size=size) == expected


@pytest.mark.parametrize("size", range(0, 13))
def test_exactly_size_from_available(size):
    available = [f"loop{i}" for i in (11, 3, 7, 0, 5, 9, 1, 10, 2, 8, 4, 6)]
    got = pref(LOOPS, available, size=size)
    assert len(got) == size
    assert len(set(got)) == size
    assert set(got) <= set(available)


@pytest.mark.parametrize("available, must, size, expected", [
    (["loop1", "loop2", "loop3", "loop7"], ["loop7"], 3, ["loop7", "loop1", "loop2"]),
    (["loop1", "loop2", "loop3", "loop7"], ["loop7", "loop3"], 3, ["loop7", "loop3", "loop1"]),
    (["loop1", "loop2", "loop3"], ["loop3", "loop2"], 2, ["loop3", "loop2"]),
    (["loop1", "loop2", "loop3"], ["loop3", "loop2", "loop1"], 2, ["loop3", "loop2"]),  # more than size
    (["loop1", "loop2"], ["loop2", "loop2"], 2, ["loop2", "loop1"]),
])
def test_must_include_first(available, must, size, expected):
    assert pref(LOOPS, available, must, size) == expected


@pytest.mark.parametrize("must, size, expected", [
    # no device chosen yet: fill the NUMA node with the most free devices first
    ([], 1, ["n1-a"]),
    ([], 3, ["n1-a", "n1-b", "n1-c"]),
    ([], 4, ["n1-a", "n1-b", "n1-c", "n0-a"]),
    ([], 6, ["n1-a", "n1-b", "n1-c", "n0-a", "n0-b", "none-a"]),
    # aligned with what must be included, even on the node with fewer free devices
    (["n0-b"], 2, ["n0-b", "n0-a"]),
    (["n0-b"], 3, ["n0-b", "n0-a", "n1-a"]),
    (["n1-c"], 3, ["n1-c", "n1-a", "n1-b"]),
    # both nodes anchored: the one with more free devices first
    (["n0-a", "n1-b"], 4, ["n0-a", "n1-b", "n1-a", "n1-c"]),
    (["n0-a", "n1-b"], 5, ["n0-a", "n1-b", "n1-a", "n1-c", "n0-b"]),
    # must_include without NUMA information: the fullest node, as if nothing were chosen
    (["none-b"], 2, ["none-b", "n1-a"]),
])
def test_numa_alignment(must, size, expected):
    assert pref(NUMA, list(NUMA), must, size) == expected


def test_devices_without_numa_come_after_numa_local_ones():
    assert pref(NUMA, ["none-a", "n0-b", "none-b"], size=2) == ["n0-b", "none-a"]


def test_tie_between_numa_nodes_goes_to_the_lowest_node():
    devices = table(dev("x", numa=(1,)), dev("y", numa=(1,)), dev("a", numa=(3,)), dev("b", numa=(3,)))
    assert pref(devices, ["a", "b", "x", "y"], size=2) == ["x", "y"]


def test_free_count_only_counts_available_devices():
    # n1 has more devices, but only one of them is free.
    assert pref(NUMA, ["n0-a", "n0-b", "n1-c"], size=1) == ["n0-a"]


def test_device_on_two_nodes_counts_on_both():
    devices = table(dev("both", numa=(0, 1)), dev("zero", numa=(0,)), dev("one1", numa=(1,)), dev("one2", numa=(1,)))
    # node 1: both, one1, one2 (3 free); node 0: both, zero (2 free)
    assert pref(devices, list(devices), size=3) == ["both", "one1", "one2"]
    assert pref(devices, list(devices), ["zero"], 2) == ["zero", "both"]


@pytest.mark.parametrize("available, must, size, expected", [
    # IDs we do not know (a device gone meanwhile) only make up the size, after every known one.
    (["aaa-gone", "loop5", "loop3"], [], 2, ["loop3", "loop5"]),
    (["aaa-gone", "loop5"], [], 2, ["loop5", "aaa-gone"]),
    (["gone2", "gone10", "gone1"], [], 2, ["gone1", "gone2"]),
    (["aaa-gone", "loop5"], ["aaa-gone"], 2, ["aaa-gone", "loop5"]),
])
def test_unknown_ids(available, must, size, expected):
    assert pref(LOOPS, available, must, size) == expected


def test_unhealthy_ids_come_last():
    devices = table(dev("d0", numa=(0,), health=UNHEALTHY), dev("d1", numa=(0,), health=UNHEALTHY),
                    dev("d2", numa=(0,), health=UNHEALTHY), dev("d7", numa=(1,)), dev("d9"))
    # Node 0 has the most devices, but they are unhealthy: they do not make it the fullest node either.
    assert pref(devices, list(devices), size=2) == ["d7", "d9"]
    assert pref(devices, list(devices), size=3) == ["d7", "d9", "d0"]


@pytest.mark.parametrize("available, size", [([], 1), (["loop1"], 2), (["loop1", "loop2", "ghost"], 5)])
def test_size_larger_than_available(available, size):
    got = pref(LOOPS, available, size=size)
    assert sorted(got) == sorted(available)


@pytest.mark.parametrize("size", [0, -1])
def test_non_positive_size(size):
    assert pref(LOOPS, ["loop1", "loop2"], ["loop1"], size) == []


def test_duplicates_in_available_are_answered_once():
    assert pref(LOOPS, ["loop2", "loop2", "loop1", "loop1"], size=4) == ["loop1", "loop2"]


def test_must_include_outside_available_is_not_chosen():
    assert pref(LOOPS, ["loop1", "loop2"], ["loop9"], 2) == ["loop1", "loop2"]


def test_deterministic_whatever_order_the_kubelet_sends():
    """The kubelet builds available from a set: every order must give the same answer, ties included."""
    devices = table(dev("loop1"), dev("loop01"), dev("loop001", numa=(0,)), dev("x1", numa=(1,)),
                    dev("x01", numa=(1,)), dev("ghost"))
    ids = list(devices) + ["unknown"]
    for size in range(1, len(ids) + 1):
        answers = {tuple(pref(devices, order, size=size)) for order in itertools.permutations(ids)}
        assert len(answers) == 1, (size, answers)


def test_invariants_on_random_requests():
    rng = random.Random(5)
    devices = table(*(dev(f"d{i}", numa=rng.choice([(), (0,), (1,), (2,), (0, 1)]),
                          health=HEALTHY if rng.random() < 0.8 else UNHEALTHY) for i in range(40)))
    for _ in range(500):
        available = rng.sample(list(devices) + ["u1", "u2"], rng.randint(0, 42))
        must = rng.sample(available, rng.randint(0, min(3, len(available))))
        size = rng.randint(len(must), 45)
        got = pref(devices, available, must, size)
        assert len(got) == min(size, len(available))
        assert len(set(got)) == len(got)
        assert set(got) <= set(available)
        assert got[:len(must)] == must
        again = pref(devices, rng.sample(available, len(available)), must, size)
        assert again == got
        # NUMA alignment: with must_include on a node, no device of another node is chosen
        # while one on its node was left out.
        anchor = {n for i in must for n in devices[i].numa_nodes} if all(i in devices for i in must) else set()
        if anchor:
            left_aligned = [i for i in available if i not in got and i in devices and devices[i].healthy
                            and set(devices[i].numa_nodes) & anchor]
            chosen_elsewhere = [i for i in got[len(must):] if i in devices and devices[i].numa_nodes
                                and not set(devices[i].numa_nodes) & anchor]
            assert not (left_aligned and chosen_elsewhere), (must, got)


def test_preferred_takes_ids_with_digit_runs_beyond_int_limit():
    # GetPreferredAllocation failed UNKNOWN with a traceback: int() refuses more than 4,300 digits.
    long_id = "a" + "7" * 5000
    got = allocation.preferred(DEVICES, [long_id, "a1", "a0"], [], 3)
    assert got == ["a0", "a1", long_id]
    assert allocation.preferred(DEVICES, ["9" * 6000, "1" * 6000], [], 2) == ["1" * 6000, "9" * 6000]


def test_preferred_sorts_huge_unknown_ids_by_a_bounded_prefix():
    # 'a1' repeated is one natural-sort part per character: megabytes of it once cost seconds per call.
    huge = ["a1" * 1_000_000 + "b", "a1" * 1_000_000 + "a"]
    got = allocation.preferred(DEVICES, huge + ["a0"], [], 3)
    assert got == ["a0", huge[1], huge[0]]  # known and healthy first; then the prefix, then the whole ID
