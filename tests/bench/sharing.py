"""Sharing and CDI benchmark (issue 12): Allocate with replicas = 100 over 100 loop devices (10,000 IDs)
next to a bare grpcio unary call and to the same devices unshared, with and without CDI; the kubelet's
GetPreferredAllocation over all 10,000; start-up to the first full list; and udev event -> ListAndWatch
receipt with CDI on (the spec rewritten before each push), unshared and with 10,000 replica IDs.
Prints figures; asserts nothing (these machines are noisy).

Needs root (loop devices through /dev/loop-control; a real systemd-udevd for the hotplug part); run under
the shared lock (`make bench`).  The daemon is a separate process; this process plays the kubelet.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported

import grpc  # noqa: E402

from tests.bench.core import BARE_SERVER, percentile, rss_mib, sequential, start_daemon, stop  # noqa: E402
from tests.bench.hotplug import UdevWatch, first_message, listing, ms, without, write_config  # noqa: E402
from tests.hotplug import realudev  # noqa: E402
from tests.standin import StandInKubelet  # noqa: E402
from udev_device_plugin import api  # noqa: E402

Report = Callable[[str, float, str], None]

DEVICES = 100
REPLICAS = 100
CALLS = 2000
PREFERRED_CALLS = 50
HOTPLUG_EVENTS = 30
CROWDED_EVENTS = 20
RES = realudev.LOOP_RESOURCE
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def config(replicas: int, cdi_dir: str = "", log_level: str = "warning") -> str:
    text = realudev.LOOP_CONFIG.format(log_level=log_level, events="stderr")
    if replicas > 1:
        text += f"replicas = {replicas}\n"
    if cdi_dir:
        text = text.replace("[plugin]\n", f"[plugin]\ncdi_spec_dir = {cdi_dir}\n") + "cdi = yes\n"
    return text


def serve(tmp: str, name: str, text: str, ids: int, log_path: str = "") -> tuple:
    """A stand-in kubelet and the daemon with ``text``, once the kubelet has ``ids`` IDs; and how long that took.
    ``log_path``: where the daemon's log goes (else nowhere)."""
    kubelet_dir = os.path.join(tmp, f"dp-{name}")
    kubelet = StandInKubelet(kubelet_dir).start()
    t0 = time.monotonic()
    config_path = write_config(os.path.join(tmp, f"etc-{name}"), text)
    if log_path:
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "udev_device_plugin", "serve", "--config", config_path,
                                       "--kubelet-dir", kubelet_dir], stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
    else:
        daemon = start_daemon(config_path, kubelet_dir)
    try:
        got = first_message(kubelet, RES, 0, lambda devs: len(devs) == ids, f"{ids} IDs", timeout=60)
    except BaseException:
        stop(daemon)
        kubelet.stop()
        raise
    return kubelet, daemon, got - t0


def allocate_calls(kubelet: StandInKubelet, ids: List[str], per_request: int) -> List[float]:
    """Sequential Allocate calls on a channel of their own, each for IDs no earlier call named (as the
    kubelet's are, for new pods: no reply-cache hits), ``per_request`` IDs apiece."""
    channel = grpc.insecure_channel("unix:" + kubelet.client(RES).path)
    stub = api.Stub(channel)
    rng = random.Random(12)
    order = ids[:]
    rng.shuffle(order)
    requests = [api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(
        devices_ids=order[(i * per_request) % len(order):][:per_request])]) for i in range(CALLS + 300)]
    try:
        for r in requests[:300]:  # warm-up: connection, caches of the interpreter
            stub.Allocate(r, timeout=30)
        it = iter(requests[300:])
        return sequential(lambda: stub.Allocate(next(it), timeout=30), CALLS)
    finally:
        channel.close()


def bare_calls(tmp: str, payload: bytes) -> List[float]:
    sock = os.path.join(tmp, "bare.sock")
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, sock, SRC], stdout=subprocess.PIPE, text=True)
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        channel = grpc.insecure_channel("unix:" + sock)
        echo = channel.unary_unary("/bench.Bare/Echo", request_serializer=None, response_deserializer=None)
        sequential(lambda: echo(payload, timeout=30), 300)
        out = sequential(lambda: echo(payload, timeout=30), CALLS)
        channel.close()
        return out
    finally:
        stop(bare)


def report_calls(report: Report, what: str, values: List[float]) -> None:
    report(f"{what} p50", statistics.median(values), "ms")
    report(f"{what} p99", percentile(values, 99), "ms")


