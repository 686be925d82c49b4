"""What this VM lacks, with umockdev: PCI cards with vendor/device attributes on NUMA nodes 0 and 1,
child device nodes, add/remove/change uevents, attribute-driven health, NUMA-aligned preferred
allocation.  The daemon runs under umockdev-wrapper (and refuses to run without its preload)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Iterator, List

import pytest

from tests.conftest import wait_until
from tests.unit import examples

from . import mockdev

RES = "example.com/accel"
CONFIG = """
[resource example.com/accel]
subsystem = pci
attribute.vendor = 0x8086
attribute.device = 0x0b5b
child_devnodes = accel
health.attribute.enable = 1

# The same cards, handed to vfio-pci for a VM.
[resource example.com/vfio]
subsystem = pci
attribute.vendor = 0x8086
driver = vfio-pci
"""
VFIO = "example.com/vfio"
VENDOR, DEVICE = "0x8086", "0x0b5b"


@pytest.fixture
def testbed() -> Iterator[mockdev.Testbed]:
    problem = mockdev.problem()
    if problem:
        pytest.fail(f"cannot run the umockdev tests: {problem}", pytrace=False)
    bed = mockdev.Testbed()
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture
def cards(testbed) -> Dict[str, str]:
    """Four matching cards, two per NUMA node, each with an accel child and its /dev node; one behind
    a bridge (NUMA from the bridge); one without NUMA; one of another vendor."""
    paths = {}
    for index, (address, node) in enumerate([("0000:3b:00.0", 0), ("0000:3c:00.0", 0),
                                             ("0000:af:00.0", 1), ("0000:b0:00.0", 1)]):
        paths[address] = testbed.add_pci(address, VENDOR, DEVICE, node)
        testbed.add_accel(paths[address], index)
    bridge = testbed.add_pci("0000:d8:00.0", VENDOR, "0x2030", 1)
    paths["0000:d9:00.0"] = testbed.add("pci", "0000:d9:00.0", bridge,
                                        {"vendor": VENDOR, "device": DEVICE, "enable": 1}, {})
    testbed.add_accel(paths["0000:d9:00.0"], 4)
    paths["0000:e0:00.0"] = testbed.add_pci("0000:e0:00.0", VENDOR, DEVICE, -1)
    testbed.add_pci("0000:5e:00.0", "0x10de", DEVICE, 0)
    return paths


@pytest.fixture
def daemon(testbed, cards, start_daemon, kubelet):
    d = start_daemon(CONFIG, env=testbed.env(), wrapper=testbed.wrapper())
    wait_until(lambda: (kubelet.messages.get(RES, 0) >= 1 and kubelet.messages.get(VFIO, 0) >= 1)
               or d.proc.poll() is not None, timeout=20,
               what="the daemon's first ListAndWatch message")
    assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}:\n{d.log()}"
    return d


def devices(kubelet) -> Dict[str, dict]:
    return kubelet.devices.get(RES, {})


def host_paths(kubelet, *ids: str) -> List[str]:
    response = kubelet.allocate(RES, list(ids))
    return [d.host_path for d in response.container_responses[0].devices]


def numa(kubelet, dev_id: str) -> List[int]:
    return devices(kubelet)[dev_id]["numa_nodes"]


def test_list_and_watch_reports_numa_topology_and_child_nodes(daemon, kubelet):
    assert devices(kubelet) == {
        "0000:3b:00.0": {"id": "0000:3b:00.0", "health": "Healthy", "numa_nodes": [0]},
        "0000:3c:00.0": {"id": "0000:3c:00.0", "health": "Healthy", "numa_nodes": [0]},
        "0000:af:00.0": {"id": "0000:af:00.0", "health": "Healthy", "numa_nodes": [1]},
        "0000:b0:00.0": {"id": "0000:b0:00.0", "health": "Healthy", "numa_nodes": [1]},
        # No numa_node of its own: the bridge above it has one.
        "0000:d9:00.0": {"id": "0000:d9:00.0", "health": "Healthy", "numa_nodes": [1]},
        # numa_node -1: no affinity, so no topology.
        "0000:e0:00.0": {"id": "0000:e0:00.0", "health": "Healthy", "numa_nodes": []},
    }
    # The card itself has no node: what a container gets is its child's.
    assert host_paths(kubelet, "0000:3b:00.0") == ["/dev/accel/accel0"]
    assert host_paths(kubelet, "0000:d9:00.0", "0000:af:00.0") == ["/dev/accel/accel4", "/dev/accel/accel2"]
    assert host_paths(kubelet, "0000:e0:00.0") == []


def test_preferred_allocation_stays_on_one_numa_node(daemon, kubelet):
    everything = sorted(devices(kubelet))
    node = {i: tuple(numa(kubelet, i)) for i in everything}

    two = kubelet.preferred(RES, everything, [], 2)
    assert len(two) == 2 and node[two[0]] == node[two[1]] != (), two
    # Node 1 has the most free devices: three fit there.
    three = kubelet.preferred(RES, everything, [], 3)
    assert {node[i] for i in three} == {(1,)}, three
    # A device already chosen on node 0 pulls the rest to node 0.
    chosen = kubelet.preferred(RES, everything, ["0000:3c:00.0"], 2)
    assert chosen == ["0000:3c:00.0", "0000:3b:00.0"]
    # Only what the kubelet offers is chosen; when one node cannot hold them all, fill it first.
    offered = ["0000:3b:00.0", "0000:af:00.0", "0000:b0:00.0", "0000:e0:00.0"]
    three = kubelet.preferred(RES, offered, [], 3)
    assert set(three) <= set(offered) and [node[i] for i in three].count((1,)) == 2, three
    assert kubelet.preferred(RES, offered, [], 4)[-1] == "0000:e0:00.0", "no NUMA information comes last"


def test_add_remove_change_uevents(daemon, kubelet, testbed, cards):
    # A card plugged in, with its child node.
    new = testbed.add_pci("0000:e1:00.0", VENDOR, DEVICE, 1)
    testbed.add_accel(new, 9)
    wait_until(lambda: "0000:e1:00.0" in devices(kubelet), what="the new card")
    assert numa(kubelet, "0000:e1:00.0") == [1]
    wait_until(lambda: host_paths(kubelet, "0000:e1:00.0") == ["/dev/accel/accel9"], what="its child node")

    # A child appears under a card already listed: the child's event rescans the card's resource.
    testbed.add_accel(cards["0000:3c:00.0"], 10)
    wait_until(lambda: host_paths(kubelet, "0000:3c:00.0") == ["/dev/accel/accel1", "/dev/accel/accel10"],
               what="the second child node of 0000:3c:00.0")

    # Unplugged (children first, as the kernel does).
    testbed.remove(new)
    wait_until(lambda: "0000:e1:00.0" not in devices(kubelet), what="the unplugged card to leave")

    # Another vendor's card comes and goes, and a change event changes nothing: no push for any of
    # them.  Events are handled in order, so the push for the next real change is the only one.
    seq = kubelet.messages[RES]
    other = testbed.add_pci("0000:5f:00.0", "0x10de", DEVICE, 0)
    testbed.remove(other)
    testbed.uevent(cards["0000:3b:00.0"], "change")
    testbed.set(cards["0000:b0:00.0"], "enable", 0)
    testbed.uevent(cards["0000:b0:00.0"], "change")
    wait_until(lambda: devices(kubelet)["0000:b0:00.0"]["health"] == "Unhealthy", what="0000:b0:00.0 Unhealthy")
    assert kubelet.messages[RES] == seq + 1, [sorted(r.devices) for r in kubelet.history(RES, seq)]


def test_attribute_change_makes_a_device_unhealthy_and_healthy_again(daemon, kubelet, testbed, cards):
    card = cards["0000:af:00.0"]
    testbed.set(card, "enable", 0)
    testbed.uevent(card, "change")
    wait_until(lambda: devices(kubelet)["0000:af:00.0"]["health"] == "Unhealthy", what="0000:af:00.0 Unhealthy")
    assert [i for i, d in devices(kubelet).items() if d["health"] != "Healthy"] == ["0000:af:00.0"]
    # The kubelet would not allocate it now; neither does the daemon.
    with pytest.raises(Exception, match="attribute enable is '0', expected 1"):
        kubelet.allocate(RES, ["0000:af:00.0"])
    assert "0000:af:00.0" not in kubelet.preferred(RES, ["0000:b0:00.0", "0000:d9:00.0"], [], 2)

    testbed.set(card, "enable", 1)
    testbed.uevent(card, "change")
    wait_until(lambda: devices(kubelet)["0000:af:00.0"]["health"] == "Healthy", what="0000:af:00.0 recovered")


def test_a_vanished_child_node_makes_the_card_unhealthy(daemon, kubelet, testbed, cards):
    child = cards["0000:3b:00.0"] + "/accel0"
    testbed.node("/dev/accel/accel0", False)
    testbed.uevent(child, "change")
    wait_until(lambda: devices(kubelet)["0000:3b:00.0"]["health"] == "Unhealthy", what="0000:3b:00.0 Unhealthy")
    testbed.node("/dev/accel/accel0", True)
    testbed.uevent(child, "change")
    wait_until(lambda: devices(kubelet)["0000:3b:00.0"]["health"] == "Healthy", what="0000:3b:00.0 recovered")


def test_bind_and_unbind_events_move_a_card_between_resources(daemon, kubelet, testbed, cards):
    assert kubelet.devices[VFIO] == {}
    testbed.bind(cards["0000:b0:00.0"], "vfio-pci")
    wait_until(lambda: "0000:b0:00.0" in kubelet.devices[VFIO], what="the card bound to vfio-pci")
    assert kubelet.devices[VFIO]["0000:b0:00.0"]["numa_nodes"] == [1]
    testbed.unbind(cards["0000:b0:00.0"])
    wait_until(lambda: kubelet.devices[VFIO] == {}, what="the card unbound from vfio-pci")
    assert "0000:b0:00.0" in devices(kubelet), "the accel resource does not select on the driver"


def test_the_daemon_refuses_to_run_outside_the_testbed(testbed, start_daemon, tmp_path):
    """The guard in front of the daemon: without the preload it exits before reading any /sys."""
    d = start_daemon(CONFIG, env=testbed.env(), wrapper=testbed.wrapper()[1:])
    assert d.proc.wait(20) != 0
    assert "libumockdev-preload is not in LD_PRELOAD" in d.log()


# --- list: the nodes each device grants, under child_devnodes --------------------------------------------


def run_under(testbed: mockdev.Testbed, tmp_path, config_text: str, *args: str) -> subprocess.CompletedProcess:
    """``udev-device-plugin ARGS --config FILE`` (or a Python script) in the testbed."""
    etc = tmp_path / "etc-list"
    etc.mkdir(exist_ok=True)
    path = etc / "udev-device-plugin.conf"
    path.write_text(config_text)
    command = list(args) if args and args[0] == "-c" else ["-m", "udev_device_plugin", *args, "--config", str(path)]
    env = dict(os.environ, **testbed.env(), UDP_CONFIG=str(path))
    return subprocess.run(testbed.wrapper() + [sys.executable, *command], capture_output=True, text=True, env=env,
                          timeout=60)


def list_json(testbed: mockdev.Testbed, tmp_path, config_text: str) -> Dict[str, Dict[str, Any]]:
    done = run_under(testbed, tmp_path, config_text, "list", "--json")
    assert done.returncode == 0, done.stderr
    return {r["resource"]: r for r in json.loads(done.stdout)["resources"]}


CHILDREN = """
[resource example.com/none]
subsystem = pci
attribute.device = 0x0b5b

