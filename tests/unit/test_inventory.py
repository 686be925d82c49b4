"""inventory.py without udev: the per-resource index an event is looked up in stays what a rebuild
would give, the published list keeps the devices nobody touched as the very objects they were, and
health_command overrides cost only the devices they name."""

from __future__ import annotations

import os

from udev_device_plugin import config, discovery, inventory
from udev_device_plugin.model import UNHEALTHY, Device
from udev_device_plugin.servicer import ResourceState

NAME = "example.com/dev"


class Sink:
    def __init__(self):
        self.events = []

    def emit(self, event):
        self.events.append(event)


def setup(ids, nodes=lambda i: (f"/dev/{i}",)):
    res = config.parse([("t.conf", f"[resource {NAME}]\nsubsystem = misc\nkernel = d*\n")]).resources[0]
    inv = inventory.Inventory(Sink())
    inv.add(ResourceState(res))
    raw = {i: Device(NAME, i, f"/sys/devices/virtual/misc/{i}", i, nodes(i)) for i in ids}
    inv.raw[NAME] = discovery._ordered(raw)
    inv.index[NAME] = inventory._Index(inv.raw[NAME])
    inv.publish(NAME)
    return inv


def rebuilt(inv):
    fresh = inventory._Index(inv.raw[NAME])
    return fresh.by_path, fresh.by_node


def test_a_removal_updates_the_index_and_keeps_the_other_devices():
    # Two devices share /dev/shared (one VFIO group node for two functions, say).
    inv = setup([f"d{n}" for n in range(50)], nodes=lambda i: (f"/dev/{i}", "/dev/shared") if i in ("d1", "d2")
                else (f"/dev/{i}",))
    before = dict(inv.states[NAME].current()[1])
    change = inv.refresh(None, NAME, {"/sys/devices/virtual/misc/d1": "remove"})
    assert [d.id for d in change.removed] == ["d1"] and not change.added and not change.changed
    index = inv.index[NAME]
    assert (index.by_path, index.by_node) == rebuilt(inv)
    assert index.paths_at("/dev/shared") == {"/sys/devices/virtual/misc/d2"}
    assert inv.at_nodes(NAME, {"/dev/shared", "/dev/d7"}) == {"/sys/devices/virtual/misc/d2",
                                                                "/sys/devices/virtual/misc/d7"}
    now = inv.states[NAME].current()[1]
    assert all(now[k] is dev for k, dev in before.items() if k != "d1")
    assert inv.counts() == (49, 0)
    assert "/sys/devices/virtual/misc/d1" not in inv.paths(NAME)


def test_an_add_goes_into_the_index(tmp_path):
    inv = setup(["d1", "d3"])
    path = tmp_path / "d2"
    path.mkdir()
    (path / "uevent").write_text("MAJOR=10\nMINOR=99\nDEVNAME=d2\n")
    os.symlink("/sys/class/misc", path / "subsystem")
    change = inv.refresh(None, NAME, {str(path): "add"})
    assert [d.id for d in change.added] == ["d2"]
    assert list(inv.states[NAME].current()[1]) == ["d1", "d2", "d3"]
    index = inv.index[NAME]
    assert (index.by_path, index.by_node) == rebuilt(inv)
    assert str(path) in inv.paths(NAME)


def test_command_health_overrides_only_the_devices_it_names_and_counts_follow():
    inv = setup([f"d{n}" for n in range(100)])
    raw = inv.raw[NAME]
    assert inv.effective(NAME) is raw  # nothing overrides: the scan's own mapping
    change = inv.health_result(NAME, "d5", False, "exit 1", threshold=1)
    assert [(a.id, b.health) for a, b in change.changed] == [("d5", UNHEALTHY)]
    now = inv.states[NAME].current()[1]
    assert now["d5"].reason == "exit 1" and all(now[k] is raw[k] for k in raw if k != "d5")
    assert inv.counts() == (100, 1)
    inv.health_result(NAME, "d6", False, "stuck", threshold=1, stuck=True)
    assert inv.counts() == (100, 2)
    assert inv.health_result(NAME, "d5", True, "", threshold=1) is not None
    assert inv.release_stuck(NAME, "d6") is not None
    assert inv.counts() == (100, 0) and inv.effective(NAME) is raw
    assert inv.command_health.failing() == []


