"""Calls and idleness (issues 9 and 13): Allocate sequential p50/p99 and server CPU per call (utime+stime of
the server process over its calls) for the daemon with 1 resource and with 40 (calls spread over the 40
sockets), next to the "Python floor" — a bare grpcio server answering Allocate with a constant
pre-serialized reply, both as a 16-thread grpc.server and as grpc.aio — and, as a reference beside it, the
bare grpc.aio server with the gRPC settings ``serve`` gives itself (entry.py), in interleaved rounds; the same
while a rogue local client holds 200 idle ListAndWatch streams over the 40 sockets; RSS idle; and
ListAndWatch messages and wake-ups (every thread's context switches) per second over an idle window.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Set, Tuple

from tests.bench import common
from tests.bench.common import BARE_KINDS, Bare, Figures, Report, Serve, Target, channel, note, raw, rss_mib
from tests.hotplug.loopscale import LeanKubelet
from udev_device_plugin import api
from udev_device_plugin.config import PluginConfig

RESOURCES = 40
ROGUE_STREAMS = 200
IDLE_SETTLE = 10.0
# Windows of one kubelet_keepalive period each: the daemon's check that the kubelet answers on
# kubelet.sock (how a hung kubelet is noticed) falls in each once, as in any stretch of that length.
IDLE_WINDOW = PluginConfig().kubelet_keepalive
IDLE_WINDOWS = 3
ROUNDS = 9  # interleaved: the per-round ratios pair calls seconds apart
PER_ROUND = 1000
BARE_MANY = f"bare grpc.aio, {RESOURCES} servers (calls spread over them)"
DAEMON_GRPC_ENV = common.daemon_grpc_env()
# A reference, not the floor: the bare grpc.aio server with the gRPC settings the daemon gives itself.
BARE_SET = "bare grpc.aio with the daemon's gRPC settings ({})".format(
    " ".join(f"{k}={v}" for k, v in DAEMON_GRPC_ENV.items()))
HELD_ONE = "bare grpc.aio holding one ListAndWatch stream (as the kubelet holds a plugin's)"
HELD_MANY = f"bare grpc.aio, {RESOURCES} servers, each holding one ListAndWatch stream"
ONE = "example.com/mem"
MEM = "subsystem = mem\nkernel = null zero full\n"
ONE_CONFIG = f"[plugin]\nlog_level = warning\n\n[resource {ONE}]\n{MEM}"
MANY = [f"example.com/r{i:02d}" for i in range(RESOURCES)]
MANY_CONFIG = "[plugin]\nlog_level = warning\n\n" + "".join(f"[resource {n}]\n{MEM}\n" for n in MANY)
# What the kubelet sends for a container asking for one device.
REQUEST = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=["null"])]
                              ).SerializeToString()

# A local client that opens ROGUE_STREAMS ListAndWatch streams spread over the sockets it is given and
# reads nothing after their first message; then, on the first socket, opens more until the daemon refuses.
ROGUE = r"""
import sys
import grpc
count, paths = int(sys.argv[1]), sys.argv[2:]
channels = [grpc.insecure_channel("unix:" + p, options=[("grpc.use_local_subchannel_pool", 1)]) for p in paths]
def open_stream(ch):
    return ch.unary_stream("/v1beta1.DevicePlugin/ListAndWatch", request_serializer=None,
                           response_deserializer=None)(b"")
held = [open_stream(channels[i % len(channels)]) for i in range(count)]
for s in held:
    next(s)  # its first list: the stream is being served
extra, refused = [], "none"
for _ in range(32):
    s = open_stream(channels[0])
    try:
        next(s)
    except grpc.RpcError as exc:
        refused = exc.code().name
        break
    extra.append(s)
for s in extra:
    s.cancel()
