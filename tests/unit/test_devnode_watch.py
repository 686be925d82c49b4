"""hotplug.DevnodeWatch on real inotify (directories under tmp_path stand in for /dev): it watches the
directories that hold a device's node or an extra node, counted per device, so that a hotplug event
at 10,000 devices adjusts one directory's count instead of recomputing them all."""

from __future__ import annotations

import os

from udev_device_plugin.hotplug import DevnodeWatch


def test_a_directory_is_watched_while_any_device_has_a_node_in_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    watch = DevnodeWatch()
    try:
        watch.adjust(added=[f"{a}/x", f"{a}/shared", f"{b}/y"])
        watch.adjust(added=[f"{a}/shared"])  # a second device with the same node
        assert watch.directories == {str(a), str(b)}
        watch.adjust(removed=[f"{b}/y"])
        assert watch.directories == {str(a)}
        watch.adjust(removed=[f"{a}/x", f"{a}/shared"])
        assert watch.directories == {str(a)}, "the other device with /shared still holds it"
        (a / "shared").write_text("")
        assert watch.changed() == {f"{a}/shared"}
        watch.adjust(removed=[f"{a}/shared"])
        assert watch.directories == set()
    finally:
        watch.close()


def test_extra_nodes_hold_their_directory_apart_from_the_devices(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    watch = DevnodeWatch()
    try:
        watch.set_extra([f"{a}/extra"])
        watch.adjust(added=[f"{a}/x"])
        watch.adjust(removed=[f"{a}/x"])
        assert watch.directories == {str(a)}
        watch.set_extra([])
        assert watch.directories == set()
    finally:
        watch.close()


def test_a_directory_that_appears_later_is_watched_at_the_next_device_in_it(tmp_path):
    later = tmp_path / "accel"
    watch = DevnodeWatch()
    try:
        watch.adjust(added=[f"{later}/accel0"])
        assert watch.directories == set()  # no such directory yet: nothing to watch
        later.mkdir()
        watch.adjust(added=[f"{later}/accel1"])
        assert watch.directories == {str(later)}
        os.rmdir(later)  # the watch ends with the directory (IN_IGNORED)
        watch.changed()
        assert watch.directories == set()
        later.mkdir()
        watch.adjust(added=[f"{later}/accel2"])
        assert watch.directories == {str(later)}
    finally:
        watch.close()
