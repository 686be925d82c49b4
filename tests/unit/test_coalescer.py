"""hotplug.Coalescer: when gathered udev changes are applied, as a pure function of events and a clock."""

from __future__ import annotations

import pytest

from udev_device_plugin.hotplug import Coalescer

A = {"example.com/loop": {"/sys/devices/virtual/block/loop100": "add"}}
B = {"example.com/loop": {"/sys/devices/virtual/block/loop101": "add"}}


def test_an_event_after_a_quiet_spell_is_applied_at_once():
    c = Coalescer(quiet=0.005, holdoff=0.02)
    assert c.add(10.0, A) == 10.0
    changes, full = c.take(10.0)
    assert changes == A and full == set()


def test_a_burst_waits_for_the_holdoff_after_the_last_application():
    c = Coalescer(quiet=0.005, holdoff=0.02)
    c.add(10.0, A)
    c.take(10.0)
    # The next event comes 1 ms later: part of a burst.
    assert c.add(10.001, B) == 10.02
    # More of the burst: already scheduled, nothing new to decide.
    assert c.add(10.002, {"example.com/loop": {"/sys/x": "add"}}) is None
    changes, _ = c.take(10.02)
    assert set(changes["example.com/loop"]) == {"/sys/devices/virtual/block/loop101", "/sys/x"}


def test_a_change_of_an_ancestor_does_not_hide_the_devices_own_action():
    c = Coalescer()
    c.add(1.0, {"r": {"/sys/a": "remove"}})
    c.add(1.0, {"r": {"/sys/a": "change"}})
    assert c.take(1.0)[0] == {"r": {"/sys/a": "remove"}}
    c.add(2.0, {"r": {"/sys/a": "add"}})
    c.add(2.0, {"r": {"/sys/a": "remove"}})
    assert c.take(2.0)[0] == {"r": {"/sys/a": "remove"}}


def test_inotify_changes_do_not_count_as_udev_arrivals():
    c = Coalescer(quiet=0.005, holdoff=0.02, node_hold=0.05)
    c.add(5.0, A)
    c.take(5.0)
    # A device node vanished, and no udev event came: applied at the end of its hold.  It never
    # makes the next udev event look like part of a burst.
    assert c.add(5.03, B, arrival=False) == 5.08
    assert c.add(5.04, B, arrival=False) is None  # held already
    c.take(5.08)
    assert c.add(5.081, A) == 5.081  # the last udev arrival was 5.0: quiet


def test_a_node_change_waits_for_the_event_that_follows_it():
    """An unplug: the kernel deletes the node, then sends the remove some milliseconds later.  The
    remove cuts the hold short and is applied at once, with the node change: one list, no
    'unhealthy' in between."""
    c = Coalescer(quiet=0.005, holdoff=0.02, node_hold=0.05)
    c.add(1.0, A)
    c.take(1.0)
    assert c.add(2.0, {"r": {"/sys/a": "change"}}, arrival=False) == 2.05
    assert c.add(2.006, {"r": {"/sys/a": "remove"}}) == 2.006
    assert c.take(2.006) == ({"r": {"/sys/a": "remove"}}, set())
    # Within a burst the event waits for the burst's holdoff, which is sooner than the hold.
    assert c.add(2.1, B) == 2.1
    c.take(2.1)
    assert c.add(2.101, {"r": {"/sys/c": "change"}}, arrival=False) == pytest.approx(2.151)
    assert c.add(2.102, {"r": {"/sys/c": "remove"}}) == pytest.approx(2.12)  # 20 ms after the last application
    assert c.add(2.103, {"r": {"/sys/d": "add"}}) is None  # scheduled already
    assert c.take(2.12) == ({"r": {"/sys/c": "remove", "/sys/d": "add"}}, set())


def test_full_rescans_are_gathered_too():
    c = Coalescer()
    assert c.add(1.0, {}, full=["r"]) == 1.0
    assert c.take(1.0) == ({}, {"r"})
    assert c.add(2.0, {}) is None

