"""model.py: the snapshot diff that drives the servers, and the natural ID order."""

from __future__ import annotations

import random
import re

import pytest

from udev_device_plugin.model import HEALTHY, UNHEALTHY, Device, ResourceDiff, diff, natural_key, quote_id


def dev(resource: str, id_: str, health: str = HEALTHY, numa=(), nodes=("/dev/x",), reason: str = "") -> Device:
    return Device(resource, id_, f"/sys/devices/{id_}", id_, tuple(nodes), tuple(numa), health, reason)


A0, A1, A2 = dev("a", "a0"), dev("a", "a1"), dev("a", "a2")
A1_SICK = dev("a", "a1", UNHEALTHY, reason="gone")
A1_NUMA = dev("a", "a1", numa=(1,))
A1_NODES = dev("a", "a1", nodes=("/dev/x", "/dev/y"))
B0 = dev("b", "b0")


@pytest.mark.parametrize("old, new, expected", [
    ({}, {}, {}),
    ({"a": {"a0": A0}}, {"a": {"a0": A0}}, {}),
    ({"a": {}}, {}, {}),  # an empty resource appearing or going is no change of devices
    ({}, {"a": {"a0": A0, "a1": A1}}, {"a": ResourceDiff(added=(A0, A1))}),
    ({"a": {"a0": A0, "a1": A1}}, {}, {"a": ResourceDiff(removed=(A0, A1))}),
    ({"a": {"a0": A0, "a1": A1}}, {"a": {}}, {"a": ResourceDiff(removed=(A0, A1))}),
    ({"a": {"a0": A0}}, {"a": {"a0": A0, "a2": A2}}, {"a": ResourceDiff(added=(A2,))}),
    ({"a": {"a0": A0, "a1": A1}}, {"a": {"a0": A0, "a1": A1_SICK}}, {"a": ResourceDiff(changed=((A1, A1_SICK),))}),
    ({"a": {"a1": A1_SICK}}, {"a": {"a1": A1}}, {"a": ResourceDiff(changed=((A1_SICK, A1),))}),
    ({"a": {"a1": A1}}, {"a": {"a1": A1_NUMA}}, {"a": ResourceDiff(changed=((A1, A1_NUMA),))}),
    ({"a": {"a1": A1}}, {"a": {"a1": A1_NODES}}, {"a": ResourceDiff(changed=((A1, A1_NODES),))}),
    ({"a": {"a0": A0, "a1": A1}, "b": {"b0": B0}},
     {"a": {"a1": A1_SICK, "a2": A2}, "b": {"b0": B0}},
     {"a": ResourceDiff(added=(A2,), changed=((A1, A1_SICK),), removed=(A0,))}),
    ({"a": {"a0": A0}}, {"b": {"b0": B0}}, {"a": ResourceDiff(removed=(A0,)), "b": ResourceDiff(added=(B0,))}),
])
def test_diff(old, new, expected):
    assert diff(old, new) == expected


def test_diff_of_equal_but_distinct_values_is_empty():
    assert diff({"a": {"a0": dev("a", "a0")}}, {"a": {"a0": dev("a", "a0")}}) == {}


def test_diff_keeps_the_snapshots_order():
    # Snapshots are in natural order (discovery keeps it): loop2 before loop10, unlike sorted().
    ids = ["loop2", "loop10", "loop11"]
    before = {"a": {i: dev("a", i) for i in ids[1:]}}
    after = {"a": {i: dev("a", i, health=UNHEALTHY) if i == "loop11" else dev("a", i) for i in ids[:2]}}
    got = diff(before, after)["a"]
    assert [d.id for d in got.added] == ["loop2"]
    assert [d.id for d in got.removed] == ["loop11"]
    assert got.changed == ()
    assert [d.id for d in diff({}, after)["a"].added] == ["loop2", "loop10"]


