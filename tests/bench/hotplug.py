"""Hotplug benchmark (issue 3): udev event -> ListAndWatch receipt for single loop-device events and a
100-device burst, with a real systemd-udevd; a full rescan's time with 1,000 umockdev cards.
Prints figures; asserts nothing (these machines are noisy).  Target: event -> kubelet p99 under 20 ms.

Needs root, udev and umockdev (see tests/hotplug).  The daemon is a separate process; this process
plays the kubelet (the stand-in) and watches udev itself, to time each event as the daemon gets it.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported

import pyudev  # noqa: E402

from tests.bench.common import percentile  # noqa: E402
from tests.bench.core import start_daemon, stop  # noqa: E402
from tests.hotplug import mockdev, realudev  # noqa: E402
from tests.standin import StandInKubelet  # noqa: E402

Report = Callable[[str, float, str], None]

SINGLE_EVENTS = 50
BURST = 100
RESCAN_CYCLES = 10
MOCK_CARDS = 1000
SCANS = 5
RES = realudev.LOOP_RESOURCE
MOCK_RES = "example.com/accel"
MOCK_CONFIG = """
[resource example.com/accel]
subsystem = pci
attribute.vendor = 0x8086
attribute.device = 0x0b5b
child_devnodes = accel
health.attribute.enable = 1
"""
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
SCAN = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pyudev
from udev_device_plugin import config, discovery
cfg = config.parse([("bench", sys.argv[2])])
context = pyudev.Context()
times = []
for _ in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    result = discovery.scan(context, cfg.resources)
    times.append(time.perf_counter() - t0)
devices = list(result.snapshot["example.com/accel"].values())
print(json.dumps({"times": times, "devices": len(devices), "nodes": sum(len(d.devnodes) for d in devices),
                  "numa": sorted({n for d in devices for n in d.numa_nodes})}))
"""