def allocate_bench(report: Report, tmp: str) -> None:
    loops = realudev.LoopDevices()
    numbers = list(range(realudev.FIRST, realudev.FIRST + DEVICES))
    try:
        for n in numbers:
            loops.add(n)
        devices = [f"loop{n}" for n in numbers]
        replica_ids = [f"{d}::{k}" for d in devices for k in range(REPLICAS)]
        one = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(
            devices_ids=[replica_ids[0]])]).SerializeToString()
        report_calls(report, "bare grpcio unary (an Allocate request's bytes echoed), sequential", bare_calls(tmp, one))

        kubelet, daemon, _ = serve(tmp, "plain", config(1), DEVICES)
        try:
            report_calls(report, f"Allocate 1 ID, {DEVICES} devices unshared", allocate_calls(kubelet, devices, 1))
        finally:
            stop(daemon)
            kubelet.stop()

        kubelet, daemon, started = serve(tmp, "shared", config(REPLICAS), DEVICES * REPLICAS)
        try:
            n = DEVICES * REPLICAS
            report(f"daemon start -> kubelet has all {n} IDs ({DEVICES} devices x {REPLICAS} replicas)",
                   ms(started), "ms")
            payload = api.ListAndWatchResponse(devices=[api.Device(ID=i, health="Healthy")
                                                        for i in replica_ids]).ByteSize()
            report(f"ListAndWatch message with {n} IDs", payload / 1024, "KiB")
            report_calls(report, f"Allocate 1 replica ID, {DEVICES} devices x {REPLICAS} replicas",
                         allocate_calls(kubelet, replica_ids, 1))
            report_calls(report, f"Allocate 10 replica IDs, {DEVICES} devices x {REPLICAS} replicas",
                         allocate_calls(kubelet, replica_ids, 10))
            request = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
                available_deviceIDs=replica_ids, allocation_size=1)])
            stub = kubelet.client(RES).stub
            stub.GetPreferredAllocation(request, timeout=30)
            preferred = sequential(lambda: stub.GetPreferredAllocation(request, timeout=30), PREFERRED_CALLS)
            report_calls(report, f"GetPreferredAllocation, {n} available, size 1", preferred)
            report(f"daemon RSS with {n} IDs", rss_mib(daemon.pid), "MiB")
        finally:
            stop(daemon)
            kubelet.stop()

        cdi_dir = os.path.join(tmp, "cdi-allocate")
        kubelet, daemon, started = serve(tmp, "shared-cdi", config(REPLICAS, cdi_dir), DEVICES * REPLICAS)
        try:
            spec = os.path.join(cdi_dir, "udev-device-plugin-example.com_loop.json")
            with open(spec) as f:
                entries = len(json.load(f)["devices"])
            report(f"daemon start -> kubelet has all {DEVICES * REPLICAS} IDs, CDI on", ms(started), "ms")
            report(f"CDI spec for {entries} IDs", os.path.getsize(spec) / 1024, "KiB")
            report_calls(report, f"Allocate 1 replica ID, {DEVICES} x {REPLICAS}, CDI on",
                         allocate_calls(kubelet, replica_ids, 1))
        finally:
            stop(daemon)
            kubelet.stop()
    finally:
        loops.close()


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG (.*)$")


def spec_times(log_path: str, name: str) -> Dict[str, List[float]]:
    """From the daemon's debug log: ms from each udev event of block device ``name`` to the next spec written."""
    out: Dict[str, List[float]] = {"add": [], "remove": []}
    pending: Optional[Tuple[str, datetime.datetime]] = None
    with open(log_path) as f:
        for line in f:
            m = _STAMP.match(line.rstrip("\n"))
            if not m:
                continue
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            text = m.group(2)
            event = re.match(rf"udev (add|remove) /sys/devices/virtual/block/{name} \(block\)$", text)
            if event:
                pending = (event.group(1), when)
            elif pending is not None and text.startswith(f"{RES}: CDI spec ") and " written" in text:
                out[pending[0]].append((when - pending[1]).total_seconds() * 1000)
                pending = None
    if not out["add"] or not out["remove"]:
        raise SystemExit(f"benchmark: no udev event -> spec written pairs in {log_path}")
    return out


