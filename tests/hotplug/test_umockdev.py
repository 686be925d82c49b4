"""What this VM lacks, with umockdev: PCI cards with vendor/device attributes on NUMA nodes 0 and 1,
child device nodes, add/remove/change uevents, attribute-driven health, NUMA-aligned preferred
allocation.  The daemon runs under umockdev-wrapper (and refuses to run without its preload)."""

from __future__ import annotations

from typing import Dict, Iterator, List

import pytest

from tests.conftest import wait_until

from . import mockdev

RES = "example.com/accel"
CONFIG = """
[resource example.com/accel]
subsystem = pci
attribute.vendor = 0x8086
attribute.device = 0x0b5b
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
