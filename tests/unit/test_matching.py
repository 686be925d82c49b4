"""matching.py over plain fake device views: selectors, device IDs, health rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import pytest

from udev_device_plugin import config, matching
from udev_device_plugin.config import ResourceConfig
from udev_device_plugin.model import quote_id


@dataclass
class FakeView:
    """What discovery hands matching: the DeviceView protocol, from plain values."""

    sys_name: str = "null"
    subsystem: str = "mem"
    devtype: Optional[str] = None
    driver: Optional[str] = None
    devnode: Optional[str] = "/dev/null"
    properties: Dict[str, str] = field(default_factory=dict)
    attributes: Dict[str, str] = field(default_factory=dict)
    sys_path: str = "/sys/devices/virtual/mem/null"

    def attribute(self, name: str) -> Optional[str]:
        return self.attributes.get(name)


def res(lines: str = "", subsystem: str = "mem") -> ResourceConfig:
    cfg = config.parse([("test.conf", f"[resource example.com/dev]\nsubsystem = {subsystem}\n{lines}")])
    return cfg.resources[0]


PCI = FakeView(sys_name="0000:3b:00.0", subsystem="pci", devtype=None, driver="vfio-pci", devnode=None,
               properties={"PCI_ID": "10EE:5020", "ID_VENDOR_FROM_DATABASE": "Xilinx Corporation",
                           "DRIVER": "vfio-pci"},
               attributes={"vendor": "0x10ee", "device": "0x5020", "numa_node": "1", "device/class": "0x120000"},
               sys_path="/sys/devices/pci0000:3a/0000:3a:00.0/0000:3b:00.0")
LOOP = FakeView(sys_name="loop7", subsystem="block", devtype="disk", devnode="/dev/loop7",
                properties={"DEVTYPE": "disk", "MAJOR": "7", "MINOR": "7"}, attributes={"ro": "0", "size": "0"},
                sys_path="/sys/devices/virtual/block/loop7")


@pytest.mark.parametrize("lines, subsystem, dev, expected", [
    # subsystem: required, exact
    ("", "mem", FakeView(), True),
    ("", "misc", FakeView(), False),
    ("", "memory", FakeView(), False),  # exact, not a prefix
    # kernel globs on the sys_name, any of them
    ("kernel = null zero full", "mem", FakeView(), True),
    ("kernel = zero full", "mem", FakeView(), False),
    ("kernel = n*", "mem", FakeView(), True),
    ("kernel = loop[0-9]", "block", LOOP, True),
    ("kernel = loop[0-6]", "block", LOOP, False),
    ("kernel = loop?", "block", LOOP, True),
    ("kernel = NULL", "mem", FakeView(), False),
    ("kernel = 0000:3b:*", "pci", PCI, True),
    # devtype: a device without one matches no devtype selector
    ("devtype = disk", "block", LOOP, True),
    ("devtype = partition", "block", LOOP, False),
    ("devtype = partition d*", "block", LOOP, True),
    ("devtype = *", "mem", FakeView(), False),
    # driver: an unbound device matches no driver selector
    ("driver = vfio-pci", "pci", PCI, True),
    ("driver = vfio*", "pci", PCI, True),
    ("driver = nvidia", "pci", PCI, False),
    ("driver = *", "mem", FakeView(), False),
    # properties: globs, missing property matches nothing, values case-sensitive
    ("property.PCI_ID = 10EE:*", "pci", PCI, True),
    ("property.PCI_ID = 10ee:*", "pci", PCI, False),
    ("property.ID_VENDOR_FROM_DATABASE = *Xilinx*", "pci", PCI, True),
    ("property.ID_VENDOR_FROM_DATABASE = Xilinx", "pci", PCI, False),
    ("property.ID_SERIAL = *", "pci", PCI, False),
    ("property.MAJOR = 1 7", "block", LOOP, True),
    # attributes: globs, nested names, missing attribute matches nothing
    ("attribute.vendor = 0x10ee", "pci", PCI, True),
    ("attribute.vendor = 0x8086 0x10ee", "pci", PCI, True),
    ("attribute.vendor = 0x8086", "pci", PCI, False),
    ("attribute.device/class = 0x12*", "pci", PCI, True),
    ("attribute.serial = *", "pci", PCI, False),
    ("attribute.ro = 0", "block", LOOP, True),
    # health rules never select
    ("health.attribute.vendor = nope", "pci", PCI, True),
    ("health.property.PCI_ID = nope", "pci", PCI, True),
])
def test_each_selector(lines, subsystem, dev, expected):
    assert matching.matches(res(lines, subsystem), dev) is expected


# Every selector at once; each row breaks exactly one of them.
ALL = """\
kernel = 0000:3b:00.*
driver = vfio-pci
property.PCI_ID = 10EE:5020
property.DRIVER = vfio*
attribute.vendor = 0x10ee
attribute.numa_node = 1
"""


@pytest.mark.parametrize("change, expected", [
    ({}, True),
    ({"subsystem": "usb"}, False),
    ({"sys_name": "0000:3c:00.0"}, False),
    ({"driver": None}, False),
    ({"driver": "xdma"}, False),
    ({"properties": {"PCI_ID": "10EE:5020"}}, False),  # DRIVER property gone
    ({"properties": {"PCI_ID": "10EE:9999", "DRIVER": "vfio-pci"}}, False),
    ({"attributes": {"vendor": "0x10ee", "numa_node": "0"}}, False),
    ({"attributes": {"numa_node": "1"}}, False),  # vendor unreadable
])
def test_selectors_are_anded(change, expected):
    dev = FakeView(**{**PCI.__dict__, **change})
    assert matching.matches(res(ALL, "pci"), dev) is expected


@pytest.mark.parametrize("lines, dev, expected", [
    ("", FakeView(), ("null", "")),
    ("id = sys_name", LOOP, ("loop7", "")),
    ("id = devnode", FakeView(), ("null", "")),
    ("id = devnode", FakeView(devnode="/dev/bus/usb/001/004"), ("bus-usb-001-004", "")),
    ("id = devnode", FakeView(devnode="/dev/dri/renderD128"), ("dri-renderD128", "")),
    ("id = property.ID_SERIAL_SHORT", FakeView(properties={"ID_SERIAL_SHORT": "SN-0042"}), ("SN-0042", "")),
    ("id = attribute.serial", FakeView(attributes={"serial": "XFL1A2B3C"}), ("XFL1A2B3C", "")),
    ("id = attribute.device/serial", FakeView(attributes={"device/serial": "a:b@c+d=e,f_g.h"}),
     ("a:b@c+d=e,f_g.h", "")),
    ("id = property.X", FakeView(properties={"X": "a" * 128}), ("a" * 128, "")),
    # 0000:3b:00.0 is a valid ID as it is: ':' and '.' are allowed
    ("", PCI, ("0000:3b:00.0", "")),
])
def test_device_id(lines, dev, expected):
    assert matching.device_id(res(lines), dev) == expected


@pytest.mark.parametrize("lines, dev, why", [
    ("id = devnode", FakeView(devnode=None), "devnode is not set"),
    ("id = devnode", FakeView(devnode=""), "devnode is not set"),
    ("id = property.ID_SERIAL", FakeView(), "property.ID_SERIAL is not set"),
    ("id = property.ID_SERIAL", FakeView(properties={"ID_SERIAL": ""}), "property.ID_SERIAL is not set"),
    ("id = attribute.serial", FakeView(), "attribute.serial is not set"),
    ("id = attribute.serial", FakeView(attributes={"serial": ""}), "attribute.serial is not set"),
])
def test_device_without_id(lines, dev, why):
    assert matching.device_id(res(lines), dev) == (None, why)


@pytest.mark.parametrize("value", [
    "has space",
    "-leading-dash",
    ".hidden",
    "_under",
    "slash/inside",
    "new\nline",
    "trailing-newline\n",
    "tab\t",
    "quote'",
    "caf\u00e9",
    "\u0663",
    "a" * 129,
])
def test_unusable_id(value):
    got, why = matching.device_id(res("id = property.ID"), FakeView(properties={"ID": value}))
    assert got is None
    assert why == f"property.ID value {quote_id(value)} is not a usable ID (letters, digits and _.:@+=,- up to 128)"


def test_a_long_value_is_quoted_truncated_in_reasons():
    long = "x" * 4096  # a sysfs attribute holds up to a page
    _, why = matching.device_id(res("id = property.ID"), FakeView(properties={"ID": long}))
    assert why == f"property.ID value {'x' * 128!r}... (4096 characters) is not a usable ID " \
                  "(letters, digits and _.:@+=,- up to 128)"
    healthy, reason = matching.rule_health(res("health.attribute.state = ok"), FakeView(attributes={"state": long}))
    assert not healthy and reason == f"attribute state is {'x' * 128!r}... (4096 characters), expected ok"


@pytest.mark.parametrize("lines, dev, expected", [
    ("", FakeView(), (True, "")),
    ("health.attribute.status = ok", FakeView(attributes={"status": "ok"}), (True, "")),
    ("health.attribute.status = ok good*", FakeView(attributes={"status": "goodish"}), (True, "")),
    ("health.attribute.status = ok", FakeView(attributes={"status": "failed"}),
     (False, "attribute status is 'failed', expected ok")),
    ("health.attribute.status = ok good", FakeView(),
     (False, "attribute status is None, expected ok good")),
    ("health.property.ID_HEALTH = 1", FakeView(properties={"ID_HEALTH": "1"}), (True, "")),
    ("health.property.ID_HEALTH = 1", FakeView(properties={"ID_HEALTH": "0"}),
     (False, "property ID_HEALTH is '0', expected 1")),
    ("health.property.ID_HEALTH = 1", FakeView(), (False, "property ID_HEALTH is None, expected 1")),
    # every rule must hold; the first that fails is the reason
    ("health.attribute.a = 1\nhealth.attribute.b = 2", FakeView(attributes={"a": "1", "b": "2"}), (True, "")),
    ("health.attribute.a = 1\nhealth.attribute.b = 2", FakeView(attributes={"a": "1", "b": "3"}),
     (False, "attribute b is '3', expected 2")),
    ("health.attribute.a = 1\nhealth.attribute.b = 2", FakeView(attributes={"a": "0", "b": "3"}),
     (False, "attribute a is '0', expected 1")),
    ("health.attribute.a = 1\nhealth.property.P = x", FakeView(attributes={"a": "1"}, properties={"P": "y"}),
     (False, "property P is 'y', expected x")),
    # selectors are not health rules
    ("attribute.a = 1", FakeView(attributes={"a": "0"}), (True, "")),
])
def test_rule_health(lines, dev, expected):
    assert matching.rule_health(res(lines), dev) == expected


def test_compiled_globs_match_as_fnmatchcase():
    """matches_globs compiles each selector's globs into one pattern: the answers are fnmatchcase's."""
    import fnmatch
    import random
    import re

    def usable(glob):  # what the config accepts (see test_a_glob_fnmatch_cannot_use_is_refused)
        try:
            re.compile(fnmatch.translate(glob))
        except re.error:
            return False
        return True

    rng = random.Random(3)
    for _ in range(20000):
        globs = tuple(g for g in ("".join(rng.choice("ab*?[]!-\\./0^$(|") for _ in range(rng.randrange(6)))
                                  for _ in range(rng.randrange(4))) if usable(g))
        value = "".join(rng.choice("ab[]*?!-./0\\\n^$(|") for _ in range(rng.randrange(6)))
        assert config.matches_globs(value, globs) == any(fnmatch.fnmatchcase(value, g) for g in globs), (value, globs)
    assert not config.matches_globs(None, ("*",))


def test_compiled_globs_are_bounded():
    for i in range(config._GLOB_PATTERNS_MAX + 10):
        assert config.matches_globs(f"x{i}", (f"x{i}",))
    assert len(config._GLOB_PATTERNS) <= config._GLOB_PATTERNS_MAX


def test_a_glob_fnmatch_cannot_use_is_refused():
    """Python 3.9's fnmatch cannot compile a reversed range ([z-a]): refused when the config is read,
    naming the key, where matching would raise; where fnmatch takes it (3.11 on), it matches nothing."""
    try:
        res = config.parse([("t.conf", "[resource example.com/x]\nsubsystem = block\nkernel = [z-a]*\n")]).resources[0]
    except config.ConfigError as exc:
        assert "kernel" in str(exc) and "[z-a]*" in str(exc) and "no glob fnmatch can use" in str(exc)
    else:
        assert not config.matches_globs("loop0", res.kernel) and not config.matches_globs("z", res.kernel)