def hotplug_events(kubelet: StandInKubelet, loops: realudev.LoopDevices, watch: UdevWatch, numbers: List[int],
                   name_of: Callable[[int], str]) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {"add": [], "remove": []}
    for number in numbers:
        name = name_of(number)
        seq = kubelet.messages[RES]
        t_ioctl = loops.add(number)
        got = first_message(kubelet, RES, seq, listing(name), name)
        t_event = watch.first("add", f"loop{number}", t_ioctl)
        if t_event is None:
            raise SystemExit(f"benchmark: this process's udev monitor missed the add event of loop{number}")
        out["add"].append(ms(got - t_event))
        seq = kubelet.messages[RES]
        t_ioctl = loops.remove(number)
        got = first_message(kubelet, RES, seq, without(name), f"{name} gone")
        t_event = watch.first("remove", f"loop{number}", t_ioctl)
        if t_event is None:
            raise SystemExit(f"benchmark: this process's udev monitor missed the remove event of loop{number}")
        out["remove"].append(ms(got - t_event))
    return out


def hotplug_bench(report: Report, tmp: str) -> None:
    problem = realudev.Udevd.problem()
    if problem:
        raise SystemExit(f"benchmark: {problem}")
    realudev.clean_leftovers()
    udevd = realudev.Udevd(os.path.join(tmp, "udevd.log")).start()
    watch = UdevWatch("block")
    loops = realudev.LoopDevices()
    try:
        # Unshared, CDI on: each event rewrites a spec of a few devices.
        kubelet, daemon, _ = serve(tmp, "hotplug-cdi", config(1, os.path.join(tmp, "cdi-1")), 0)
        try:
            got = hotplug_events(kubelet, loops, watch, list(range(150, 150 + HOTPLUG_EVENTS)), lambda n: f"loop{n}")
        finally:
            stop(daemon)
            kubelet.stop()
        for action in ("add", "remove"):
            report_calls(report, f"udev {action} event -> ListAndWatch receipt, CDI on ({HOTPLUG_EVENTS})", got[action])

        # 99 devices x 100 replicas present, CDI on: each event re-encodes one device's entries of the list and
        # of a spec of ~10,000 CDI devices, and rewrites the whole file.
        present = list(range(realudev.FIRST, realudev.FIRST + DEVICES - 1))
        for n in present:
            loops.add(n)
        realudev.settle()
        watch.close()  # a burst of 99 devices' events may overflow its socket: a fresh one from here on
        watch = UdevWatch("block")
        log_path = os.path.join(tmp, "daemon-crowded.log")
        kubelet, daemon, _ = serve(tmp, "hotplug-cdi-shared", config(REPLICAS, os.path.join(tmp, "cdi-100"), "debug"),
                                   len(present) * REPLICAS, log_path)
        toggled = realudev.FIRST + DEVICES - 1
        try:
            got = hotplug_events(kubelet, loops, watch, [toggled] * CROWDED_EVENTS, lambda n: f"loop{n}::0")
        finally:
            stop(daemon)
            kubelet.stop()
        for action in ("add", "remove"):
            report_calls(report, f"udev {action} event -> ListAndWatch receipt, {DEVICES} devices x {REPLICAS} "
                         f"replicas, CDI on ({CROWDED_EVENTS})", got[action])
        # The stand-in kubelet is Python: it takes tens of ms to take in each list of 10,000 entries (a
        # remove can bring two: the node gone, then the device).  The daemon's own part, from its log:
        # the udev event read -> the spec rewritten (after which the list goes out).
        spent = spec_times(log_path, f"loop{toggled}")
        for action in ("add", "remove"):
            report(f"udev {action} event read -> CDI spec of {DEVICES * REPLICAS} IDs rewritten, daemon log, "
                   f"p50 ({len(spent[action])})", statistics.median(spent[action]), "ms")
            report(f"udev {action} event read -> CDI spec of {DEVICES * REPLICAS} IDs rewritten, daemon log, max",
                   max(spent[action]), "ms")
    finally:
        loops.close()
        watch.close()
        realudev.clean_leftovers()
        udevd.stop()


def run(report: Report) -> None:
    realudev.clean_leftovers()
    with tempfile.TemporaryDirectory(prefix="udp-bench-sharing-") as tmp:
        allocate_bench(report, tmp)
        hotplug_bench(report, tmp)


if __name__ == "__main__":
    def _report(name: str, value: float, unit: str) -> None:
        print(f"{name:<72} {value:>10.3f} {unit}", flush=True)

    run(_report)
