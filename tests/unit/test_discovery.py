"""discovery.py's pure parts: how undecodable udev data is shown, and the VFIO group node of a device
found through its iommu_group link (a real directory tree under tmp_path stands in for sysfs)."""

from __future__ import annotations

import os

import pytest

from udev_device_plugin import discovery


@pytest.mark.parametrize("raw, shown", [
    (b"/sys/devices/virtual/net/x\xff", "/sys/devices/virtual/net/x\\xff"),
    (b"plain", "plain"),
    (b"caf\xc3\xa9", "caf\u00e9"),  # valid UTF-8 stays text
    (b"a\x1bb\nc", "a\\x1bb\\nc"),  # controls escaped: one line in the log
    (b"\xff" * 200, "\\xff" * 128 + "... (200 bytes)"),
])
def test_escaped(raw, shown):
    assert discovery.escaped(raw) == shown


def test_shown_path_takes_surrogate_escaped_paths():
    path = os.fsdecode(b"/sys/devices/virtual/net/x\xff")  # what safe_sys_path() gives for such a device
    assert "\udcff" in path
    assert discovery.shown_path(path) == "/sys/devices/virtual/net/x\\xff"
    assert os.fsencode(path) == b"/sys/devices/virtual/net/x\xff", "refresh() finds the device again"


@pytest.fixture
def sysfs(tmp_path):
    groups = tmp_path / "sys" / "kernel" / "iommu_groups"
    (groups / "42").mkdir(parents=True)
    card = tmp_path / "sys" / "devices" / "pci0000:00" / "0000:3b:00.0"
    card.mkdir(parents=True)
    return card


def test_vfio_group_devnode_from_the_iommu_group_link(sysfs):
    os.symlink("../../../kernel/iommu_groups/42", sysfs / "iommu_group")
    assert discovery.vfio_group_devnode(str(sysfs)) == ("/dev/vfio/42", "")


def test_no_iommu_group(sysfs):
    node, why = discovery.vfio_group_devnode(str(sysfs))
    assert node is None and why == "it has no iommu_group (the IOMMU is off, or the device is not isolated)"


@pytest.mark.parametrize("target", ["../../../kernel/iommu_groups/x1", "../..", "/dev/sda", "42\x1b"])
def test_an_odd_iommu_group_link_gives_no_node(sysfs, target):
    os.symlink(target, sysfs / "iommu_group")
    node, why = discovery.vfio_group_devnode(str(sysfs))
    assert node is None and why.startswith("its iommu_group link points to ") and why.endswith("not a group number")
    assert "\x1b" not in why


def test_a_device_gone_before_its_descendants_are_read_is_left_out(tmp_path):
    """A card unplugged between reading its own sysfs files and asking libudev for its children (the
    umockdev remove test hit it): pyudev's DeviceNotFoundError is no LookupError, and once took the
    daemon down; the device is left out quietly now, its remove event follows."""
    from udev_device_plugin import config, sysfs

    card = tmp_path / "0000:e1:00.0"  # readable as sysfs, unknown to libudev (not below /sys)
    card.mkdir()
    (card / "uevent").write_text("PCI_SLOT_NAME=0000:e1:00.0\n")
    os.symlink("/sys/bus/pci", card / "subsystem")
    res = config.parse([("t.conf", "[resource example.com/accel]\nsubsystem = pci\nchild_devnodes = accel\n")]
                       ).resources[0]
    view = sysfs.SysDevice(str(card), "pci")
    with pytest.raises(discovery.Vanished):
        discovery.descendant_devnodes(None, view)
    current = {}
    assert discovery.refresh(None, res, current, {str(card): "add"}) == ({}, [])


def test_touched_is_the_event_device_and_the_devices_of_ours_above_it():
    from udev_device_plugin import config
    from udev_device_plugin.model import Device

    cfg = config.parse([("t.conf", "[resource example.com/accel]\nsubsystem = pci\n\n"
                                   "[resource example.com/loop]\nsubsystem = block\n")])
    card = "/sys/devices/pci0000:00/0000:3b:00.0"

    def dev(res: str, sys_path: str) -> Device:
        return Device(res, sys_path.rsplit("/", 1)[1], sys_path, sys_path.rsplit("/", 1)[1], (), (), "Healthy", "")

    snapshot = {"example.com/accel": {"a": dev("example.com/accel", card),
                                      "b": dev("example.com/accel", card + "1")},  # a prefix, not a parent
                "example.com/loop": {}}
    paths_of = discovery.device_paths(snapshot)
    child = card + "/accel/accel0"
    assert discovery.touched(cfg.resources, paths_of, "accel", child) == {"example.com/accel": [card]}
    assert discovery.touched(cfg.resources, paths_of, "pci", card + "1") == {"example.com/accel": [card + "1"]}
    assert discovery.touched(cfg.resources, paths_of, "block", "/sys/devices/virtual/block/loop7") == {
        "example.com/loop": ["/sys/devices/virtual/block/loop7"]}
    assert discovery.touched(cfg.resources, paths_of, "bdi", "/sys/devices/virtual/bdi/7:0") == {}