[resource example.com/accel]
subsystem = pci
attribute.device = 0x0b5b
child_devnodes = accel

[resource example.com/all]
subsystem = pci
attribute.device = 0x0b5b
child_devnodes = all
extra_devnodes = /dev/accel-ctl
"""


def test_child_devnodes_decides_which_descendants_nodes_come_with_a_device(testbed, tmp_path):
    card = testbed.add_pci("0000:3b:00.0", VENDOR, DEVICE, 0)
    testbed.add_accel(card, 0)
    testbed.add("usb", "usb1", card, {"dev": "189:0"}, {"MAJOR": 189, "MINOR": 0}, node="/dev/bus/usb/001/001")
    testbed.node("/dev/accel-ctl", True)
    rows = list_json(testbed, tmp_path, CHILDREN)
    none, accel, everything = (rows[f"example.com/{n}"]["devices"][0] for n in ("none", "accel", "all"))
    # The default: none of a card's descendants (a loose selector on a controller handed out its subtree).
    assert none["devnodes"] == [] and none["grants"] == []
    assert none["withheld"] == ["/dev/accel/accel0 (accel)", "/dev/bus/usb/001/001 (usb)"]
    assert accel["devnodes"] == ["/dev/accel/accel0"] and accel["withheld"] == ["/dev/bus/usb/001/001 (usb)"]
    assert everything["devnodes"] == ["/dev/accel/accel0", "/dev/bus/usb/001/001"] and everything["withheld"] == []
    assert everything["grants"] == ["/dev/accel/accel0", "/dev/bus/usb/001/001", "/dev/accel-ctl"]
    text = run_under(testbed, tmp_path, CHILDREN, "list")
    assert text.returncode == 0, text.stderr
    assert "[not granted, see child_devnodes: /dev/accel/accel0 (accel), /dev/bus/usb/001/001 (usb)]" in text.stdout


# --- the man page's flagship example, on a mock PCI card -------------------------------------------------

FPGA = "example.com/fpga"


def fpga_example() -> str:
    """The man page's [resource example.com/fpga], its health_command replaced by one this machine has."""
    text = examples.man_section(FPGA)
    assert "health_command = /usr/libexec/fpga-check" in text, text
    return text.replace("health_command = /usr/libexec/fpga-check", "health_command = /bin/true")