class UdevWatch:
    """This process's own udev monitor (source ``udev``, as the daemon's): when each event arrived."""

    def __init__(self, subsystem: str) -> None:
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        self.monitor.filter_by(subsystem)
        self.monitor.start()
        self.events: List[Tuple[float, str, str]] = []  # (monotonic, action, sys_name)
        self.lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="udev-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fd = self.monitor.fileno()
        while not self._stop:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            now = time.monotonic()
            while True:
                device = self.monitor.poll(timeout=0)
                if device is None:
                    break
                with self.lock:
                    self.events.append((now, device.action or "", device.sys_name))

    def first(self, action: str, name: str, after: float, timeout: float = 5.0) -> Optional[float]:
        """When the first such event arrived after ``after``; waits for this thread to have read it
        (the stand-in's thread may get its message before this one is scheduled)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = next((t for t, a, n in self.events if a == action and n == name and t >= after), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.001)

    def close(self) -> None:
        self._stop = True
        self._thread.join()


def write_config(directory: str, text: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "udev-device-plugin.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def first_message(kubelet: StandInKubelet, resource: str, after: int,
                  predicate: Callable[[Dict[str, dict]], bool], what: str, timeout: float = 30.0) -> float:
    """Receipt time of the first ListAndWatch message after number ``after`` that satisfies ``predicate``."""
    found: List[float] = []

    def seen() -> bool:
        found[:] = [r.monotonic for r in kubelet.history(resource, after) if predicate(r.devices)]
        return bool(found)

    if not kubelet.wait_for(seen, timeout):
        raise SystemExit(f"benchmark: no ListAndWatch message with {what} within {timeout} s")
    return found[0]


def listing(dev_id: str) -> Callable[[Dict[str, dict]], bool]:
    return lambda devs: dev_id in devs


def without(dev_id: str) -> Callable[[Dict[str, dict]], bool]:
    return lambda devs: dev_id not in devs


def ms(seconds: float) -> float:
    return seconds * 1000


# --- real udev: loop devices -------------------------------------------------------------------

def single_events(report: Report, kubelet: StandInKubelet, loops: realudev.LoopDevices, watch: UdevWatch) -> None:
    add_udev, add_ioctl, remove_udev = [], [], []
    for i in range(SINGLE_EVENTS):
        number = realudev.FIRST + i
        name = f"loop{number}"
        seq = kubelet.messages[RES]
        t_ioctl = loops.add(number)
        got = first_message(kubelet, RES, seq, listing(name), name)
        t_event = watch.first("add", name, t_ioctl)
        if t_event is None:
            raise SystemExit(f"benchmark: this process's udev monitor missed the add event of {name}")
        add_udev.append(ms(got - t_event))
        add_ioctl.append(ms(got - t_ioctl))

        seq = kubelet.messages[RES]
        t_ioctl = loops.remove(number)
        got = first_message(kubelet, RES, seq, without(name), f"{name} gone")
        t_event = watch.first("remove", name, t_ioctl)
        if t_event is None:
            raise SystemExit(f"benchmark: this process's udev monitor missed the remove event of {name}")
        remove_udev.append(ms(got - t_event))
    n = SINGLE_EVENTS
    report(f"udev add event -> ListAndWatch receipt p50 ({n} loop devices)", statistics.median(add_udev), "ms")
    report(f"udev add event -> ListAndWatch receipt p99 ({n} loop devices)", percentile(add_udev, 99), "ms")
    report(f"udev remove event -> ListAndWatch receipt p50 ({n} loop devices)", statistics.median(remove_udev), "ms")
    report(f"udev remove event -> ListAndWatch receipt p99 ({n} loop devices)", percentile(remove_udev, 99), "ms")
    report(f"LOOP_CTL_ADD ioctl -> ListAndWatch receipt p50, udevd included ({n})", statistics.median(add_ioctl),
           "ms")
    report(f"LOOP_CTL_ADD ioctl -> ListAndWatch receipt p99, udevd included ({n})", percentile(add_ioctl, 99), "ms")


def burst(report: Report, kubelet: StandInKubelet, loops: realudev.LoopDevices, watch: UdevWatch) -> None:
    numbers = list(range(realudev.FIRST, realudev.FIRST + BURST))
    wanted = {f"loop{n}" for n in numbers}
    seq = kubelet.messages[RES]
    t_first = loops.add(numbers[0])
    for n in numbers[1:]:
        loops.add(n)
    complete = first_message(kubelet, RES, seq, lambda devs: wanted <= set(devs), f"all {BURST} devices")
    pushes = [r for r in kubelet.history(RES, seq) if r.monotonic <= complete]
    last_event = max(t for t in (watch.first("add", name, t_first) for name in wanted) if t is not None)
    report(f"{BURST}-device burst: first ioctl -> list with all {BURST}, udevd included", ms(complete - t_first), "ms")
    report(f"{BURST}-device burst: last udev add event -> list with all {BURST}", ms(complete - last_event), "ms")
    report(f"{BURST}-device burst: ListAndWatch pushes for {BURST} add events", len(pushes), "pushes")

    # Single events again, now that every event rescans a resource of 100 devices.
    name, number = f"loop{numbers[-1]}", numbers[-1]
    crowded = []
    for _ in range(RESCAN_CYCLES):
        seq = kubelet.messages[RES]
        t_ioctl = loops.remove(number)
        got = first_message(kubelet, RES, seq, without(name), f"{name} gone")
        crowded.append(ms(got - (watch.first("remove", name, t_ioctl) or float("nan"))))
        seq = kubelet.messages[RES]
        t_ioctl = loops.add(number)
        got = first_message(kubelet, RES, seq, listing(name), f"{name} back")
        crowded.append(ms(got - (watch.first("add", name, t_ioctl) or float("nan"))))
    report(f"udev event -> ListAndWatch receipt p50, {BURST} devices present ({len(crowded)} events)",
           statistics.median(crowded), "ms")
    report(f"udev event -> ListAndWatch receipt max, {BURST} devices present ({len(crowded)} events)", max(crowded),
           "ms")

    seq = kubelet.messages[RES]
    t_first = time.monotonic()
    loops.remove_all(numbers)
    empty = first_message(kubelet, RES, seq, lambda devs: not set(devs) & wanted, "every device gone")
    last_event = max(t for t in (watch.first("remove", name, t_first) for name in wanted) if t is not None)
    pushes = [r for r in kubelet.history(RES, seq) if r.monotonic <= empty]
    report(f"{BURST}-device removal: last udev remove event -> list without them", ms(empty - last_event), "ms")
    report(f"{BURST}-device removal: ListAndWatch pushes for {BURST} remove events (removals take 35-70 ms each)",
           len(pushes), "pushes")


def loop_devices(report: Report, tmp: str) -> None:
    problem = realudev.Udevd.problem()
    if problem:
        raise SystemExit(f"benchmark: {problem}")
    realudev.clean_leftovers()
    udevd = realudev.Udevd(os.path.join(tmp, "udevd.log")).start()
    kubelet_dir = os.path.join(tmp, "dp-loop")
    kubelet = StandInKubelet(kubelet_dir).start()
    watch = UdevWatch("block")
    loops = realudev.LoopDevices()
    daemon = start_daemon(write_config(os.path.join(tmp, "etc-loop"),
                                       realudev.LOOP_CONFIG.format(log_level="warning", events="stderr")),
                          kubelet_dir)
    try:
        first_message(kubelet, RES, 0, lambda devs: True, "the first list")
        single_events(report, kubelet, loops, watch)
        burst(report, kubelet, loops, watch)
    finally:
        stop(daemon)
        loops.close()
        watch.close()
        kubelet.stop()
        realudev.clean_leftovers()
        udevd.stop()


# --- umockdev: 1,000 cards ---------------------------------------------------------------------

def mock_cards(report: Report, tmp: str) -> None:
    problem = mockdev.problem()
    if problem:
        raise SystemExit(f"benchmark: {problem}")
    testbed = mockdev.Testbed()
    try:
        t0 = time.perf_counter()
        testbed.add_many(MOCK_CARDS)
        built = time.perf_counter() - t0
        env = dict(os.environ, **testbed.env())
        out = subprocess.run(testbed.wrapper() + [sys.executable, "-c", SCAN, SRC, MOCK_CONFIG, str(SCANS)],
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"benchmark: the scan under umockdev failed: {out.stderr.strip()}")
        result = json.loads(out.stdout)
        if result["devices"] != MOCK_CARDS or result["nodes"] != MOCK_CARDS or result["numa"] != [0, 1]:
            raise SystemExit(f"benchmark: the scan found {result}, not {MOCK_CARDS} cards with a node each")
        report(f"building {MOCK_CARDS} mock PCI cards + {MOCK_CARDS} child nodes (umockdev, not the daemon)",
               built, "s")
        report(f"full rescan, {MOCK_CARDS} mock cards with child nodes, median of {SCANS}",
               ms(statistics.median(result["times"])), "ms")
        report(f"full rescan, {MOCK_CARDS} mock cards with child nodes, best of {SCANS}", ms(min(result["times"])),
               "ms")

        # The daemon with them all: start-up to the first full list, then one card plugged in.
        kubelet_dir = os.path.join(tmp, "dp-mock")
        kubelet = StandInKubelet(kubelet_dir).start()
        t0 = time.monotonic()
        daemon = start_daemon(write_config(os.path.join(tmp, "etc-mock"), MOCK_CONFIG), kubelet_dir,
                              env=testbed.env(), wrapper=testbed.wrapper())
        try:
            got = first_message(kubelet, MOCK_RES, 0, lambda devs: len(devs) == MOCK_CARDS, "every mock card",
                                timeout=120)
            report(f"daemon start -> kubelet has all {MOCK_CARDS} mock cards (Python start-up included)",
                   ms(got - t0), "ms")
            added = []
            for i in range(10):
                seq = kubelet.messages[MOCK_RES]
                t_add = time.monotonic()
                testbed.add_pci(f"0000:f0:{i:02x}.0", "0x8086", "0x0b5b", i % 2)
                got = first_message(kubelet, MOCK_RES, seq, listing(f"0000:f0:{i:02x}.0"), "the plugged-in card")
                added.append(ms(got - t_add))
            report(f"mock card add -> ListAndWatch receipt p50, {MOCK_CARDS} cards present (rescan included)",
                   statistics.median(added), "ms")
            report(f"mock card add -> ListAndWatch receipt max of 10, {MOCK_CARDS} cards present", max(added), "ms")
        finally:
            stop(daemon)
            kubelet.stop()
    finally:
        testbed.close()


def run(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="udp-bench-hotplug-") as tmp:
        loop_devices(report, tmp)
        mock_cards(report, tmp)


if __name__ == "__main__":
    def _report(name: str, value: float, unit: str) -> None:
        print(f"{name:<72} {value:>10.3f} {unit}", flush=True)

    run(_report)
