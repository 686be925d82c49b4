"""Metrics benchmark (issue 12): what counting costs an Allocate, what a scrape costs and how long it
takes, and whether Allocate notices a scraper that scrapes as fast as it can.  Prints figures."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, List

import grpc

from tests.bench.core import EXAMPLE, Report, percentile, sequential, stop, write_config
from tests.standin import StandInKubelet
from udev_device_plugin import api, metrics

CALLS = 2000
SCRAPES = 50


def counting_overhead_ns() -> float:
    """ns per call that metrics.counted adds to a handler that does nothing (in process, no gRPC)."""
    counter = metrics.RpcCounter()

    async def handler(request: Any, context: Any) -> bytes:
        return b""

    wrapped = metrics.counted(counter, handler)

    async def loop(fn: Any, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await fn(None, None)
        return time.perf_counter() - t0

    async def main() -> float:
        n = 200_000
        await loop(handler, n)
        await loop(wrapped, n)
        bare = min([await loop(handler, n) for _ in range(5)])
        counted = min([await loop(wrapped, n) for _ in range(5)])
        return (counted - bare) / n * 1e9

    return asyncio.run(main())


def render_ms(renderer: str, resources: int) -> float:
    views = []
    for i in range(resources):
        stats = metrics.ResourceStats()
        stats.allocate.ok = 12345
        views.append(metrics.ResourceView(f"example.com/r{i}", stats, {"Healthy": 10}, 3, 1, "registered", 1, 0,
                                          True, False))
    view = metrics.View(version="0", python="3", grpcio="1", resources=views,
                        registration_states=["waiting", "registered"])
    render = metrics.render_text if renderer == "builtin" else metrics.PrometheusClient().render
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        render(metrics.families(view))
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def run(report: Report) -> None:
    report("metrics.counted overhead per call (in process)", counting_overhead_ns(), "ns")
    renderers = ["builtin"]
    try:
        metrics.PrometheusClient()
        renderers.append("prometheus_client")
    except ImportError:
        pass
    for renderer in renderers:
        for n in (4, 100):
            report(f"families + render, {n} resources, {renderer} (in process) p50", render_ms(renderer, n), "ms")

    with tempfile.TemporaryDirectory(prefix="udp-bench-") as tmp:
        kubelet_dir = os.path.join(tmp, "dp")
        os.makedirs(kubelet_dir)
        kubelet = StandInKubelet(kubelet_dir).start()
        text = "[plugin]\nmetrics_address = 127.0.0.1:0\n" + open(EXAMPLE).read()
        log_path = os.path.join(tmp, "daemon.log")
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "udev_device_plugin", "serve", "--config",
                                       write_config(tmp, text), "--kubelet-dir", kubelet_dir],
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log, stderr=log)
        try:
            if not kubelet.wait_for(lambda: "example.com/mem" in kubelet.devices, 30):
                raise SystemExit("the daemon did not register")
            deadline = time.monotonic() + 10
            found: List[str] = []
            while not found and time.monotonic() < deadline:
                found = re.findall(r"metrics: serving (http://\S+)", open(log_path).read())
                time.sleep(0.01)  # polling the log for the port, not timing anything
            if not found:
                raise SystemExit("the daemon logged no metrics address")
            url = found[0]

            def scrape() -> int:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    return len(reply.read())

            size = scrape()
            scrapes = []
            for _ in range(SCRAPES):
                time.sleep(0.1)  # the spacing keeps under the exporter's connection rate, and past its render cache
                scrapes.extend(sequential(scrape, 1))
            report("scrape size, example config (4 resources)", size / 1024, "KiB")
            report(f"scrape p50, {SCRAPES} scrapes 0.1 s apart (urllib, a new connection each)",
                   statistics.median(scrapes), "ms")
            report("scrape p99, same", percentile(scrapes, 99), "ms")

            channel = grpc.insecure_channel("unix:" + kubelet.client("example.com/mem").path)
            stub = api.Stub(channel)
            request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["null"])])
            sequential(lambda: stub.Allocate(request, timeout=30), 300)
            quiet = sequential(lambda: stub.Allocate(request, timeout=30), CALLS)
            stopping = threading.Event()
            hammered = [0]

            def hammer() -> None:
                while not stopping.is_set():
                    scrape()
                    hammered[0] += 1

            thread = threading.Thread(target=hammer)
            thread.start()
            try:
                t0 = time.perf_counter()
                busy = sequential(lambda: stub.Allocate(request, timeout=30), CALLS)
                elapsed = time.perf_counter() - t0
            finally:
                stopping.set()
                thread.join()
            channel.close()
            report("Allocate p50, no scraper", statistics.median(quiet), "ms")
            report("Allocate p99, no scraper", percentile(quiet, 99), "ms")
            report("Allocate p50, a scraper scraping back to back", statistics.median(busy), "ms")
            report("Allocate p99, a scraper scraping back to back", percentile(busy, 99), "ms")
            report("scrapes answered per second meanwhile (the exporter's connection rate)", hammered[0] / elapsed,
                   "per s")
        finally:
            stop(daemon)
            kubelet.stop()