def alveo(testbed: mockdev.Testbed, address: str, device: str) -> str:
    """A PCI function as the kernel describes it: vendor/device attributes, PCI_SLOT_NAME and PCI_ID properties."""
    return testbed.add("pci", address, None, {"vendor": "0x10ee", "device": device, "numa_node": 0, "enable": 1},
                       {"PCI_SLOT_NAME": address, "PCI_ID": f"10EE:{device[2:].upper()}"})


@pytest.fixture
def fpga_cards(testbed) -> Dict[str, str]:
    """Alveo user functions (10ee:5005): two bound to vfio-pci with IOMMU groups 42 and 43, one
    bound without an IOMMU group, one not bound to vfio-pci; a management function (10ee:5004)."""
    cards = {}
    for address, group in (("0000:3b:00.1", 42), ("0000:af:00.1", 43), ("0000:d8:00.1", None)):
        cards[address] = alveo(testbed, address, "0x5005")
        if group is not None:
            testbed.iommu_group(cards[address], group)
            testbed.add("vfio", str(group), None, {"dev": f"243:{group}"}, {"MAJOR": 243, "MINOR": group},
                        node=f"/dev/vfio/{group}")
        testbed.bind(cards[address], "vfio-pci")
    cards["0000:3c:00.1"] = alveo(testbed, "0000:3c:00.1", "0x5005")
    testbed.iommu_group(cards["0000:3c:00.1"], 44)
    alveo(testbed, "0000:3b:00.0", "0x5004")
    testbed.node("/dev/vfio/vfio", True)
    return cards