def test_diff_compares_only_what_is_not_the_same_object():
    compared = []

    class Counted(Device):
        def __eq__(self, other):
            compared.append(self.id)
            return super().__eq__(other)

        __hash__ = Device.__hash__

    def counted(id_, health=HEALTHY):
        return Counted("a", id_, f"/sys/devices/{id_}", id_, ("/dev/x",), (), health, "")

    shared = [counted(f"a{i}") for i in range(100)]
    sick = counted("a1", UNHEALTHY)
    before = {d.id: d for d in shared}
    after = dict(before, a1=sick)
    got = diff({"a": before}, {"a": after})
    assert compared == ["a1"]  # the one new object only, not the 99 the snapshots share
    assert got["a"].changed == ((before["a1"], sick),)



@pytest.mark.parametrize("d, expected", [
    (ResourceDiff(), False),
    (ResourceDiff(added=(A0,)), True),
    (ResourceDiff(changed=((A1, A1_SICK),)), True),
    (ResourceDiff(removed=(A0,)), True),
])
def test_resource_diff_truth(d, expected):
    assert bool(d) is expected


@pytest.mark.parametrize("health, expected", [(HEALTHY, True), (UNHEALTHY, False), ("healthy", False), ("", False)])
def test_device_healthy(health, expected):
    assert dev("a", "a0", health).healthy is expected


@pytest.mark.parametrize("unsorted, expected", [
    (["loop10", "loop2", "loop1"], ["loop1", "loop2", "loop10"]),
    (["nvme10n1", "nvme2n1", "nvme2n10", "nvme2n2"], ["nvme2n1", "nvme2n2", "nvme2n10", "nvme10n1"]),
    (["b", "a10", "a9", "a"], ["a", "a9", "a10", "b"]),
    (["10", "9", "x"], ["9", "10", "x"]),
    (["0000:3b:00.1", "0000:3b:00.0", "0000:0a:00.0"], ["0000:0a:00.0", "0000:3b:00.0", "0000:3b:00.1"]),
    (["", "a"], ["", "a"]),
])
def test_natural_order(unsorted, expected):
    assert sorted(unsorted, key=natural_key) == expected


@pytest.mark.parametrize("text, expected", [
    ("x\u00b2", [(1, 0, "x\u00b2")]),
    ("\u0663", [(1, 0, "\u0663")]),
    ("a\u00bd1", [(1, 0, "a\u00bd"), (0, 1, "1")]),
    ("12ab3", [(0, 2, "12"), (1, 0, "ab"), (0, 1, "3")]),
    ("007", [(0, 1, "7")]),
    ("0", [(0, 0, "")]),
])
def test_natural_key_parts(text, expected):
    # IDs come back from the kubelet: only ASCII digits are numbers, and no text raises.
    assert natural_key(text) == tuple(item for part in expected for item in part)


def test_natural_key_orders_as_its_runs_would():
    """The flat key compares as the list of (kind, length, run) triples it flattens (its old form)."""
    def runs(text):
        return [(0, len(r.lstrip("0")), r.lstrip("0")) if r[0] in "0123456789" else (1, 0, r)
                for r in re.findall(r"[0-9]+|[^0-9]+", text)]

    rng = random.Random(7)
    for _ in range(20000):
        a, b = ("".join(rng.choice("a0123b\x00\u00b29 ") for _ in range(rng.randrange(7))) for _ in range(2))
        assert (natural_key(a) < natural_key(b)) == (runs(a) < runs(b)), (a, b)
        assert (natural_key(a) == natural_key(b)) == (runs(a) == runs(b)), (a, b)


def test_natural_key_takes_digit_runs_longer_than_int_allows():
    # int() refuses more than 4,300 digits (Python 3.11+): GetPreferredAllocation once failed
    # UNKNOWN with a traceback on such an ID.
    long_run = "9" * 5000
    assert sorted(["x" + long_run, "x" + "1" + "0" * 4999, "x10", "x" + "0" * 6000 + "2"], key=natural_key) == \
        ["x" + "0" * 6000 + "2", "x10", "x" + "1" + "0" * 4999, "x" + long_run]


@pytest.mark.parametrize("a, b", [
    ("loop2", "loop10"), ("a9", "a10"), ("1", "a"), ("a", "a0"), ("nvme2n9", "nvme2n10"), ("x1y", "x01z"),
    ("0000:3b:00.0", "0000:3b:00.1"), ("", "0"), ("9" * 5000, "1" + "0" * 5000),
])
def test_natural_key_orders_numbers_by_value(a, b):
    assert natural_key(a) < natural_key(b)