print("ready", len(held), len(held) // len(paths) + len(extra), refused, flush=True)
sys.stdin.read()
"""


def wait_lists(kubelet: LeanKubelet, names: List[str], daemon: Serve) -> None:
    if not kubelet.wait_for(lambda: all(len(kubelet.lists.get(n, {})) == 3 for n in names), 60):
        raise SystemExit(f"benchmark: the daemon did not list its devices within 60 s:\n{daemon.log()}")


def run(report: Report) -> None:
    with tempfile.TemporaryDirectory(prefix="udp-bench-calls-") as tmp:
        k1 = LeanKubelet(os.path.join(tmp, "dp1")).start()
        k40 = LeanKubelet(os.path.join(tmp, "dp40")).start()
        one = Serve(os.path.join(tmp, "etc1"), ONE_CONFIG, k1.directory)
        many = Serve(os.path.join(tmp, "etc40"), MANY_CONFIG, k40.directory)
        bares: Dict[str, Bare] = {}
        held: Dict[str, Bare] = {}
        channels = []
        rogue = None
        try:
            wait_lists(k1, [ONE], one)
            wait_lists(k40, MANY, many)
            ch1 = channel(k1.client(ONE).path)
            channels.append(ch1)
            reply = raw(ch1)(REQUEST, timeout=30)  # the bare servers answer with exactly our bytes
            for kind in BARE_KINDS:
                bares[kind] = Bare(kind, os.path.join(tmp, f"bare{len(bares)}.sock"), reply)
            # The reference for 40 resources: a bare grpc.aio process with 40 servers, calls spread over them.
            bare_many = Bare("bare grpc.aio", ",".join(os.path.join(tmp, f"bare-many{i}.sock")
                                                      for i in range(RESOURCES)), reply)
            bares[BARE_MANY] = bare_many
            if DAEMON_GRPC_ENV:
                bares[BARE_SET] = Bare(BARE_SET, os.path.join(tmp, "bare-set.sock"), reply, env=DAEMON_GRPC_ENV,
                                       script=BARE_KINDS["bare grpc.aio"])
            references = {BARE_MANY, BARE_SET}
            many_channels = [channel(k40.client(n).path) for n in MANY]
            channels.extend(many_channels)
            targets = []
            for kind, server in bares.items():
                chs = [channel(sock) for sock in server.sock.split(",")]
                channels.extend(chs)
                targets.append(Target(kind, server.pid, [lambda c=raw(ch): c(REQUEST, timeout=30) for ch in chs]))
            targets.append(Target("daemon, 1 resource", one.pid, [lambda c=raw(ch1): c(REQUEST, timeout=30)]))
            spread = [lambda c=raw(ch): c(REQUEST, timeout=30) for ch in many_channels]
            targets.append(Target(f"daemon, {RESOURCES} resources", many.pid, spread))
            note(f"Allocate of one device, {ROUNDS} interleaved rounds of {PER_ROUND} sequential calls per server; "
                 f"{RESOURCES} resources: calls spread over their {RESOURCES} sockets")
            got = common.interleaved(targets, ROUNDS, PER_ROUND)
            common.report_calls(report, "Allocate", got, list(BARE_KINDS), references)
            if BARE_SET in got:
                ratios(report, got, "daemon, 1 resource", BARE_SET)
            ratios(report, got, f"daemon, {RESOURCES} resources", BARE_MANY)

            for kind, server in bares.items():
                report(f"RSS idle: {kind} (after its calls)", rss_mib(server.pid), "MiB")
            report("RSS idle: daemon, 1 resource (after its calls)", rss_mib(one.pid), "MiB")
            report(f"RSS idle: daemon, {RESOURCES} resources", rss_mib(many.pid), "MiB")
            for kind in BARE_KINDS:
                report(f"RSS idle: daemon, 1 resource / {kind}", rss_mib(one.pid) / rss_mib(bares[kind].pid), "x")
            report(f"RSS idle: daemon, {RESOURCES} resources / {BARE_MANY}",
                   rss_mib(many.pid) / rss_mib(bare_many.pid), "x")

            # Idle references beside the floor: a device plugin always holds the kubelet's ListAndWatch
            # stream (one per resource), and grpc.aio wakes more often with a stream open than with none.
            held[HELD_ONE] = Bare("bare grpc.aio", os.path.join(tmp, "bare-held.sock"), reply)
            held[HELD_MANY] = Bare("bare grpc.aio", ",".join(os.path.join(tmp, f"bare-held{i}.sock")
                                                             for i in range(RESOURCES)), reply)
            for server in held.values():
                for sock in server.sock.split(","):
                    channels.append(channel(sock))
                    common.hold_stream(channels[-1])
            idle(report, {"daemon, 1 resource": (k1, one), f"daemon, {RESOURCES} resources": (k40, many)},
                 {**bares, **held})
            rogue = streams(report, tmp, k40, many, bares, targets, got, references)
        finally:
            if rogue is not None:
                if rogue.stdin is not None:
                    rogue.stdin.close()
                common.stop_process(rogue)
            for ch in channels:
                ch.close()
            for server in [*bares.values(), *held.values()]:
                server.stop()
            for daemon in (one, many):
                daemon.stop()
            for kubelet in (k1, k40):
                kubelet.stop()


def ratios(report: Report, got: Dict[str, Figures], name: str, reference: str) -> None:
    """Allocate p99 and CPU per call of ``name`` over those of ``reference`` (a bare server that is not a floor)."""
    f, b = got[name], got[reference]
    report(f"Allocate: {name} / {reference}, p99",
           common.percentile(f.latencies, 99) / common.percentile(b.latencies, 99), "x")
    report(f"Allocate: {name} / {reference}, CPU per call", f.cpu_per_call_us / b.cpu_per_call_us, "x")
    common.paired_report(report, "Allocate", name, reference, f, b)


def idle(report: Report, daemons: Dict[str, Tuple[LeanKubelet, Serve]], bares: Dict[str, Bare]) -> None:
    """IDLE_WINDOWS windows for every process at once: nobody calls; the kubelets hold their streams.

    The first window opens IDLE_SETTLE after the last call: grpc's event engine retires the worker
    threads it started for the calls over several seconds, and until then it wakes for itself
    (measured: 163 wake-ups/s in the first 5 s after 2,000 calls over 40 sockets, 7-9/s from then on;
    bare servers alike).  What is measured is what a node pays while nobody calls.  Wake-ups are the
    median of the windows (grpc's event-engine workers alone vary by a few a second from one window to
    the next), and are also given by thread: the daemon's own (its event loop, "python") apart from
    grpc's."""
    time.sleep(IDLE_SETTLE)  # a settling period before the windows, not a synchronisation
    pids = {**{name: daemon.pid for name, (_, daemon) in daemons.items()}, **{kind: b.pid for kind, b in bares.items()}}
    messages = {name: sum(kubelet.messages.values()) for name, (kubelet, _) in daemons.items()}
    cpu = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
    windows: Dict[str, List[Dict[str, float]]] = {name: [] for name in pids}
    before = {name: common.switches_by_thread(pid) for name, pid in pids.items()}
    for _ in range(IDLE_WINDOWS):
        time.sleep(IDLE_WINDOW)  # the idle window being measured, not a synchronisation
        after = {name: common.switches_by_thread(pid) for name, pid in pids.items()}
        for name in pids:
            windows[name].append({thread: (n - before[name].get(thread, 0)) / IDLE_WINDOW
                                  for thread, n in after[name].items()})
        before = after
    span = IDLE_WINDOWS * IDLE_WINDOW
    for name, (kubelet, _) in daemons.items():
        report(f"idle {span:g} s: ListAndWatch messages, {name}",
               sum(kubelet.messages.values()) - messages[name], "messages")
    rates = {name: statistics.median(sum(w.values()) for w in got) for name, got in windows.items()}
    for name, pid in pids.items():
        report(f"idle: wake-ups (all {common.threads(pid)} threads' context switches), {name}, "
               f"median of {IDLE_WINDOWS} windows of {IDLE_WINDOW:g} s", rates[name], "per s")
    for name in (*daemons, "bare grpc.aio", BARE_MANY, HELD_ONE, HELD_MANY):
        if name in windows:
            threads = sorted({t for w in windows[name] for t in w})
            split = ", ".join(f"{t} {statistics.median(w.get(t, 0.0) for w in windows[name]):.2f}" for t in threads)
            note(f"idle wake-ups per s by thread (medians), {name}: {split}")
    for name, references in (("daemon, 1 resource", ("bare grpc.aio", HELD_ONE)),
                             (f"daemon, {RESOURCES} resources", (BARE_MANY, HELD_MANY))):
        for reference in references:
            if name in rates and rates.get(reference):
                report(f"idle: wake-ups, {name} / {reference}", rates[name] / rates[reference], "x")
    for name, pid in pids.items():
        report(f"idle: CPU, {name}", (common.cpu_seconds(pid) - cpu[name]) / span * 100, "%")


def streams(report: Report, tmp: str, k40: LeanKubelet, many: Serve, bares: Dict[str, Bare],
            targets: List[Target], before: Dict[str, Figures], references: Set[str]) -> subprocess.Popen:
    paths = [k40.client(n).path for n in MANY]
    rogue = subprocess.Popen([sys.executable, "-c", ROGUE, str(ROGUE_STREAMS)] + paths, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert rogue.stdout is not None
    line = rogue.stdout.readline().split()
    if not line or line[0] != "ready":
        raise SystemExit("benchmark: the rogue client could not open its streams")
    held, on_one, refused = int(line[1]), int(line[2]), line[3]
    note(f"a rogue local client holds {held} idle ListAndWatch streams over the {RESOURCES} sockets "
         f"(plus the kubelet's one each); on one socket it got {on_one} of its own before the daemon "
         f"refused ({refused})")
    report(f"ListAndWatch streams per socket the daemon accepted (kubelet's + rogue's), then {refused}",
           on_one + 1, "streams")
    rss = rss_mib(many.pid)
    got = common.interleaved(targets, ROUNDS, PER_ROUND)
    common.report_calls(report, f"Allocate, {held} rogue streams held", got, list(BARE_KINDS), references)
    name = f"daemon, {RESOURCES} resources"
    report(f"Allocate p99, {name}: with {held} rogue streams / without (earlier rounds)",
           common.percentile(got[name].latencies, 99) / common.percentile(before[name].latencies, 99), "x")
    report(f"RSS, {name}, {held} rogue streams held", rss, "MiB")
    return rogue
