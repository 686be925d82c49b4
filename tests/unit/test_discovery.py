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
    assert discovery.refresh(None, res, current, {str(card): "add"}) == ({}, [], {str(card): None})


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
    paths_of = {name: {d.sys_path for d in devices.values()} for name, devices in snapshot.items()}
    child = card + "/accel/accel0"
    assert discovery.touched(cfg.resources, paths_of, "accel", child) == {"example.com/accel": [card]}
    assert discovery.touched(cfg.resources, paths_of, "pci", card + "1") == {"example.com/accel": [card + "1"]}
    assert discovery.touched(cfg.resources, paths_of, "block", "/sys/devices/virtual/block/loop7") == {
        "example.com/loop": ["/sys/devices/virtual/block/loop7"]}
    assert discovery.touched(cfg.resources, paths_of, "bdi", "/sys/devices/virtual/bdi/7:0") == {}


# --- refresh at scale: the devices an event does not name stay as they are -----------------------

def _misc_resource():
    from udev_device_plugin import config

    return config.parse([("t.conf", "[resource example.com/dev]\nsubsystem = misc\nkernel = d*\n")]).resources[0]


def _synthetic(ids):
    from udev_device_plugin.model import Device

    return {i: Device("example.com/dev", i, f"/sys/devices/virtual/misc/{i}", i, (f"/dev/{i}",)) for i in ids}


def _fake_misc_device(tmp_path, name):
    """A directory sysfs.SysDevice reads as a misc device with node /dev/<name>."""
    path = tmp_path / name
    path.mkdir()
    (path / "uevent").write_text(f"MAJOR=10\nMINOR=99\nDEVNAME={name}\n")
    os.symlink("/sys/class/misc", path / "subsystem")
    return str(path)


def test_placed_is_the_order_a_full_sort_gives():
    import random

    from udev_device_plugin.model import natural_key

    rng = random.Random(13)
    universe = [f"d{n}" for n in range(400)] + [f"d{n}x{m}" for n in range(20) for m in range(5)] + ["e", "dz"]
    for _ in range(200):
        current = discovery._ordered(_synthetic(rng.sample(universe, rng.randrange(0, 300))))
        gone = set(rng.sample(list(current), min(len(current), rng.randrange(0, 4))))
        new = _synthetic(rng.sample(universe, rng.randrange(0, 30)))
        new = {k: v for k, v in new.items() if k not in current or k in gone}
        got = discovery._placed(current, gone, new)
        expected = {k: v for k, v in current.items() if k not in gone or k in new}
        expected.update(new)
        assert list(got) == sorted(expected, key=natural_key)
        assert got == expected


def test_refresh_keeps_every_device_it_was_not_asked_about(tmp_path):
    res = _misc_resource()
    current = discovery._ordered(_synthetic([f"d{n}" for n in range(1000)]))
    by_path = {d.sys_path: d for d in current.values()}
    added = _fake_misc_device(tmp_path, "d1500")
    early = _fake_misc_device(tmp_path, "d77x")
    gone = current["d500"].sys_path
    got = discovery.refresh(None, res, current, {gone: "remove", added: "add", early: "add"},
                            exists=lambda p: True, by_path=by_path)
    assert got is not None
    assert got.at == {gone: None, added: got.devices["d1500"], early: got.devices["d77x"]}
    ids = list(got.devices)
    assert ids[-1] == "d1500" and ids[ids.index("d77") + 1] == "d77x" and "d500" not in ids
    assert all(got.devices[k] is dev for k, dev in current.items() if k != "d500")
    assert len(ids) == 1001 and got.problems == []
    # The same without the caller's index.
    assert discovery.refresh(None, res, current, {gone: "remove", added: "add", early: "add"},
                             exists=lambda p: True) == got


def test_refresh_gives_way_to_a_scan_when_a_new_device_claims_an_id_in_use(tmp_path):
    res = _misc_resource()
    current = _synthetic(["d1", "d2"])
    clone = _fake_misc_device(tmp_path, "d2")  # another sys_path, the same ID as /sys/devices/virtual/misc/d2
    assert discovery.refresh(None, res, current, {clone: "add"}, exists=lambda p: True) is None