def test_the_man_page_fpga_example_matches_a_pci_card(testbed, fpga_cards, tmp_path):
    # The example once had id = attribute.serial (a PCI device has none: every card was skipped)
    # and expected /dev/vfio/<group>, which is no sysfs child of the card, among its nodes.
    row = list_json(testbed, tmp_path, fpga_example())[FPGA]
    devices = {d["id"]: d for d in row["devices"]}
    assert sorted(devices) == ["0000:3b:00.1", "0000:af:00.1", "0000:d8:00.1"], row
    assert devices["0000:3b:00.1"]["grants"] == ["/dev/vfio/42", "/dev/vfio/vfio"]
    assert devices["0000:af:00.1"]["grants"] == ["/dev/vfio/43", "/dev/vfio/vfio"]
    assert [devices[i]["health"] for i in ("0000:3b:00.1", "0000:af:00.1")] == ["Healthy", "Healthy"]
    # Bound to vfio-pci without an IOMMU group: it cannot be used, and says why.
    assert devices["0000:d8:00.1"]["health"] == "Unhealthy"
    assert devices["0000:d8:00.1"]["reason"] == ("no VFIO group node: it has no iommu_group (the IOMMU is off, "
                                                 "or the device is not isolated)")
    assert row["problems"] == []


def test_the_man_page_fpga_example_served_and_allocated(testbed, fpga_cards, start_daemon, kubelet):
    d = start_daemon(fpga_example(), env=testbed.env(), wrapper=testbed.wrapper())
    wait_until(lambda: len(kubelet.devices.get(FPGA, {})) == 3 or d.proc.poll() is not None, timeout=20,
               what="the three vfio-pci cards")
    assert d.proc.poll() is None, d.log()
    response = kubelet.allocate(FPGA, ["0000:af:00.1"])
    answer = response.container_responses[0]
    assert [(n.host_path, n.container_path) for n in answer.devices] == [("/dev/vfio/43", "/dev/vfio/43"),
                                                                         ("/dev/vfio/vfio", "/dev/vfio/vfio")]
    assert dict(answer.envs) == {"FPGA_IDS": "0000:af:00.1"}
    # A card handed to vfio-pci later: its group node comes with it.
    testbed.bind(fpga_cards["0000:3c:00.1"], "vfio-pci")
    testbed.add("vfio", "44", None, {"dev": "243:44"}, {"MAJOR": 243, "MINOR": 44}, node="/dev/vfio/44")
    testbed.uevent(fpga_cards["0000:3c:00.1"], "change")
    wait_until(lambda: kubelet.devices.get(FPGA, {}).get("0000:3c:00.1", {}).get("health") == "Healthy",
               what="the newly bound card, healthy")


