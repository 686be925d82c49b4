"""Real-kubelet benchmark (issue 11): a kubelet v1.20.2 with containerd (tests/kubelet) and the daemon.

- kubelet restart -> Register received by the kubelet: from the new kubelet's own log, the time it served
  kubelet.sock ("Serving device plugin registration server") to its "Got registration request", per
  resource, over RESTARTS restarts;
- hotplug -> "State pushed": LOOP_CTL_ADD / LOOP_CTL_REMOVE of a loop device (wall time just before the
  ioctl) to the kubelet's log line for the ListAndWatch message that carried the change.

Prints p50 and max; asserts nothing.  Needs root, the cached kubelet (built on first use, about 3-7
minutes), containerd, runc, busybox-static and udev; run under the shared lock (`make bench`).
Entry point: ``run(report)`` as for the other parts (``python -m tests.bench.run kubelet``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported

from tests.bench.core import start_daemon, stop, write_config  # noqa: E402
from tests.hotplug import realudev  # noqa: E402
from tests.kubelet import build, helpers  # noqa: E402
from tests.kubelet.node import Node  # noqa: E402

Report = Callable[[str, float, str], None]

RESTARTS = 10
HOTPLUG_CYCLES = 20
LOOP_NUMBER = 150
RESOURCES = {helpers.MEM: ["full", "null", "zero"], helpers.LOOP: []}


def _p50_max(report: Report, name: str, seconds: List[float]) -> None:
    report(f"{name}, p50", statistics.median(seconds) * 1000, "ms")
    report(f"{name}, max", max(seconds) * 1000, "ms")


def restarts(node: Node, count: int) -> Dict[str, List[float]]:
    """Restart the kubelet ``count`` times; per resource, seconds from kubelet.sock served to Register."""
    delays: Dict[str, List[float]] = {r: [] for r in RESOURCES}
    for _ in range(count):
        kubelet = node.restart_kubelet()
        served = kubelet.served_at()
        assert served is not None
        for resource in RESOURCES:
            line = helpers.registered(node, resource, served)
            helpers.pushed(node, resource, line.time)
            delays[resource].append(line.time - served)
    return delays


def hotplug(node: Node, loops: realudev.LoopDevices, cycles: int) -> Dict[str, List[float]]:
    """Add and remove one loop device ``cycles`` times; seconds from the ioctl to the kubelet's "State pushed"."""
    name = f"loop{LOOP_NUMBER}"
    out: Dict[str, List[float]] = {"add": [], "remove": []}
    for _ in range(cycles):
        t0 = time.time()
        loops.add(LOOP_NUMBER)
        helpers.healthy(node, helpers.LOOP, [name])
        out["add"].append(helpers.pushed(node, helpers.LOOP, t0).time - t0)
        realudev.settle()
        t0 = time.time()
        loops.remove(LOOP_NUMBER)
        helpers.healthy(node, helpers.LOOP, [])
        out["remove"].append(helpers.pushed(node, helpers.LOOP, t0).time - t0)
    return out


def run(report: Report) -> None:
    kubelet = build.build()
    problem = realudev.Udevd.problem()
    if problem:
        raise SystemExit(f"kubelet bench: {problem}")
    tmp = tempfile.mkdtemp(prefix="udp-bench-k-")
    realudev.clean_leftovers()
    udevd = realudev.Udevd(os.path.join(tmp, "udevd.log")).start()
    loops = realudev.LoopDevices()
    node = Node(os.path.join(tmp, "node"), kubelet)
    daemon = None
    try:
        os.makedirs(node.base)
        node.start()
        config = write_config(tmp, helpers.config(helpers.mem_section(), helpers.loop_section()))
        started = time.time()
        daemon = start_daemon(config, node.dp)
        helpers.ready(node, RESOURCES, started)
        print(f"# kubelet {build.VERSION} (containerd, standalone); the daemon serves {', '.join(RESOURCES)}",
              flush=True)
        for resource, seconds in restarts(node, RESTARTS).items():
            _p50_max(report, f"kubelet 1.20 restart -> Register ({resource}, {RESTARTS}x)", seconds)
        _p50_max(report, f"kubelet 1.20 own start, process -> /healthz ({RESTARTS + 1}x)",
                 node.kubelet_start_seconds)
        for action, seconds in hotplug(node, loops, HOTPLUG_CYCLES).items():
            _p50_max(report, f"kubelet 1.20 loop {action} -> State pushed ({HOTPLUG_CYCLES}x)", seconds)
    finally:
        if daemon is not None:
            stop(daemon)
        problems = node.close()
        loops.close()
        udevd.stop()
        if problems:
            print(f"# kubelet bench teardown: {problems}; logs kept in {tmp}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
