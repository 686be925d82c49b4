"""Health checks at scale (issue 10): DEVICES real loop devices, each with a health_command that takes 1 s,
every 2 s.  With ``[plugin] health_workers`` sized to it (the checks keep DEVICES * 1 s / 2 s = 100 running
on average), each device should be checked every 2 s +- 10%; with too few workers the checks fall behind
and the daemon says so in a WARNING.  The real interval between two checks of one device comes from the
timestamps the command appends to a file (bash's $EPOCHREALTIME, no fork for the clock).
Prints figures; asserts nothing.  Needs root and udev; run under the shared lock (`make bench`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List

from tests.bench import common
from tests.bench.common import Report, Serve, note
from tests.hotplug import loopscale, realudev
from tests.hotplug.loopscale import LeanKubelet, LoopScale

DEVICES = 200
NUMBERS = list(range(loopscale.FIRST, loopscale.FIRST + DEVICES))
INTERVAL, DURATION, TIMEOUT = 2.0, 1.0, 1.5
SIZED, TOO_FEW = 128, 50  # 100 needed on average
WARM_UP, WINDOW = 6.0, 24.0  # seconds of checks left out, then measured
FEW_WINDOW = 16.0
WARNING = "falling behind"
CHECK = "/bin/bash -c 'echo \"$EPOCHREALTIME $1\" >> {log}; exec sleep {duration:g}' check"


def config(log: str, workers: int) -> str:
    return loopscale.config(
        plugin=f"health_workers = {workers}",
        extra=(f"health_command = {CHECK.format(log=log, duration=DURATION)}\n"
               f"health_interval = {INTERVAL:g}\nhealth_timeout = {TIMEOUT:g}\n"))


def intervals(log: str, since: float, until: float) -> Dict[str, List[float]]:
    """Per device, the seconds between consecutive check starts (wall clock) within [since, until]."""
    starts: Dict[str, List[float]] = {}
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                when = float(parts[0])
                if since <= when <= until:
                    starts.setdefault(parts[1], []).append(when)
    return {dev: [b - a for a, b in zip(ts, ts[1:])] for dev, ts in starts.items()}


def measure(report: Report, tmp: str, kubelet: LeanKubelet, label: str, workers: int, window: float) -> None:
    log = os.path.join(tmp, f"checks-{workers}.log")
    open(log, "w").close()
    seq = kubelet.messages.get(loopscale.RESOURCE, 0)
    daemon = Serve(os.path.join(tmp, f"etc-{workers}"), config(log, workers), kubelet.directory)
    try:
        kubelet.wait_push(loopscale.RESOURCE, seq, lambda p, _: p.count == DEVICES, 60, f"all {DEVICES} devices")
        started = time.time()
        cpu0, t0 = None, 0.0
        deadline = started + WARM_UP + window
        while time.time() < deadline:
            if cpu0 is None and time.time() >= started + WARM_UP:
                cpu0, t0 = common.cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(0.2)  # the measured window passing, not a synchronisation
        cpu = (common.cpu_seconds(daemon.pid) - (cpu0 or 0.0)) / (time.monotonic() - t0)
        text = daemon.log()
    finally:
        daemon.stop()
    got = intervals(log, started + WARM_UP, started + WARM_UP + window)
    values = [v for vs in got.values() for v in vs]
    if not values:
        raise SystemExit(f"benchmark: no health check ran twice for any device ({label}):\n{text}")
    within = sum(1 for v in values if abs(v - INTERVAL) <= 0.1 * INTERVAL) / len(values)
    what = f"health, {DEVICES} devices, {DURATION:g} s check every {INTERVAL:g} s, health_workers = {workers}"
    report(f"{what}: devices checked in the window", len(got), "devices")
    report(f"{what}: interval mean", statistics.mean(values), "s")
    report(f"{what}: interval p10", common.percentile(values, 10), "s")
    report(f"{what}: interval p90", common.percentile(values, 90), "s")
    report(f"{what}: intervals within 2 s +- 10%", within * 100, "%")
    report(f"{what}: daemon CPU (its own process, not the commands)", cpu * 100, "%")
    warnings = [line for line in text.splitlines() if WARNING in line]
    report(f"{what}: WARNING lines about falling behind", len(warnings), "lines")
    if warnings:
        note(f"{label}: {warnings[0].strip()}")


def run(report: Report) -> None:
    problem = realudev.Udevd.problem()
    if problem:
        raise SystemExit(f"benchmark: {problem}")
    realudev.clean_leftovers()
    loopscale.clean_leftovers()
    with tempfile.TemporaryDirectory(prefix="udp-bench-health-") as tmp:
        udevd = realudev.Udevd(os.path.join(tmp, "udevd.log")).start()
        loops = LoopScale()
        kubelet = LeanKubelet(os.path.join(tmp, "dp")).start()
        try:
            loops.add_many(NUMBERS)
            realudev.settle()
            note(f"{DEVICES} loop devices; checks need {DEVICES * DURATION / INTERVAL:g} workers on average")
            measure(report, tmp, kubelet, "sized", SIZED, WINDOW)
            measure(report, tmp, kubelet, "too few workers", TOO_FEW, FEW_WINDOW)
        finally:
            kubelet.stop()
            try:
                loops.close()
            finally:
                loopscale.clean_leftovers()
                udevd.stop()