# --- udev data that is not UTF-8 (issue 10, item 5) ------------------------------------------------------

ODD = """
[resource example.com/net]
subsystem = net

[resource example.com/serial]
subsystem = tty
id = property.ID_SERIAL

[resource example.com/label]
subsystem = misc
attribute.label = *

[resource example.com/card]
subsystem = pci
attribute.device = 0x0b5b
child_devnodes = all
"""


@pytest.fixture
def odd_devices(testbed) -> Dict[str, bytes]:
    """Next to good devices: a net device named b"x\\xff" (root can create one: ip link add name
    $'x\\xff'), a tty whose ID_SERIAL, a misc device whose label attribute, and a card whose child's
    device node are not UTF-8."""
    testbed.add("net", "good0", None, {"address": "00:11:22:33:44:55"}, {"INTERFACE": "good0"})
    testbed.add("tty", "ttyA", None, {}, {"ID_SERIAL": "serial-a"})
    testbed.add("misc", "miscA", None, {"label": "fine"}, {})
    card = testbed.add_pci("0000:3b:00.0", VENDOR, DEVICE, 0)
    testbed.add_accel(card, 0)
    odd_card = testbed.add_pci("0000:3c:00.0", VENDOR, DEVICE, 0)
    return {
        "net": testbed.add_raw("net", b"x\xff", None, {"address": b"00:11:22:33:44:56"}, {"INTERFACE": b"x\xff"}),
        "tty": testbed.add_raw("tty", b"ttyB", None, {}, {"ID_SERIAL": b"serial-\xfe\x1b"}),
        "misc": testbed.add_raw("misc", b"miscB", None, {"label": b"\xc3("}, {}),
        "child": testbed.add_raw("accel", b"accel1", odd_card, {"dev": b"261:1"},
                                 {"MAJOR": b"261", "MINOR": b"1", "DEVNAME": b"accel/\xff"}),
    }


def expected_problems(odd: Dict[str, bytes]) -> List[str]:
    return [
        f"example.com/net: {odd['net'].decode('latin-1').replace(chr(0xff), chr(92) + 'xff')} skipped: "
        "its sys_path is not utf-8 text",
        f"example.com/serial: {odd['tty'].decode()} skipped: property ID_SERIAL is not utf-8 text: serial-\\xfe\\x1b",
        f"example.com/label: {odd['misc'].decode()} skipped: attribute label is not utf-8 text: \\xc3(",
        f"example.com/card: {os.path.dirname(odd['child'].decode())} skipped: the udev data of its descendant "
        f"{odd['child'].decode()} is not utf-8 text: /dev/accel/\\xff",
    ]


def test_list_skips_undecodable_devices_with_a_warning_naming_their_path(testbed, odd_devices, tmp_path):
    # Both pyudev 0.22 and 0.24 raise UnicodeDecodeError reading such data; `list` and `serve`
    # crashed at start-up (the except handler read the undecodable path again).
    rows = list_json(testbed, tmp_path, ODD)
    assert [d["id"] for d in rows["example.com/net"]["devices"]] == ["good0"]
    assert [d["id"] for d in rows["example.com/serial"]["devices"]] == ["serial-a"]
    assert [d["id"] for d in rows["example.com/label"]["devices"]] == ["miscA"]
    assert [d["id"] for d in rows["example.com/card"]["devices"]] == ["0000:3b:00.0"]
    problems = [p for r in rows.values() for p in r["problems"]]
    assert problems == expected_problems(odd_devices)
    assert all(p.isprintable() for p in problems)