def test_natural_key_agrees_with_int_order_where_int_works():
    rng = random.Random(5)
    words = ["".join(rng.choice("0123456789ab:.") for _ in range(rng.randint(0, 8))) for _ in range(2000)]

    def old_key(text):  # the former int()-based key, where it works
        return [(0, int(r)) if r[0].isdigit() else (1, r) for r in re.findall(r"[0-9]+|[^0-9]+", text)]

    assert sorted(words, key=lambda w: (natural_key(w), w)) == sorted(words, key=lambda w: (old_key(w), w))


@pytest.mark.parametrize("text, expected", [
    ("a0", "'a0'"),
    ("", "''"),
    ("x\x00y\n", "'x\\x00y\\n'"),  # control characters escaped: one line in the log
    ("b" * 128, repr("b" * 128)),
    ("b" * 129, repr("b" * 128) + "... (129 characters)"),
])
def test_quote_id(text, expected):
    assert quote_id(text) == expected


def test_quote_id_is_bounded_for_megabytes():
    quoted = quote_id("\x01" * 4_000_000)
    assert len(quoted) < 4 * 128 + 40 and quoted.endswith("... (4000000 characters)")


def test_shadows_are_not_part_of_equality():
    # A collision recorded on a device is no change the kubelet sees: diff() ignores it.
    plain = dev("a", "a0")
    shadowing = Device("a", "a0", plain.sys_path, plain.sys_name, plain.devnodes, shadows=("/sys/devices/b",))
    assert plain == shadowing and diff({"a": {"a0": plain}}, {"a": {"a0": shadowing}}) == {}


def test_a_diff_counts_the_devices_it_names():
    a, b, c = (Device("example.com/r", i, f"/sys/devices/virtual/misc/{i}", i, ()) for i in "abc")
    assert len(ResourceDiff()) == 0 and not ResourceDiff()
    assert len(ResourceDiff(added=(a, b), changed=((c, c),), removed=(a,))) == 4


FIELDS = {"resource": "b", "id": "z", "sys_path": "/sys/devices/z", "sys_name": "z", "devnodes": ("/dev/z",),
          "numa_nodes": (3,), "health": UNHEALTHY, "reason": "why"}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_but_shadows_makes_devices_differ(name):
    a = dev("a", "a0")
    other = a.replace(**{name: FIELDS[name]})
    assert getattr(other, name) == FIELDS[name] and other != a and not (other == a)
    assert other.shadows == a.shadows and a.replace() == a and hash(a.replace()) == hash(a)
    assert a.replace(shadows=("/sys/devices/b",)) == a  # equal, and hashed alike
    assert hash(a.replace(shadows=("/sys/devices/b",))) == hash(a)


def test_devices_are_immutable_values():
    a = dev("a", "a0")
    with pytest.raises(AttributeError):
        a.health = UNHEALTHY  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.id
    with pytest.raises(AttributeError):
        a.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="no field"):
        a.replace(colour="red")
    assert a.health == HEALTHY and {a: 1}[dev("a", "a0")] == 1
    assert (a == "a0") is False and a != ("a", "a0")
    assert repr(a) == ("Device(resource='a', id='a0', sys_path='/sys/devices/a0', sys_name='a0', "
                       "devnodes=('/dev/x',), numa_nodes=(), health='Healthy', reason='', shadows=())")


def test_diffs_are_immutable_values():
    d = ResourceDiff(added=(A0,), changed=((A1, A1_SICK),), removed=(A2,))
    assert d == ResourceDiff((A0,), ((A1, A1_SICK),), (A2,)) and hash(d) == hash(ResourceDiff((A0,), ((A1, A1_SICK),),
                                                                                           (A2,)))
    assert d != ResourceDiff(added=(A0,)) and d != (A0,)
    with pytest.raises(AttributeError):
        d.added = ()  # type: ignore[misc]
    assert "ResourceDiff(added=(Device(" in repr(d)
