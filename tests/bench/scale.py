"""Scale with real loop devices (issues 12 and 13), a real systemd-udevd handling their events:

- 1,000 devices: a burst of 1,000 adds -> the complete list at the stand-in (pushes counted); a full
  rescan (``discovery.scan_resource`` in this process, its thread's CPU time, repeated); ``serve`` start ->
  the complete list; RSS next to the bare grpcio servers'; single hotplug add/remove -> pushed;
- issue 12, where the config keys exist (``replicas``, ``cdi``): Allocate p50/p99 and server CPU with
  replicas = 100 over 100 devices next to the bare servers; hotplug latency with CDI on and off;
- 10,000 devices (the 9,000 more added while no daemon runs): full rescan; start -> complete list; RSS;
  one hotplug add -> pushed, p50/p99 over HOTPLUG adds, from the LOOP_CTL_ADD ioctl and from udevd's event;
  the daemon's CPU for one add (everything it does for the event, the push of the full list included:
  schedstat of its threads from just before the ioctl until they all sleep again); hotplug remove ->
  pushed from the kernel's remove uevent (LOOP_CTL_REMOVE itself blocks ~40 ms).

Event times come from a watcher process of its own (common.Uevents): the kernel's uevent as it was sent,
udevd's as the daemon gets it; a burst's last add is timed by udevd's own USEC_INITIALIZED for the
device (when udevd began its event: a time no reader's lag can move).  That figure can be negative: a
rescan for an earlier event lists what the kernel has put in sysfs, udevd's queue notwithstanding, so
the daemon may list the last device before udevd has begun its event.  "Pushed" is when the stand-in
read the message's last byte; its own parse of 10,000 devices into Python objects follows, and is
reported apart.  Prints figures; asserts nothing.
Needs root and udev; run under the shared lock (`make bench`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List, Optional

import pyudev

from tests.bench import common
from tests.bench.common import BARE_KINDS, Bare, Report, Serve, Target, channel, note, raw
from tests.hotplug import loopscale, realudev
from tests.hotplug.loopscale import LeanKubelet, LoopScale
from udev_device_plugin import api, config, discovery

SMALL, LARGE = 1000, 10000
RES = loopscale.RESOURCE
BULK = list(range(loopscale.FIRST, loopscale.FIRST + LARGE))
HOTPLUG_FIRST = 150000  # single adds and removes: inside the resource's glob, outside BULK
SINGLE_SMALL, SINGLE_LARGE = 20, 50
RESCANS_SMALL, RESCANS_LARGE = 10, 5
STARTS_SMALL, STARTS_LARGE = 5, 3
REPLICAS, SHARED_DEVICES = 100, 100
CDI_EVENTS = 20
WAIT = 300.0  # bound on any one wait: the daemon is slow, not stuck, until then


def ms(seconds: float) -> float:
    return seconds * 1000


def p50_p99(report: Report, what: str, values: List[float], unit: str = "ms") -> None:
    report(f"{what} p50", statistics.median(values), unit)
    report(f"{what} p99", common.percentile(values, 99), unit)


def rescan(report: Report, count: int, reps: int) -> None:
    """``discovery.scan_resource`` of the loop resource here, timed by this thread's CPU clock (the
    stand-in's threads run beside it); every scan must find ``count`` devices.  Two kinds, interleaved:
    a rescan as the daemon makes it (given the devices it has, which it keeps where they are equal) and
    a first scan (nothing to compare with: every device new, sorted)."""
    cfg = config.parse([("bench", loopscale.config())])
    res = cfg.resources[0]
    context = pyudev.Context()
    cpu: Dict[str, List[float]] = {"rescan": [], "first": []}
    wall: Dict[str, List[float]] = {"rescan": [], "first": []}
    have, _ = discovery.scan_resource(context, res)
    for _ in range(reps):
        for kind in cpu:
            w0, c0 = time.perf_counter(), time.thread_time()
            found, _ = discovery.scan_resource(context, res, previous=have if kind == "rescan" else None)
            cpu[kind].append(time.thread_time() - c0)
            wall[kind].append(time.perf_counter() - w0)
            if len(found) != count:
                raise SystemExit(f"benchmark: a full rescan found {len(found)} devices, not {count}")
            have = found
    report(f"{count} devices: full rescan (scan_resource, as the daemon's), CPU median of {reps}",
           ms(statistics.median(cpu["rescan"])), "ms")
    report(f"{count} devices: full rescan, CPU best of {reps}", ms(min(cpu["rescan"])), "ms")
    report(f"{count} devices: full rescan, wall median of {reps}", ms(statistics.median(wall["rescan"])), "ms")
    report(f"{count} devices: first scan (no devices to keep), CPU median of {reps}",
           ms(statistics.median(cpu["first"])), "ms")


def serve(tmp: str, label: str, kubelet: LeanKubelet, text: str = "") -> Serve:
    return Serve(os.path.join(tmp, f"etc-{label}"), text or loopscale.config(), kubelet.directory)


def listed(kubelet: LeanKubelet, daemon: Serve, after: int, count: int, what: str) -> loopscale.Push:
    try:
        return kubelet.wait_push(RES, after, lambda p, _: p.count == count, WAIT, what)
    except TimeoutError as exc:
        raise SystemExit(f"benchmark: {exc}; daemon alive: {daemon.alive()}") from None


def burst(report: Report, kubelet: LeanKubelet, daemon: Serve, loops: LoopScale, watch: common.Uevents,
          numbers: List[int]) -> None:
    seq = kubelet.messages.get(RES, 0)
    first = loops.add_many(numbers)
    last = time.monotonic()
    complete = listed(kubelet, daemon, seq, len(numbers), f"all {len(numbers)} devices")
    last_began = watch.last_began("add", [loopscale.name(n) for n in numbers], first)
    n = len(numbers)
    report(f"{n}-device burst: first LOOP_CTL_ADD -> complete list", ms(complete.monotonic - first), "ms")
    report(f"{n}-device burst: last LOOP_CTL_ADD returned -> complete list", ms(complete.monotonic - last), "ms")
    report(f"{n}-device burst: udevd began the last add event (its USEC_INITIALIZED) -> complete list",
           ms(complete.monotonic - last_began), "ms")
    report(f"{n}-device burst: ListAndWatch pushes until complete", complete.seq - seq, "pushes")


def starts(report: Report, tmp: str, kubelet: LeanKubelet, count: int, times: int) -> Serve:
    """``serve`` start -> the complete list, ``times`` times; the last daemon is left running."""
    took = []
    daemon: Optional[Serve] = None
    for i in range(times):
        if daemon is not None:
            daemon.stop()
        seq = kubelet.messages.get(RES, 0)
        daemon = serve(tmp, f"start{count}-{i}", kubelet)
        got = listed(kubelet, daemon, seq, count, f"the complete list of {count}")
        took.append(got.monotonic - daemon.t0)
    assert daemon is not None
    report(f"{count} devices: serve start -> complete list at the stand-in, p50 of {times}",
           ms(statistics.median(took)), "ms")
    report(f"{count} devices: serve start -> complete list, max of {times}", ms(max(took)), "ms")
    return daemon


# The daemon gives freed heap back a second after a big change (daemon.TRIM_DELAY): its RSS is read
# when it is first asleep after the complete list, and again this much later, settled.
SETTLE = 3.0


def rss(report: Report, count: int, daemon: Serve, bares: Dict[str, Bare]) -> None:
    common.wait_asleep(daemon.pid)
    first = common.rss_mib(daemon.pid)
    report(f"RSS, daemon with {count} devices (first asleep after the list)", first, "MiB")
    time.sleep(SETTLE)
    common.wait_asleep(daemon.pid)
    mine = common.rss_mib(daemon.pid)
    report(f"RSS, daemon with {count} devices (idle, {SETTLE:g} s later)", mine, "MiB")
    for kind, server in bares.items():
        report(f"RSS, daemon with {count} devices / {kind}", mine / common.rss_mib(server.pid), "x")


def single_events(report: Report, label: str, kubelet: LeanKubelet, daemon: Serve, loops: LoopScale,
                  watch: common.Uevents, events: int) -> None:
    add_ioctl, add_udev, add_cpu = [], [], []
    rm_kernel, rm_udev, rm_cpu = [], [], []
    parse: List[float] = []
    pid = daemon.pid
    watch.forget()
    for i in range(events):
        number = HOTPLUG_FIRST + i
        name = loopscale.name(number)
        common.wait_asleep(pid)
        seq, c0 = kubelet.messages[RES], common.cpu_ns(pid)
        t = loops.add(number)
        got = kubelet.wait_push(RES, seq, lambda p, _, n=name: n in p.added, WAIT, f"{name} added")
        t_udev = watch.first("udev", "add", name, t)
        common.wait_asleep(pid)
        add_cpu.append((common.cpu_ns(pid) - c0) / 1e6)
        parse.append(ms(got.parsed - got.monotonic))
        add_ioctl.append(ms(got.monotonic - t))
        add_udev.append(ms(got.monotonic - t_udev))

        seq, c0 = kubelet.messages[RES], common.cpu_ns(pid)
        t = loops.remove(number)
        got = kubelet.wait_push(RES, seq, lambda p, _, n=name: n in p.removed, WAIT, f"{name} removed")
        t_kernel = watch.first("kernel", "remove", name, t)  # sent during the ioctl
        t_udev = watch.first("udev", "remove", name, t)
        common.wait_asleep(pid)
        rm_cpu.append((common.cpu_ns(pid) - c0) / 1e6)
        parse.append(ms(got.parsed - got.monotonic))
        rm_kernel.append(ms(got.monotonic - t_kernel))
        rm_udev.append(ms(got.monotonic - t_udev))
    p50_p99(report, f"{label}: hotplug add, LOOP_CTL_ADD -> pushed ({events} adds, udevd included)", add_ioctl)
    p50_p99(report, f"{label}: hotplug add, udev event -> pushed ({events} adds)", add_udev)
    p50_p99(report, f"{label}: hotplug remove, kernel remove uevent -> pushed ({events} removes)", rm_kernel)
    p50_p99(report, f"{label}: hotplug remove, udev remove event -> pushed ({events} removes)", rm_udev)
    p50_p99(report, f"{label}: daemon CPU for one add (event, rescan, push of the full list)", add_cpu)
    p50_p99(report, f"{label}: daemon CPU for one remove (event, rescan, push of the full list)", rm_cpu)
    p50_p99(report, f"{label}: the stand-in's own parse of a pushed list (after 'pushed'; not the daemon's)", parse)


# --- issue 12, where its keys exist ---------------------------------------------------------------------

def has_keys(*keys: str) -> Optional[str]:
    """Why the config lacks one of ``keys`` (resource or [plugin] keys), or None."""
    missing = [k for k in keys if k not in config.RESOURCE_KEYS and k not in config.PLUGIN_KEYS]
    return f"no config key {', '.join(missing)} in this tree" if missing else None


def replicas(report: Report, tmp: str) -> None:
    why = has_keys("replicas")
    if why:
        note(f"skipped: Allocate with replicas = {REPLICAS} over {SHARED_DEVICES} devices (issue 12): {why}")
        return
    res = "example.com/shared"
    glob = "loop1000[0-9][0-9]"  # loop100000-loop100099
    text = (f"[plugin]\nlog_level = warning\n\n[resource {res}]\nsubsystem = block\nkernel = {glob}\n"
            f"devtype = disk\nreplicas = {REPLICAS}\n")
    kubelet = LeanKubelet(os.path.join(tmp, "dp-shared")).start()
    daemon = Serve(os.path.join(tmp, "etc-shared"), text, kubelet.directory)
    bares: Dict[str, Bare] = {}
    channels = []
    try:
        want = REPLICAS * SHARED_DEVICES
        if not kubelet.wait_for(lambda: len(kubelet.lists.get(res, {})) == want, WAIT):
            raise SystemExit(f"benchmark: the shared resource did not list {want} IDs:\n{daemon.log()}")
        ids = sorted(kubelet.lists[res])
        requests = [api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=[i])]
                                        ).SerializeToString() for i in ids]
        ch = channel(kubelet.client(res).path)
        channels.append(ch)
        call = raw(ch)
        reply = call(requests[0], timeout=30)
        for kind in BARE_KINDS:
            bares[kind] = Bare(kind, os.path.join(tmp, f"bare-shared{len(bares)}.sock"), reply)
        targets = []
        for kind, server in bares.items():
            bch = channel(server.sock)
            channels.append(bch)
            targets.append(Target(kind, server.pid, [lambda c=raw(bch), r=requests[0]: c(r, timeout=30)]))
        spread = [lambda r=r: call(r, timeout=30) for r in requests]
        targets.append(Target(f"daemon, replicas = {REPLICAS}, calls over all {want} IDs", daemon.pid, spread))
        targets.append(Target(f"daemon, replicas = {REPLICAS}, one ID again and again", daemon.pid,
                              [lambda: call(requests[0], timeout=30)]))
        got = common.interleaved(targets, 5, 1000)
        common.report_calls(report, f"Allocate, replicas = {REPLICAS} over {SHARED_DEVICES} devices", got,
                            list(BARE_KINDS))
        report(f"RSS, daemon with {want} replica IDs", common.rss_mib(daemon.pid), "MiB")
    finally:
        for c in channels:
            c.close()
        for server in bares.values():
            server.stop()
        daemon.stop()
        kubelet.stop()


def cdi(report: Report, tmp: str, loops: LoopScale, watch: common.Uevents) -> None:
    why = has_keys("cdi", "cdi_spec_dir")
    if why:
        note(f"skipped: hotplug latency with CDI on (issue 12): {why}")
        return
    spec_dir = os.path.join(tmp, "cdi")
    os.makedirs(spec_dir)
    glob = "loop15[0-9][0-9][0-9][0-9]"  # the single-event numbers
    where = "plugin" if "cdi_spec_dir" in config.PLUGIN_KEYS else "resource"
    names = {"CDI on": "example.com/cdi", "CDI off": "example.com/plain"}
    kubelet = LeanKubelet(os.path.join(tmp, "dp-cdi")).start()
    daemons: Dict[str, Serve] = {}
    try:
        for label, res in names.items():
            plugin = f"cdi_spec_dir = {spec_dir}\n" if where == "plugin" and label == "CDI on" else ""
            extra = "cdi = yes\n" if label == "CDI on" else ""
            if where == "resource" and label == "CDI on":
                extra += f"cdi_spec_dir = {spec_dir}\n"
            text = (f"[plugin]\nlog_level = warning\n{plugin}\n[resource {res}]\nsubsystem = block\n"
                    f"kernel = {glob}\ndevtype = disk\n{extra}")
            daemons[label] = Serve(os.path.join(tmp, f"etc-{label.replace(' ', '-')}"), text, kubelet.directory)
        for label, res in names.items():
            if not kubelet.wait_for(lambda r=res: kubelet.messages.get(r, 0) >= 1, WAIT):
                raise SystemExit(f"benchmark: the {label} daemon did not list:\n{daemons[label].log()}")
        added: Dict[str, List[float]] = {k: [] for k in names}
        removed: Dict[str, List[float]] = {k: [] for k in names}
        watch.forget()
        for i in range(CDI_EVENTS):
            number = HOTPLUG_FIRST + i
            name = loopscale.name(number)
            seqs = {k: kubelet.messages[r] for k, r in names.items()}
            t = loops.add(number)
            t_udev = watch.first("udev", "add", name, t)
            for label, res in names.items():
                got = kubelet.wait_push(res, seqs[label], lambda p, _, n=name: n in p.added, WAIT, f"{name} added")
                added[label].append(ms(got.monotonic - t_udev))
            seqs = {k: kubelet.messages[r] for k, r in names.items()}
            t = loops.remove(number)
            t_udev = watch.first("udev", "remove", name, t)
            for label, res in names.items():
                got = kubelet.wait_push(res, seqs[label], lambda p, _, n=name: n in p.removed, WAIT, f"{name} removed")
                removed[label].append(ms(got.monotonic - t_udev))
        note(f"two daemons at once on the same events, one with cdi = yes (spec files in {where} "
             "cdi_spec_dir), one without")
        for label in names:
            p50_p99(report, f"{label}: hotplug add, udev event -> pushed ({CDI_EVENTS} adds)", added[label])
            p50_p99(report, f"{label}: hotplug remove, udev event -> pushed ({CDI_EVENTS} removes)", removed[label])
        specs = sorted(os.listdir(spec_dir))
        note(f"CDI spec files written: {', '.join(specs) or 'none'}")
    finally:
        for d in daemons.values():
            d.stop()
        kubelet.stop()


# --- the run --------------------------------------------------------------------------------------

def run(report: Report) -> None:
    problem = realudev.Udevd.problem()
    if problem:
        raise SystemExit(f"benchmark: {problem}")
    realudev.clean_leftovers()
    left = loopscale.clean_leftovers()
    if left:
        note(f"removed {left} loop devices an earlier run left in the scale range")
    with tempfile.TemporaryDirectory(prefix="udp-bench-scale-") as tmp:
        udevd = realudev.Udevd(os.path.join(tmp, "udevd.log")).start()
        watch: Optional[common.Uevents] = None
        kubelet: Optional[LeanKubelet] = None
        daemon: Optional[Serve] = None
        bares: Dict[str, Bare] = {}
        loops = LoopScale()
        try:
            watch = common.Uevents("block")
            kubelet = LeanKubelet(os.path.join(tmp, "dp")).start()
            for kind in BARE_KINDS:  # references for RSS, after as many calls as the calls part makes
                bares[kind] = Bare(kind, os.path.join(tmp, f"bare{len(bares)}.sock"), b"\x0a\x00")
                ch = channel(bares[kind].sock)
                call = raw(ch)
                for _ in range(6000):
                    call(b"", timeout=30)
                ch.close()
            for kind, server in bares.items():
                report(f"RSS, {kind} (idle, after 6,000 calls)", common.rss_mib(server.pid), "MiB")

            note(f"{SMALL} loop devices (loop{BULK[0]}...) added while the daemon runs")
            daemon = serve(tmp, "burst", kubelet)
            listed(kubelet, daemon, 0, 0, "the first (empty) list")
            burst(report, kubelet, daemon, loops, watch, BULK[:SMALL])
            rss(report, SMALL, daemon, bares)
            single_events(report, f"{SMALL} devices", kubelet, daemon, loops, watch, SINGLE_SMALL)
            daemon.stop()
            daemon = None
            rescan(report, SMALL, RESCANS_SMALL)
            starts(report, tmp, kubelet, SMALL, STARTS_SMALL).stop()

            replicas(report, tmp)
            cdi(report, tmp, loops, watch)

            note(f"{LARGE - SMALL} more loop devices added while no daemon runs")
            loops.add_many(BULK[SMALL:])
            realudev.settle(WAIT)
            watch.forget()
            rescan(report, LARGE, RESCANS_LARGE)
            daemon = starts(report, tmp, kubelet, LARGE, STARTS_LARGE)
            rss(report, LARGE, daemon, bares)
            single_events(report, f"{LARGE} devices", kubelet, daemon, loops, watch, SINGLE_LARGE)
        finally:
            if daemon is not None:
                daemon.stop()
            for server in bares.values():
                server.stop()
            if kubelet is not None:
                kubelet.stop()
            try:
                loops.close()
            finally:
                loopscale.clean_leftovers()
                if watch is not None:
                    watch.close()
                udevd.stop()