def test_serve_skips_undecodable_devices_and_serves_the_rest(testbed, odd_devices, start_daemon, kubelet):
    d = start_daemon(ODD, env=testbed.env(), wrapper=testbed.wrapper())
    wait_until(lambda: all(kubelet.messages.get(f"example.com/{n}", 0) >= 1 for n in ("net", "serial", "label", "card"))
               or d.proc.poll() is not None, timeout=20, what="every resource's first ListAndWatch message")
    assert d.proc.poll() is None, d.log()
    assert sorted(kubelet.devices["example.com/net"]) == ["good0"]
    assert sorted(kubelet.devices["example.com/serial"]) == ["serial-a"]
    assert sorted(kubelet.devices["example.com/card"]) == ["0000:3b:00.0"]
    log = d.log()
    for problem in expected_problems(odd_devices):
        assert problem in log, f"no warning {problem!r} in:\n{log}"
    assert "Traceback" not in log


REFRESH = """
import json, os, sys
import pyudev
from udev_device_plugin import config, discovery
cfg = config.load(os.environ["UDP_CONFIG"])
context = pyudev.Context()
out = {}
for res in cfg.resources:
    current, problems = discovery.scan_resource(context, res)
    paths = {d.sys_path: "change" for d in current.values()}
    paths.update({os.fsdecode(p.encode("latin-1")): "add" for p in json.loads(sys.argv[1])})
    result = discovery.refresh(context, res, current, paths)
    assert result is not None
    out[res.name] = {"ids": sorted(result[0]), "problems": result[1]}
print(json.dumps(out))
"""


def test_refresh_skips_undecodable_devices_with_a_warning(testbed, odd_devices, tmp_path):
    # The hotplug path's per-device re-read, handed the paths as the monitor would see them
    # (undecodable bytes as surrogates, discovery.safe_sys_path), next to the good devices.
    paths = [p.decode("latin-1") for p in odd_devices.values()]
    paths.append(os.path.dirname(paths[-1]))  # the card whose child is not UTF-8
    done = run_under(testbed, tmp_path, ODD, "-c", REFRESH, json.dumps(paths))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["example.com/net"]["ids"] == ["good0"]
    assert out["example.com/serial"]["ids"] == ["serial-a"]
    assert [p for r in out.values() for p in r["problems"]] == expected_problems(odd_devices)


# --- ID collisions re-evaluated when the winner leaves (issue 10, item 6) --------------------------------

SERIALS = """
[resource example.com/serial]
subsystem = tty
id = property.ID_SERIAL_SHORT
"""


def test_a_device_hidden_by_an_id_collision_is_advertised_when_the_winner_leaves(testbed, start_daemon, kubelet):
    # A USB device copying another's serial could shadow a real one for good: only changed paths were
    # re-read, so the loser was never looked at again.
    first, second = (testbed.add("tty", f"ttyUSB{n}", None, {"dev": f"188:{n}"},
                                 {"ID_SERIAL_SHORT": "A1", "MAJOR": 188, "MINOR": n}, node=f"/dev/ttyUSB{n}")
                     for n in (1, 2))
    d = start_daemon(SERIALS, env=testbed.env(), wrapper=testbed.wrapper())
    wait_until(lambda: "A1" in kubelet.devices.get("example.com/serial", {}) or d.proc.poll() is not None,
               timeout=20, what="the serial A1")
    assert d.proc.poll() is None, d.log()
    assert kubelet.allocate("example.com/serial", ["A1"]).container_responses[0].devices[0].host_path == "/dev/ttyUSB1"
    assert "collides with" in d.log()

    testbed.remove(first)
    wait_until(lambda: _node_of(kubelet, "A1") == "/dev/ttyUSB2", what="A1 advertised again, now /dev/ttyUSB2")
    # And the next remove, with no collision left, empties it.
    testbed.remove(second)
    wait_until(lambda: "A1" not in kubelet.devices.get("example.com/serial", {}), what="A1 gone")


def _node_of(kubelet, dev_id: str) -> str:
    if dev_id not in kubelet.devices.get("example.com/serial", {}):
        return ""
    try:
        return kubelet.allocate("example.com/serial", [dev_id]).container_responses[0].devices[0].host_path
    except Exception:  # noqa: BLE001 - the list may change between the two calls
        return ""
