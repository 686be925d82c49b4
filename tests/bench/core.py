"""Core benchmark (issue 2): Allocate latency next to a bare grpcio unary call, kubelet restart ->
re-registration, RSS, and idleness.  Prints figures; asserts nothing: these machines are noisy.

Every server under test is a separate process, as on a node; the client (this process) plays
the kubelet over real UNIX sockets.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from tests.bench.common import percentile, rss_mib
from tests.standin import StandInKubelet
from udev_device_plugin import api

Report = Callable[[str, float, str], None]

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "src", "udev_device_plugin", "example.conf")
MEM_ONLY = """
[resource example.com/mem]
subsystem = mem
kernel = null zero full
"""
SEQUENTIAL_CALLS = 2000
CONCURRENT_CALLERS = 200
CALLS_PER_CALLER = 10
RESTARTS = 40

BARE_SERVER = r"""
import sys, time
from concurrent import futures
import grpc
sys.path.insert(0, sys.argv[2])
from udev_device_plugin.kubelet import SERVER_OPTIONS
def echo(request, context):
    return request
handler = grpc.method_handlers_generic_handler("bench.Bare", {
    "Echo": grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)})
# The same thread pool and options as the daemon's servers.
server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS)
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def wakeups(pid: int) -> dict:
    """Context switches per thread (voluntary + involuntary): each is a wake-up of that thread."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            out[int(tid)] = int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
        except (OSError, KeyError):
            continue
    return out


def sequential(call: Callable[[], object], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def concurrent(call: Callable[[], object], callers: int, each: int) -> List[float]:
    """Latencies of ``callers`` threads calling at once, ``each`` calls apiece."""
    out: List[float] = []
    lock = threading.Lock()
    start = threading.Barrier(callers)

    def caller() -> None:
        start.wait()
        mine = sequential(call, each)
        with lock:
            out.extend(mine)

    with futures.ThreadPoolExecutor(callers) as pool:
        for f in [pool.submit(caller) for _ in range(callers)]:
            f.result()
    return out


def compare(calls: Dict[str, Callable[[], object]], rounds: int = 5) -> Dict[str, Tuple[List[float], List[float]]]:
    """Sequential and concurrent latencies (ms) per call, measured in interleaved rounds so that
    both servers see the same machine (warm-up, other load, frequency) in turn."""
    results: Dict[str, Tuple[List[float], List[float]]] = {name: ([], []) for name in calls}
    for call in calls.values():
        sequential(call, 300)  # warm-up: connections, threads, caches
    for _ in range(rounds):
        for name, call in calls.items():
            results[name][0].extend(sequential(call, SEQUENTIAL_CALLS // rounds))
    for _ in range(rounds):
        for name, call in calls.items():
            results[name][1].extend(concurrent(call, CONCURRENT_CALLERS, max(1, CALLS_PER_CALLER // rounds)))
    return results


def restarts(kubelet: StandInKubelet, resources: int) -> List[float]:
    """Restart the stand-in RESTARTS times; ms from its start (socket dir cleared, new kubelet.sock)
    until every resource registered again."""
    times = []
    for _ in range(RESTARTS):
        count = len(kubelet.registrations)
        kubelet.stop()
        t0 = time.perf_counter()
        kubelet.start()
        if not kubelet.wait_for(lambda c=count: len(kubelet.registrations) >= c + resources, 10):
            raise SystemExit("the daemon did not register again after a restart")
        times.append((time.perf_counter() - t0) * 1000)
    return times


def report_restarts(report: Report, times: List[float], resources: int) -> None:
    for p in (50, 99):
        report(f"kubelet restart -> {resources} resource(s) registered p{p} ({RESTARTS} restarts)",
               percentile(times, p), "ms")


def write_config(tmp: str, text: str) -> str:
    path = os.path.join(tmp, "etc", "udev-device-plugin.conf")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_daemon(config_path: str, kubelet_dir: str, env: Optional[Dict[str, str]] = None,
                 wrapper: Optional[List[str]] = None) -> subprocess.Popen:
    """``udev-device-plugin serve`` as a process of its own, as on a node (``wrapper``: umockdev-wrapper)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen((wrapper or []) + [sys.executable, "-m", "udev_device_plugin", "serve", "--config",
                                               config_path, "--kubelet-dir", kubelet_dir],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(report: Report) -> None:
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    with tempfile.TemporaryDirectory(prefix="udp-bench-") as tmp:
        kubelet_dir = os.path.join(tmp, "dp")
        os.makedirs(kubelet_dir)

        # --- the bare grpcio server, for comparison, running beside the daemon ---------
        bare_sock = os.path.join(tmp, "bare.sock")
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, bare_sock, src], stdout=subprocess.PIPE,
                                text=True)
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        kubelet = StandInKubelet(kubelet_dir).start()
        daemon = start_daemon(write_config(tmp, open(EXAMPLE).read()), kubelet_dir)
        try:
            names = ["example.com/mem", "example.com/loop", "example.com/kvm", "example.com/fuse"]
            if not kubelet.wait_for(lambda: all(n in kubelet.devices for n in names), 30):
                raise SystemExit("the daemon did not register its resources")
            channel = grpc.insecure_channel("unix:" + bare_sock)
            echo = channel.unary_unary("/bench.Bare/Echo", request_serializer=None, response_deserializer=None)
            payload = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(
                devices_ids=["null"])]).SerializeToString()
            # A channel of its own, set up as the bare call's is, so the figures differ only by
            # the server (the stand-in's own channel also carries its ListAndWatch stream).
            alloc_channel = grpc.insecure_channel("unix:" + kubelet.client("example.com/mem").path)
            stub = api.Stub(alloc_channel)
            request = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["null"])])
            got = compare({"bare": lambda: echo(payload, timeout=30),
                           "allocate": lambda: stub.Allocate(request, timeout=30)})
            (bare_seq, bare_conc), (alloc_seq, alloc_conc) = got["bare"], got["allocate"]
            bare_rss = rss_mib(bare.pid)
            channel.close()
            alloc_channel.close()
            report("bare grpcio unary p50, sequential", statistics.median(bare_seq), "ms")
            report("bare grpcio unary p99, sequential", percentile(bare_seq, 99), "ms")
            report("Allocate p50, sequential", statistics.median(alloc_seq), "ms")
            report("Allocate p99, sequential", percentile(alloc_seq, 99), "ms")
            report("Allocate p99 / bare p99, sequential", percentile(alloc_seq, 99) / percentile(bare_seq, 99), "x")
            report(f"bare grpcio unary p50, {CONCURRENT_CALLERS} concurrent", statistics.median(bare_conc), "ms")
            report(f"bare grpcio unary p99, {CONCURRENT_CALLERS} concurrent", percentile(bare_conc, 99), "ms")
            report(f"Allocate p50, {CONCURRENT_CALLERS} concurrent", statistics.median(alloc_conc), "ms")
            report(f"Allocate p99, {CONCURRENT_CALLERS} concurrent", percentile(alloc_conc, 99), "ms")
            report(f"Allocate p99 / bare p99, {CONCURRENT_CALLERS} concurrent",
                   percentile(alloc_conc, 99) / percentile(bare_conc, 99), "x")

            daemon_rss = rss_mib(daemon.pid)
            report("bare grpcio server RSS (after the same calls)", bare_rss, "MiB")
            report("daemon RSS, example config (4 resources)", daemon_rss, "MiB")
            report("daemon RSS / bare server RSS", daemon_rss / bare_rss, "x")

            # --- idle: no ListAndWatch message, no busy wake-ups --------------------------
            messages = dict(kubelet.messages)
            before, bare_before = wakeups(daemon.pid), wakeups(bare.pid)
            idle = 5.0
            time.sleep(idle)  # the idle window being measured, not a synchronisation
            after, bare_after = wakeups(daemon.pid), wakeups(bare.pid)
            stop(bare)
            report(f"ListAndWatch messages in {idle:.0f} s idle",
                   sum(kubelet.messages.values()) - sum(messages.values()), "messages")
            report(f"main thread wake-ups in {idle:.0f} s idle", after.get(daemon.pid, 0) - before.get(daemon.pid, 0),
                   "wake-ups")
            total = sum(after.get(t, 0) - before.get(t, 0) for t in after)
            bare_total = sum(bare_after.get(t, 0) - bare_before.get(t, 0) for t in bare_after)
            # grpcio's server threads poll their completion queue in 200 ms steps (to check
            # for signals): one such thread per server, i.e. per resource.
            report("all-thread wake-ups idle, daemon with 4 gRPC servers (grpcio internals)", total / idle, "per s")
            report("all-thread wake-ups idle, bare grpcio server (1 server)", bare_total / idle, "per s")

            # --- kubelet restart -> every resource registered again ---------------------
            fds, threads = len(os.listdir(f"/proc/{daemon.pid}/fd")), len(os.listdir(f"/proc/{daemon.pid}/task"))
            times = restarts(kubelet, len(names))
            report_restarts(report, times, len(names))
            report("daemon open files before the restarts", fds, "fds")
            report(f"daemon open files after {RESTARTS} restarts", len(os.listdir(f"/proc/{daemon.pid}/fd")), "fds")
            report("daemon threads before the restarts", threads, "threads")
            report(f"daemon threads after {RESTARTS} restarts", len(os.listdir(f"/proc/{daemon.pid}/task")), "threads")
            report(f"daemon RSS after {RESTARTS} restarts", rss_mib(daemon.pid), "MiB")
        finally:
            stop(daemon)
            kubelet.stop()
            if bare.poll() is None:
                stop(bare)

        # --- one resource: re-registration of a single socket ---------------------------
        kubelet = StandInKubelet(kubelet_dir).start()
        daemon = start_daemon(write_config(tmp, MEM_ONLY), kubelet_dir)
        try:
            if not kubelet.wait_for(lambda: "example.com/mem" in kubelet.devices, 30):
                raise SystemExit("the daemon did not register")
            report_restarts(report, restarts(kubelet, 1), 1)
        finally:
            stop(daemon)
            kubelet.stop()
