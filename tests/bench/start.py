"""Start-up (issue 13): ``serve`` start -> the first Register at the stand-in kubelet, p50 over STARTS starts,
next to a bare grpcio server's start -> serving; and what importing costs in a fresh interpreter: our
daemon module (and the ``serve`` entry point) next to grpc + protobuf + pyudev alone and Python itself.
Rounds are interleaved so that each figure sees the same machine.  Prints figures; asserts nothing.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from tests.bench.common import BARE_KINDS, Bare, Report, Serve, note, percentile
from tests.hotplug.loopscale import LeanKubelet

STARTS = 12
IMPORT_ROUNDS = 10
RES = "example.com/mem"
CONFIG = """
[plugin]
log_level = warning

[resource example.com/mem]
subsystem = mem
kernel = null zero full
"""


def import_statements() -> Dict[str, str]:
    out = {"Python alone (-c pass)": "pass",
           "grpc + google.protobuf + pyudev": "import grpc, google.protobuf, pyudev",
           "udev_device_plugin.daemon": "import udev_device_plugin.daemon"}
    # The console script's module: entry (serve without click) where it exists, else the click CLI.
    entry = "udev_device_plugin.entry" if importlib.util.find_spec("udev_device_plugin.entry") else \
        "udev_device_plugin.cli"
    out[f"{entry} (the serve command's import)"] = f"import {entry}"
    return out


def importtime(statement: str, startup: set) -> float:
    """Microseconds -X importtime gives the statement's imports (its top-level modules' cumulative
    times, without those Python imports at start-up)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                         check=True)
    total = 0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if name.startswith("   ") or not cumulative.strip().isdigit():
            continue  # nested (indented below the one space that follows the bar), or the header
        if name.strip() not in startup:
            total += int(cumulative)
    return total


def startup_modules() -> set:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                         check=True)
    return {line.split("|")[2].strip() for line in out.stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


def imports(report: Report) -> None:
    statements = import_statements()
    wall: Dict[str, List[float]] = {k: [] for k in statements}
    measured: Dict[str, List[float]] = {k: [] for k in statements}
    startup = startup_modules()
    env = dict(os.environ)
    for _ in range(IMPORT_ROUNDS):
        for name, statement in statements.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True, env=env)
            wall[name].append((time.perf_counter() - t0) * 1000)
            measured[name].append(importtime(statement, startup) / 1000)
    for name in statements:
        report(f"fresh interpreter + import {name}, wall p50 ({IMPORT_ROUNDS}x)", statistics.median(wall[name]), "ms")
    for name in statements:
        if name.startswith("Python alone"):
            continue
        report(f"import {name} alone, -X importtime p50", statistics.median(measured[name]), "ms")


def starts(report: Report, tmp: str) -> None:
    kubelet_dir = os.path.join(tmp, "dp")
    kubelet = LeanKubelet(kubelet_dir).start()
    register: List[float] = []
    listed: List[float] = []
    bare: Dict[str, List[float]] = {k: [] for k in BARE_KINDS}
    try:
        for i in range(STARTS):
            for kind in BARE_KINDS:
                server = Bare(kind, os.path.join(tmp, "bare.sock"), b"")
                bare[kind].append(server.started * 1000)
                server.stop()
            arrivals, messages = len(kubelet.register_arrivals), kubelet.messages.get(RES, 0)
            daemon = Serve(os.path.join(tmp, f"etc{i}"), CONFIG, kubelet_dir)
            try:
                if not kubelet.wait_for(lambda a=arrivals, m=messages: len(kubelet.register_arrivals) > a
                                        and kubelet.messages.get(RES, 0) > m, 30):
                    raise SystemExit(f"benchmark: the daemon did not register within 30 s:\n{daemon.log()}")
                register.append((kubelet.register_arrivals[arrivals] - daemon.t0) * 1000)
                listed.append((kubelet.since(RES, messages)[0].monotonic - daemon.t0) * 1000)
            finally:
                daemon.stop()
    finally:
        kubelet.stop()
    report(f"serve start -> first Register at the stand-in, p50 ({STARTS} starts)", statistics.median(register), "ms")
    report(f"serve start -> first Register at the stand-in, max ({STARTS} starts)", max(register), "ms")
    report(f"serve start -> first device list at the stand-in, p50 ({STARTS} starts)", statistics.median(listed),
           "ms")
    for kind, times in bare.items():
        report(f"{kind}: start -> serving (its 'ready' line), p50 ({STARTS} starts)", statistics.median(times), "ms")
        report(f"{kind}: start -> serving, p90", percentile(times, 90), "ms")


def run(report: Report) -> None:
    note("serve is started as `python -m udev_device_plugin serve` (the same entry point as the console script)")
    imports(report)
    with tempfile.TemporaryDirectory(prefix="udp-bench-start-") as tmp:
        starts(report, tmp)
