"""Replicas and CDI specs under real hotplug: loop devices created and removed through /dev/loop-control, seen
by a real systemd-udevd, followed by the daemon into the stand-in kubelet's list and the resource's CDI spec
(written before the list that names a new device goes out; not rewritten for a health change)."""

from __future__ import annotations

import json
import os
from typing import Dict, List

from tests.conftest import wait_until
from tests.unit import cdirules

from . import realudev
from .test_loop import wait_message

RES = realudev.LOOP_RESOURCE
SPEC = "udev-device-plugin-example.com_loop.json"


def spec_names(path: str) -> List[str]:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        text = f.read()
    assert cdirules.problems(text) == [], text
    return [d["name"] for d in json.loads(text)["devices"]]


def test_replicas_and_the_cdi_spec_follow_hotplug(start_daemon, kubelet, loops, tmp_path):
    cdi_dir = tmp_path / "cdi"
    path = str(cdi_dir / SPEC)
    conf = realudev.LOOP_CONFIG.format(log_level="info", events="stderr") + "replicas = 3\ncdi = yes\n"
    daemon = start_daemon(conf.replace("[plugin]\n", f"[plugin]\ncdi_spec_dir = {cdi_dir}\n"))
    wait_until(lambda: kubelet.messages.get(RES, 0) >= 1, 20, "the first list")
    assert kubelet.devices[RES] == {} and not os.path.exists(path)  # no device with nodes: no spec

    # An added device: its three replicas, and the spec names them by the time the list does.
    spec_at_receipt: Dict[str, List[str]] = {}

    def listed(devs: Dict[str, dict]) -> bool:
        if "loop150::0" in devs and not spec_at_receipt:
            spec_at_receipt["names"] = spec_names(path)
        return "loop150::0" in devs

    seq = kubelet.messages[RES]
    loops.add(150)
    msg = wait_message(kubelet, seq, listed, "loop150's replicas")
    assert sorted(msg.devices) == ["loop150::0", "loop150::1", "loop150::2"]
    assert spec_at_receipt["names"] == ["loop150::0", "loop150::1", "loop150::2"]
    [r] = kubelet.allocate(RES, ["loop150::1"]).container_responses
    assert [c.name for c in r.cdi_devices] == [f"{RES}=loop150::1"]
    assert [d.host_path for d in r.devices] == ["/dev/loop150"]
    inode = os.stat(path).st_ino

    # Its node gone while the device stays: every replica unhealthy, the spec untouched.
    seq = kubelet.messages[RES]
    realudev.remove_node(150)
    try:
        realudev.trigger_change("loop150")
        msg = wait_message(kubelet, seq, lambda devs: devs.get("loop150::2", {}).get("health") == "Unhealthy",
                           "loop150's replicas unhealthy")
        assert {i: d["health"] for i, d in msg.devices.items()} == {f"loop150::{k}": "Unhealthy" for k in range(3)}
        assert os.stat(path).st_ino == inode
    finally:
        # The node's return alone may bring the push (the daemon watches /dev): count from before it.
        seq = kubelet.messages[RES]
        realudev.restore_node(150)
    realudev.trigger_change("loop150")
    wait_message(kubelet, seq, lambda devs: devs.get("loop150::0", {}).get("health") == "Healthy", "recovered")

    # A second device, then both removed: all their replicas go, and the spec with the last of them.
    seq = kubelet.messages[RES]
    loops.add(151)
    wait_message(kubelet, seq, lambda devs: "loop151::2" in devs, "loop151's replicas")
    assert spec_names(path) == [f"loop{n}::{k}" for n in (150, 151) for k in range(3)]
    seq = kubelet.messages[RES]
    loops.remove(150)
    msg = wait_message(kubelet, seq, lambda devs: "loop150::0" not in devs, "loop150 removed")
    assert sorted(msg.devices) == ["loop151::0", "loop151::1", "loop151::2"]
    assert spec_names(path) == ["loop151::0", "loop151::1", "loop151::2"]
    seq = kubelet.messages[RES]
    loops.remove(151)
    wait_message(kubelet, seq, lambda devs: not devs, "every replica removed")
    assert not os.path.exists(path) and os.listdir(cdi_dir) == []
    assert daemon.proc.poll() is None
