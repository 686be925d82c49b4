"""What the issue-13 benchmark parts share: the bare grpcio servers (the "Python floor"), the daemon as a
process with its log, per-process CPU, RSS and wake-ups from /proc, interleaved call rounds, and a uevent
watcher of its own process.

Every server under test is a separate process, as on a node; this process plays the kubelet (and the
rogue client, the watcher and the bare servers are processes of their own too, so that this process's
GIL never delays what they time or serve).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import AbstractSet, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported

import grpc  # noqa: E402

Report = Callable[[str, float, str], None]

ALLOCATE = "/v1beta1.DevicePlugin/Allocate"
LIST_AND_WATCH = "/v1beta1.DevicePlugin/ListAndWatch"
# The client side of every call is the same for every server: one connection per channel, as a Go
# ClientConn (the stand-in's choice), and the request already serialized.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The "Python floor" (issue 13): a bare grpcio server on a UNIX socket answering Allocate with a constant
# pre-serialized reply (argv[2], hex).  Nothing of the project is imported.  Sync: 16 workers.
BARE_SYNC = r"""
import sys
from concurrent import futures
import grpc
reply = bytes.fromhex(sys.argv[2])
def allocate(request, context):
    return reply
handler = grpc.method_handlers_generic_handler("v1beta1.DevicePlugin", {
    "Allocate": grpc.unary_unary_rpc_method_handler(allocate)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""
# The same on grpc.aio, the daemon's serving model: one event loop, no worker threads.  argv[1] may name
# several sockets (comma-separated): one server on each, as the daemon has one per resource.  It also
# answers ListAndWatch with one message and holds the stream open, as every device plugin holds the
# kubelet's (only the idle window opens one).
BARE_AIO = r"""
import asyncio, sys
import grpc
reply = bytes.fromhex(sys.argv[2])
async def allocate(request, context):
    return reply
async def list_and_watch(request, context):
    yield reply
    await asyncio.Event().wait()
async def main():
    servers = []
    for sock in sys.argv[1].split(","):
        handler = grpc.method_handlers_generic_handler("v1beta1.DevicePlugin", {
            "Allocate": grpc.unary_unary_rpc_method_handler(allocate),
            "ListAndWatch": grpc.unary_stream_rpc_method_handler(list_and_watch)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port("unix:" + sock)
        await server.start()
        servers.append(server)
    print("ready", flush=True)
    await servers[0].wait_for_termination()
asyncio.run(main())
"""
BARE_KINDS = {"bare grpc.server (16 threads)": BARE_SYNC, "bare grpc.aio": BARE_AIO}


def daemon_grpc_env() -> Dict[str, str]:
    """The gRPC settings ``serve`` gives itself on this grpcio (entry.grpc_settings), as environment
    variables: a bare server run with them shows what grpc costs with them, apart from the daemon."""
    from udev_device_plugin import entry

    env: Dict[str, str] = {}
    entry.grpc_settings(env, entry.grpcio_release())
    return env


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def print_load(when: str) -> None:
    print(f"# load average {when}: {loadavg()} (1, 5, 15 min; {os.cpu_count()} CPUs)", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


# --- /proc ----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process, threads that ended included (clock ticks, 10 ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """CPU time of the process's live threads in nanoseconds (schedstat: exact, unlike the ticks of
    /proc/PID/stat), for costs of a few milliseconds."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def asleep(pid: int) -> bool:
    """Every thread of the process is sleeping (state S): it has finished what it was doing."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("S", "I"):
                    return False
        except OSError:
            continue
    return True


def wait_asleep(pid: int, timeout: float = 5.0) -> bool:
    """Wait until the process's threads are all asleep twice in a row, 1 ms apart."""
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        calm = calm + 1 if asleep(pid) else 0
        if calm >= 2:
            return True
        time.sleep(0.001)
    return False


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every live thread: each is a wake-up."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def switches_by_thread(pid: int) -> Dict[str, int]:
    """Context switches per thread name (threads of one name summed)."""
    out: Dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                n = sum(int(line.split()[1]) for line in f
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
        except OSError:
            continue
        out[name] = out.get(name, 0) + n
    return out


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# --- processes ------------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


class Bare:
    """One bare grpcio server process; ``started``: seconds from Popen to its "ready" line.  ``sock``: its
    socket, or (grpc.aio only) several, comma-separated, each with a server of its own."""

    def __init__(self, kind: str, sock: str, reply: bytes, env: Optional[Dict[str, str]] = None,
                 script: Optional[str] = None) -> None:
        self.kind = kind
        self.sock = sock
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-c", script or BARE_KINDS[kind], sock, reply.hex()],
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        self.started = time.monotonic() - t0
        if line != "ready":
            stop_process(self.proc)
            raise SystemExit(f"benchmark: the {kind} server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


class Serve:
    """``udev-device-plugin serve`` (``python -m udev_device_plugin``) as a process of its own, its
    stdout and stderr in ``directory``/daemon.log; ``t0``: time.monotonic() just before the Popen."""

    def __init__(self, directory: str, config_text: str, kubelet_dir: str,
                 env: Optional[Dict[str, str]] = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.config = os.path.join(directory, "udev-device-plugin.conf")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(directory, "daemon.log")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("WATCHDOG_USEC", None)
        self._log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "udev_device_plugin", "serve", "--config", self.config,
                                      "--kubelet-dir", kubelet_dir], env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> Optional[int]:
        try:
            return stop_process(self.proc)
        finally:
            self._log.close()


def channel(path: str) -> grpc.Channel:
    return grpc.insecure_channel("unix:" + path, options=CHANNEL_OPTIONS)


def hold_stream(ch: grpc.Channel) -> Any:
    """Open a ListAndWatch stream on ``ch`` as the kubelet does, read its first message and keep it open
    (until the channel closes)."""
    stream = ch.unary_stream("/v1beta1.DevicePlugin/ListAndWatch", request_serializer=None,
                             response_deserializer=None)(b"")
    next(stream)
    return stream


def raw(ch: grpc.Channel, method: str = ALLOCATE) -> Callable[..., bytes]:
    """A unary call on ``ch`` that sends and returns bytes (no (de)serialization on our side)."""
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


# --- interleaved rounds ---------------------------------------------------------------------------

class Target(NamedTuple):
    name: str
    pid: int  # the server process, for its CPU time
    calls: List[Callable[[], object]]  # taken in turn (several sockets, several IDs)


class Figures(NamedTuple):
    latencies: List[float]  # ms, sequential
    cpu: float  # server CPU seconds over ``calls`` calls
    calls: int
    round_cpu: Tuple[float, ...] = ()  # server CPU seconds in each round
    round_size: int = 0  # calls per round: latencies[i * round_size:(i + 1) * round_size] is round i

    @property
    def cpu_per_call_us(self) -> float:
        return self.cpu / self.calls * 1e6

    def rounds(self) -> List[Tuple[float, List[float]]]:
        """(server CPU seconds, latencies) of each round."""
        n = self.round_size
        return [(c, self.latencies[i * n:(i + 1) * n]) for i, c in enumerate(self.round_cpu)]


def paired_ratios(f: Figures, b: Figures) -> Tuple[float, float]:
    """The median over rounds of f's p99 / b's p99 and of f's CPU / b's CPU in the same round.  Rounds
    are interleaved, so each pair ran seconds apart: this cancels the VM's drift over a run (its speed
    varies by a third), which the ratio of the pooled figures does not."""
    p99s, cpus = [], []
    for (fc, fl), (bc, bl) in zip(f.rounds(), b.rounds()):
        p99s.append(percentile(fl, 99) / percentile(bl, 99))
        if bc > 0:
            cpus.append(fc / bc)
    return (statistics.median(p99s) if p99s else float("nan"), statistics.median(cpus) if cpus else float("nan"))


def interleaved(targets: Sequence[Target], rounds: int = 5, calls_per_round: int = 1000,
                warmup: int = 300) -> Dict[str, Figures]:
    """Sequential calls to each target in turn, ``rounds`` times, so every server sees the same machine
    (other load, frequency, caches) in turn; the server's utime+stime counted over its own rounds only."""
    for t in targets:
        for i in range(warmup):
            t.calls[i % len(t.calls)]()
    lat: Dict[str, List[float]] = {t.name: [] for t in targets}
    cpu: Dict[str, float] = {t.name: 0.0 for t in targets}
    per_round: Dict[str, List[float]] = {t.name: [] for t in targets}
    done: Dict[str, int] = {t.name: 0 for t in targets}
    for _ in range(rounds):
        for t in targets:
            out = lat[t.name]
            c0 = cpu_seconds(t.pid)
            n = len(t.calls)
            start = done[t.name]
            for i in range(start, start + calls_per_round):
                call = t.calls[i % n]
                t0 = time.perf_counter()
                call()
                out.append((time.perf_counter() - t0) * 1000)
            spent = cpu_seconds(t.pid) - c0
            cpu[t.name] += spent
            per_round[t.name].append(spent)
            done[t.name] += calls_per_round
    return {name: Figures(lat[name], cpu[name], done[name], tuple(per_round[name]), calls_per_round) for name in lat}


def report_calls(report: Report, what: str, got: Dict[str, Figures], floor: Sequence[str],
                 references: AbstractSet[str] = frozenset()) -> None:
    """p50, p99 and server CPU per call of every target, and each non-floor target's ratio to each floor
    (``references``: bare servers of other shapes, reported but not compared with every target)."""
    for name, f in got.items():
        report(f"{what}: {name} p50", statistics.median(f.latencies), "ms")
        report(f"{what}: {name} p99", percentile(f.latencies, 99), "ms")
        report(f"{what}: {name} server CPU per call", f.cpu_per_call_us, "us")
    for name, f in got.items():
        if name in floor or name in references:
            continue
        for bare in floor:
            b = got[bare]
            report(f"{what}: {name} / {bare}, p99", percentile(f.latencies, 99) / percentile(b.latencies, 99), "x")
            report(f"{what}: {name} / {bare}, CPU per call", f.cpu_per_call_us / b.cpu_per_call_us, "x")
            paired_report(report, what, name, bare, f, b)


def paired_report(report: Report, what: str, name: str, bare: str, f: Figures, b: Figures) -> None:
    p99, cpu = paired_ratios(f, b)
    report(f"{what}: {name} / {bare}, p99, median of {len(f.round_cpu)} rounds' ratios", p99, "x")
    report(f"{what}: {name} / {bare}, CPU per call, median of {len(f.round_cpu)} rounds' ratios", cpu, "x")


# --- uevents, timed by a process of their own -----------------------------------------------------

WATCHER = r"""
import select, sys, time
import pyudev
context = pyudev.Context()
monitors = {}
for source in ("kernel", "udev"):
    m = pyudev.Monitor.from_netlink(context, source=source)
    m.set_receive_buffer_size(128 << 20)
    m.filter_by(sys.argv[1])
    m.start()
    monitors[m.fileno()] = (source, m)
print("ready", flush=True)
while True:
    ready, _, _ = select.select(list(monitors) + [0], [], [])
    now = time.monotonic()
    if 0 in ready:
        break
    lines = []
    for fd in ready:
        source, m = monitors[fd]
        while True:
            dev = m.poll(timeout=0)
            if dev is None:
                break
            began = dev.properties.get("USEC_INITIALIZED", "-") if source == "udev" else "-"
            lines.append(f"{now:.6f} {source} {dev.action} {dev.sys_name} {began}\n")
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
"""


class Uevents:
    """When each uevent of ``subsystem`` reached a process of its own: the kernel's (source ``kernel``,
    the time the kernel sent it, give or take a wake-up) and udevd's (source ``udev``, what the daemon
    listens to).  A separate process, so that this one's GIL cannot delay the timestamps.  With each of
    udevd's events it keeps udevd's own USEC_INITIALIZED (CLOCK_MONOTONIC, as time.monotonic()): when
    udevd began handling the device's first event, a time no reader's lag in a burst can move."""

    def __init__(self, subsystem: str = "block") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WATCHER, subsystem], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            stop_process(self.proc)
            raise SystemExit("benchmark: the uevent watcher did not start")
        self.cond = threading.Condition()
        self.seen: Dict[Tuple[str, str, str], List[float]] = {}
        self.began: Dict[Tuple[str, str], List[float]] = {}  # udevd's USEC_INITIALIZED, (action, name)
        self.thread = threading.Thread(target=self._read, name="uevents", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            when, source, action, name, began = line.split()
            with self.cond:
                self.seen.setdefault((source, action, name), []).append(float(when))
                if began.isdigit():
                    self.began.setdefault((action, name), []).append(int(began) / 1e6)
                self.cond.notify_all()

    def first(self, source: str, action: str, name: str, after: float, timeout: float = 10.0) -> float:
        """When the first such event came after ``after``; waits for the watcher's line."""
        found: List[float] = []

        def seen() -> bool:
            found[:] = [t for t in self.seen.get((source, action, name), ()) if t >= after][:1]
            return bool(found)

        with self.cond:
            if not self.cond.wait_for(seen, timeout):
                raise SystemExit(f"benchmark: no {source} {action} uevent of {name} within {timeout:g} s")
        return found[0]

    def last(self, source: str, action: str, names: Sequence[str], after: float, timeout: float = 60.0) -> float:
        return max(self.first(source, action, n, after, timeout) for n in names)

    def last_began(self, action: str, names: Sequence[str], after: float, timeout: float = 60.0) -> float:
        """The latest time udevd began one of these devices' ``action`` events (USEC_INITIALIZED), once
        the watcher has read them all; what was initialized before ``after`` (a leftover) is left out."""
        self.last("udev", action, names, after, timeout)
        latest = after
        with self.cond:
            for name in names:
                times = [t for t in self.began.get((action, name), ()) if t >= after]
                if not times:
                    raise SystemExit(f"benchmark: udevd's {action} event of {name} carried no USEC_INITIALIZED")
                latest = max(latest, *times)
        return latest

    def forget(self) -> None:
        with self.cond:
            self.seen.clear()
            self.began.clear()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(5)