def test_node_listing_answers_as_os_path_exists(tmp_path):
    """A full scan's listing of node directories says what a stat per node would, links included."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "node").write_text("")
    (tmp_path / "sub" / "deep").write_text("")
    os.symlink("node", tmp_path / "link")
    os.symlink("gone", tmp_path / "dangling")
    os.symlink("sub", tmp_path / "dirlink")
    os.mkfifo(tmp_path / "fifo")
    names = ["node", "link", "dangling", "dirlink", "dirlink/deep", "sub", "sub/", "sub/deep", "sub/none",
             "none", "none/x", ".", "..", "sub/..", "fifo", "node/x", ""]
    paths = [f"{tmp_path}/{n}" for n in names] + ["/", "relative", "/nonexistent-dir/x"]
    listing = discovery.NodeListing()
    for path in paths:
        assert listing(path) == os.path.exists(path), path
    # Read once per directory: a node removed after its directory was listed still reads as there
    # (one scan's view), and a new listing sees it gone.
    os.unlink(tmp_path / "node")
    assert listing(f"{tmp_path}/node") and not discovery.NodeListing()(f"{tmp_path}/node")


def test_a_uevent_file_is_split_as_libudev_reads_it(tmp_path):
    """Each line at its first "=", lines without one left out, the last of a key kept: the one regular
    expression gives what splitting line by line gives, on random bytes made of what such a file holds."""
    import random

    from udev_device_plugin import sysfs

    def by_lines(data):
        event = {}
        for line in data.split(b"\n"):
            key, sep, value = line.partition(b"=")
            if sep:
                event[key] = value
        return event

    rng = random.Random(7)
    pieces = [b"=", b"\n", b"A", b"b", b"\r", b"\x00", b"\xff", b" ", b"==", b"\n\n", b"DEVNAME=", b"=\n"]
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 24)))
        assert dict(sysfs._UEVENT_LINE.findall(data)) == by_lines(data), data
    device = tmp_path / "loop7"
    device.mkdir()
    (device / "uevent").write_bytes(b"MAJOR=7\nMINOR=7\nDEVNAME=loop7\nDEVTYPE=disk\nEMPTY=\nODD=a=b\nno equals sign\n")
    view = sysfs.SysDevice(str(device), "block")
    assert view.uevent() == {b"MAJOR": b"7", b"MINOR": b"7", b"DEVNAME": b"loop7", b"DEVTYPE": b"disk",
                             b"EMPTY": b"", b"ODD": b"a=b"}
    assert view.devnode == "/dev/loop7" and view.devtype == "disk"


@pytest.mark.parametrize("base", ["/sys/class/block", "/sys/bus/pci/devices", "/sys", "/"])
def test_a_link_target_resolves_as_normpath_resolves_it(base):
    """The kernel's form ("../" repeated, then a plain path) joined at once; any other target as
    os.path.normpath gives it: the same path for random targets made of dots, slashes and names."""
    import random

    from udev_device_plugin import sysfs

    heads = sysfs._heads(base)
    rng = random.Random(base)
    targets = ["../../devices/virtual/block/loop0", "../../../devices/pci0000:00/0000:00:01.0", "", "/abs/x",
               "../" * 9 + "x", "../a/./b", "../a/../b", "../a//b", "../a/", "../.hidden", "..x/y", "./x"]
    targets += ["".join(rng.choice("./ab") for _ in range(rng.randrange(0, 14))) for _ in range(50000)]
    targets += ["../" * rng.randrange(1, 7) + "".join(rng.choice("./ab") for _ in range(rng.randrange(0, 8)))
                for _ in range(50000)]
    for target in targets:
        assert sysfs.resolved(base, heads, target) == os.path.normpath(os.path.join(base, target)), target


def test_subsystem_paths_are_the_devices_the_links_name(tmp_path, monkeypatch):
    """A class directory's links, resolved; its plain files are no devices; a bus directory's too."""
    from udev_device_plugin import sysfs

    root = tmp_path / "sys"
    for dev in ("devices/virtual/block/loop0", "devices/pci0000:00/0000:00:01.0/block/vda", "devices/odd/dev"):
        (root / dev).mkdir(parents=True)
    klass = root / "class" / "block"
    klass.mkdir(parents=True)
    os.symlink("../../devices/virtual/block/loop0", klass / "loop0")
    os.symlink("../../devices/pci0000:00/0000:00:01.0/block/vda", klass / "vda")
    os.symlink("../../devices/./odd/../odd/dev", klass / "odd")  # not the kernel's form: normpath's way
    (klass / "README").write_text("not a device")
    monkeypatch.setattr(sysfs, "SYS", str(root))
    assert sorted(sysfs.subsystem_paths("block")) == sorted(
        f"{root}/devices/{d}" for d in ("virtual/block/loop0", "pci0000:00/0000:00:01.0/block/vda", "odd/dev"))
    assert sysfs.subsystem_paths("none") is None


def test_strict_takes_text_and_refuses_surrogates():
    from udev_device_plugin import sysfs

    assert sysfs.strict("x", "loop0") == "loop0" and sysfs.strict("x", "h\u00e9") == "h\u00e9"
    with pytest.raises(sysfs.Undecodable) as got:
        sysfs.strict("its kernel name", os.fsdecode(b"bad\xff"))
    assert got.value.raw == b"bad\xff" and got.value.what == "its kernel name"
