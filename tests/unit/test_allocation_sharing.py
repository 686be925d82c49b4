"""allocation.py with replicas and CDI: a device given once however many of its replicas are asked for,
replica IDs refused by name, preferred allocations that spread or pack, and the CDI devices of an answer."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence

import pytest

from udev_device_plugin import allocation, config, sharing
from udev_device_plugin.allocation import AllocationError, DeviceNode
from udev_device_plugin.model import HEALTHY, UNHEALTHY, CdiView, Device

from .test_allocation import RESOURCE, dev, table


def res(lines: str = "") -> config.ResourceConfig:
    return config.parse([("t.conf", f"[resource {RESOURCE}]\nsubsystem = pci\nreplicas = 4\n{lines}")]).resources[0]


def advertised(devices: Dict[str, Device], replicas: int = 4) -> sharing.Advertised:
    return sharing.Encoder().advertise(devices, replicas)


DEVICES = table(dev("a0", "/dev/accel/accel0", "/dev/dri/renderD128"), dev("a1", "/dev/accel/accel1"),
                dev("bare"), dev("sick", "/dev/sick0", health=UNHEALTHY, reason="status is 'failed'"))
ADV = advertised(DEVICES)


# --- allocate() ---------------------------------------------------------------------------------


def test_several_replicas_of_one_device_give_it_once():
    r = res("env =\n  IDS={ids}\n  N={count}\n  NODES={devnodes}\nextra_devnodes = /dev/accel-ctl")
    got = allocation.allocate(r, ADV.devices, ["a0::3", "a0::1", "a1::0", "a0::0"])
    assert got.devices == (DeviceNode("/dev/accel/accel0", "/dev/accel/accel0", "rw"),
                           DeviceNode("/dev/dri/renderD128", "/dev/dri/renderD128", "rw"),
                           DeviceNode("/dev/accel/accel1", "/dev/accel/accel1", "rw"),
                           DeviceNode("/dev/accel-ctl", "/dev/accel-ctl", "rw"))
    # The templates name devices, each once, in the order the request first names them.
    assert dict(got.envs) == {"IDS": "a0,a1", "N": "2",
                              "NODES": "/dev/accel/accel0,/dev/dri/renderD128,/dev/accel/accel1,/dev/accel-ctl"}


def test_container_path_id_is_the_device_id():
    got = allocation.allocate(res("container_path = /dev/x/{id}-{name}"), ADV.devices, ["a1::2"])
    assert got.devices == (DeviceNode("/dev/accel/accel1", "/dev/x/a1-accel/accel1", "rw"),)


@pytest.mark.parametrize("ids, named", [
    (["a0"], ["a0"]),  # the device's own ID is no advertised ID once it has replicas
    (["a0::4"], ["a0::4"]),  # past the last replica
    (["a0::0", "a0::-1", "a9::0"], ["a0::-1", "a9::0"]),
    (["a0::00"], ["a0::00"]),
])
def test_unknown_replica_ids_are_refused_by_name(ids, named):
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res(), ADV.devices, ids)
    assert info.value.kind == "unknown"
    for i in named:
        assert repr(i) in str(info.value)
    assert "'a0::0'" not in str(info.value)


def test_an_unhealthy_device_takes_every_replica():
    for k in range(4):
        with pytest.raises(AllocationError) as info:
            allocation.allocate(res(), ADV.devices, ["a0::0", f"sick::{k}"])
        assert info.value.kind == "unhealthy" and f"'sick::{k}'" in str(info.value) and "failed" in str(info.value)


# --- CDI in the answer -----------------------------------------------------------------------------

KIND = "example.com/accel"


def view(problem: str = "", leave_out: Sequence[str] = ()) -> CdiView:
    names = {i: f"{KIND}={i}" for i, d in ADV.devices.items() if d.devnodes and i not in leave_out}
    return CdiView(names, "/var/run/cdi/spec.json", problem)


def test_cdi_devices_one_per_device_with_the_nodes_kept():
    got = allocation.allocate(res("cdi = yes"), ADV.devices, ["a1::2", "a0::1", "a1::3"], view())
    assert got.cdi_devices == (f"{KIND}=a1::2", f"{KIND}=a0::1")
    assert [n.host_path for n in got.devices] == ["/dev/accel/accel1", "/dev/accel/accel0", "/dev/dri/renderD128"]


def test_cdi_only_gives_no_device_nodes_but_keeps_the_templates():
    r = res("cdi = yes\ncdi_only = yes\nenv = IDS={ids}\nmounts = /opt/x:/opt/x:ro")
    got = allocation.allocate(r, ADV.devices, ["a0::0", "bare::1"], view())
    assert got.devices == () and got.cdi_devices == (f"{KIND}=a0::0",)  # "bare" has no node, so no CDI device
    assert dict(got.envs) == {"IDS": "a0,bare"} and [m.host_path for m in got.mounts] == ["/opt/x"]


def test_cdi_only_still_refuses_clashing_container_paths():
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res("cdi = yes\ncdi_only = yes\ncontainer_path = /dev/one"), ADV.devices,
                            ["a0::0"], view())
    assert info.value.kind == "conflict"


def test_without_a_written_spec():
    problem = "cannot write the CDI spec /ro/x.json: /ro is on a read-only file system"
    # cdi = yes: the nodes serve every runtime meanwhile, and no CDI device is named.
    for cdi in (None, view(problem)):
        got = allocation.allocate(res("cdi = yes"), ADV.devices, ["a1::0"], cdi)
        assert got.cdi_devices == () and [n.host_path for n in got.devices] == ["/dev/accel/accel1"]
        # cdi_only: refused, saying why.
        with pytest.raises(AllocationError) as info:
            allocation.allocate(res("cdi = yes\ncdi_only = yes"), ADV.devices, ["a1::0"], cdi)
        assert info.value.kind == "cdi" and "cdi_only" in str(info.value)
        assert (problem if cdi is not None else "not written yet") in str(info.value)


def test_cdi_only_refuses_a_device_left_out_of_the_spec():
    with pytest.raises(AllocationError) as info:
        allocation.allocate(res("cdi = yes\ncdi_only = yes"), ADV.devices, ["a0::0", "a1::1"],
                            view(leave_out=["a1::1"]))
    assert info.value.kind == "cdi" and "'a1::1'" in str(info.value) and "'a0::0'" not in str(info.value)
    # With device nodes in the answer, it is served by them.
    got = allocation.allocate(res("cdi = yes"), ADV.devices, ["a0::0", "a1::1"], view(leave_out=["a1::1"]))
    assert got.cdi_devices == (f"{KIND}=a0::0",) and len(got.devices) == 3


def test_without_cdi_no_cdi_devices():
    assert allocation.allocate(res(), ADV.devices, ["a0::0"], view()).cdi_devices == ()


# --- preferred() -------------------------------------------------------------------------------------


def pref(devices: Dict[str, Device], available: List[str], must: Sequence[str] = (), size: int = 1,
         policy: str = "spread", replicas: int = 4, adv: Optional[sharing.Advertised] = None) -> List[str]:
    adv = adv or advertised(devices, replicas)
    return allocation.preferred(adv.devices, available, list(must), size, adv.replica_of, adv.replicas, policy)


FOUR = table(dev("d0", numa=(0,)), dev("d1", numa=(0,)), dev("d2", numa=(0,)), dev("d10", numa=(0,)))
ALL = [i for d in FOUR for i in sharing.replica_ids(d, 4)]


def test_spread_takes_distinct_devices_first():
    assert pref(FOUR, ALL, size=4) == ["d0::0", "d1::0", "d2::0", "d10::0"]
    assert pref(FOUR, ALL, size=6) == ["d0::0", "d1::0", "d2::0", "d10::0", "d0::1", "d1::1"]
    assert pref(FOUR, ALL, size=16) == [f"d{d}::{k}" for k in range(4) for d in (0, 1, 2, 10)]


def test_spread_prefers_devices_others_use_least():
    # d0 and d1 have two replicas in use elsewhere (not available), d2 one, d10 none.
    available = ["d0::2", "d0::3", "d1::0", "d1::3", "d2::1", "d2::2", "d2::3"] + list(sharing.replica_ids("d10", 4))
    assert pref(FOUR, available, size=2) == ["d10::0", "d2::1"]
    assert pref(FOUR, available, size=5) == ["d10::0", "d2::1", "d0::2", "d1::0", "d10::1"]


def test_spread_counts_must_include_as_chosen():
    assert pref(FOUR, ALL, must=["d0::3"], size=3) == ["d0::3", "d1::0", "d2::0"]
    assert pref(FOUR, ALL, must=["d0::3", "d1::1"], size=4) == ["d0::3", "d1::1", "d2::0", "d10::0"]


def test_pack_fills_a_device_before_the_next():
    assert pref(FOUR, ALL, size=6, policy="pack") == ["d0::0", "d0::1", "d0::2", "d0::3", "d1::0", "d1::1"]
    # The device the container already has first, then the device in use most (whole devices stay free).
    available = ["d0::2", "d0::3", "d1::3", "d2::1", "d2::2", "d2::3"] + list(sharing.replica_ids("d10", 4))
    assert pref(FOUR, available, size=2, policy="pack") == ["d1::3", "d0::2"]
    assert pref(FOUR, available, must=["d2::2"], size=3, policy="pack") == ["d2::2", "d2::1", "d2::3"]


def test_numa_alignment_comes_before_the_replica_policy():
    devices = table(dev("n0", numa=(0,)), dev("n1a", numa=(1,)), dev("n1b", numa=(1,)), dev("free"))
    available = [i for d in devices for i in sharing.replica_ids(d, 4)]
    # Node 1 has the most free replicas: both policies stay there as long as it has room.
    assert pref(devices, available, size=3) == ["n1a::0", "n1b::0", "n1a::1"]
    assert pref(devices, available, size=3, policy="pack") == ["n1a::0", "n1a::1", "n1a::2"]
    # With a replica on node 0 chosen already, node 0 first.
    assert pref(devices, available, must=["n0::2"], size=3) == ["n0::2", "n0::0", "n0::1"]
    # Devices without NUMA information last.
    assert pref(devices, available, size=16)[-4:] == ["free::0", "free::1", "free::2", "free::3"]


def test_unhealthy_and_unknown_replicas_only_make_up_the_size():
    devices = table(dev("ok"), dev("sick", health=UNHEALTHY))
    available = ["sick::0", "nope::1", "ok::3", "ok::1"]
    assert pref(devices, available, size=2) == ["ok::1", "ok::3"]
    assert pref(devices, available, size=4)[:2] == ["ok::1", "ok::3"]


def test_one_replica_answers_as_before():
    """With replicas = 1 the spread and pack orders are the natural order of the device IDs."""
    devices = table(dev("loop10"), dev("loop2"), dev("loop1"), dev("loop01"))
    ids = list(devices)
    for policy in ("spread", "pack"):
        assert pref(devices, ids, size=4, policy=policy, replicas=1) == ["loop01", "loop1", "loop2", "loop10"]
        assert pref(devices, ids, size=4, policy=policy, replicas=1) == allocation.preferred(devices, ids, [], 4)


@pytest.mark.parametrize("policy", ["spread", "pack"])
def test_deterministic_whatever_order_the_kubelet_sends(policy):
    devices = table(*(dev(f"dev{i}", numa=(i % 2,), health=HEALTHY if i != 3 else UNHEALTHY) for i in range(6)))
    available = [i for d in devices for i in sharing.replica_ids(d, 4)]
    expected = pref(devices, available, size=7, policy=policy)
    rng = random.Random(4)
    for _ in range(20):
        rng.shuffle(available)
        assert pref(devices, available, size=7, policy=policy) == expected
    assert len(set(expected)) == 7


def test_ten_thousand_replicas():
    devices = table(*(dev(f"loop{i}", numa=(i % 2,)) for i in range(100)))
    adv = advertised(devices, 100)
    available = list(adv.devices)
    chosen = pref(devices, available, size=150, adv=adv)
    # One NUMA node (the lowest: both have as many free), one replica of each of its 50 devices, then the second.
    assert {i.split("::")[1] for i in chosen[:50]} == {"0"} and len({adv.devices[i].id for i in chosen[:50]}) == 50
    assert {adv.devices[i].numa_nodes for i in chosen} == {(0,)}