def test_a_refresh_diffs_only_its_devices_unless_an_override_is_published(monkeypatch):
    """Without overrides the diff is of the refreshed IDs only (model.diff_of, never the full diff);
    with a health_command override published, the published list is no scan's mapping and the
    full diff runs, keeping the override; both give the events of what really changed."""
    inv = setup([f"d{n}" for n in range(30)])
    full_diffs = []
    real_diff = inventory.diff
    monkeypatch.setattr(inventory, "diff", lambda old, new: full_diffs.append(1) or real_diff(old, new))
    change = inv.refresh(None, NAME, {"/sys/devices/virtual/misc/d3": "remove"})
    assert [d.id for d in change.removed] == ["d3"] and not full_diffs
    assert inv.refresh(None, NAME, {"/sys/devices/virtual/misc/nothing": "remove"}) is None and not full_diffs
    assert inv.health_result(NAME, "d5", False, "exit 1", threshold=1) is not None
    full_diffs.clear()
    change = inv.refresh(None, NAME, {"/sys/devices/virtual/misc/d4": "remove"})
    assert [d.id for d in change.removed] == ["d4"] and not change.changed and full_diffs
    now = inv.states[NAME].current()[1]
    assert now["d5"].health == UNHEALTHY and "d4" not in now and "d3" not in now
    events = [(e.kind, e.device_id) for e in inv.sink.events]
    assert events[-3:] == [("removed", "d3"), ("unhealthy", "d5"), ("removed", "d4")]


def test_a_rescan_keeps_the_devices_it_finds_again(tmp_path, monkeypatch):
    """A full rescan that finds the devices as they were returns the very mapping it had (no sort, no
    index to build again, nothing published); one that finds a change keeps every other device as the
    object it was, in the order it had, and the index is what a rebuild gives."""
    import random

    from udev_device_plugin import sysfs

    nodes = tmp_path / "dev"
    nodes.mkdir()
    paths = []

    def plug(name):
        path = tmp_path / "sys" / name
        path.mkdir(parents=True)
        (path / "uevent").write_text(f"MAJOR=10\nMINOR=1\nDEVNAME={nodes / name}\n")
        (nodes / name).write_text("")
        paths.append(str(path))

    for n in range(30):
        plug(f"d{n}")
    rng = random.Random(3)
    monkeypatch.setattr(discovery, "subsystem_devices", lambda context, subsystem: (
        sysfs.SysDevice(p, subsystem) for p in rng.sample(paths, len(paths))))  # sysfs lists in no order
    res = config.parse([("t.conf", f"[resource {NAME}]\nsubsystem = misc\nkernel = d*\n")]).resources[0]
    inv = inventory.Inventory(Sink())
    inv.add(ResourceState(res))
    assert len(inv.scan(None, [NAME])[NAME].added) == 30
    raw, index = inv.raw[NAME], inv.index[NAME]
    assert list(raw) == [f"d{n}" for n in range(30)]

    assert inv.scan(None, [NAME]) == {}
    assert inv.raw[NAME] is raw and inv.index[NAME] is index and inv.states[NAME].current()[1] is raw

    (nodes / "d5").unlink()
    change = inv.scan(None, [NAME])[NAME]
    assert [(a.id, b.health) for a, b in change.changed] == [("d5", UNHEALTHY)] and not change.added
    now = inv.raw[NAME]
    assert list(now) == list(raw) and all(now[k] is raw[k] for k in raw if k != "d5")
    assert (inv.index[NAME].by_path, inv.index[NAME].by_node) == rebuilt(inv)

    plug("d30")
    plug("c1")  # not matched: kernel = d*
    paths.remove(str(tmp_path / "sys" / "d3"))
    change = inv.scan(None, [NAME])[NAME]
    assert [d.id for d in change.added] == ["d30"] and [d.id for d in change.removed] == ["d3"]
    after = inv.raw[NAME]
    assert list(after) == [f"d{n}" for n in range(31) if n != 3]
    assert all(after[k] is now[k] for k in after if k != "d30")
    assert (inv.index[NAME].by_path, inv.index[NAME].by_node) == rebuilt(inv)


def test_a_device_equal_but_for_its_shadows_is_the_new_one():
    """shadows take no part in equality: a rescan that finds a device hiding another (or no longer)
    must keep the new object, or a refresh would not know to scan again when it leaves."""
    old = {"d1": Device(NAME, "d1", "/sys/devices/virtual/misc/d1", "d1", ("/dev/d1",))}
    new = {"d1": Device(NAME, "d1", "/sys/devices/virtual/misc/d1", "d1", ("/dev/d1",),
                        shadows=("/sys/devices/virtual/misc/x/d1",))}
    kept = discovery._kept(dict(new), old)
    assert kept is not old and kept["d1"] is new["d1"]
    assert discovery._kept(dict(old), new)["d1"] is old["d1"]
    assert discovery._kept(dict(old), None) == old
