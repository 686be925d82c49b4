"""The composition root and the main loop: builds the udev context and monitor, the kubelet
connector, the command runner, the health scheduler and the notifier, and wires them up.

One asyncio event loop on the main thread runs everything: udev and inotify descriptors are
loop readers, timers are loop timers, the gRPC servers are grpc.aio servers on the same loop,
health and prestart commands are watched through pidfds.  There is no thread of ours, so no
pool to exhaust and nothing to hand results across.  The loop sleeps until something happens.

The main loop owns signals, readiness (READY=1, STATUS=) and the watchdog: WATCHDOG=1 goes out
only after a call through one of our own sockets has been answered, so a wedged RPC side stops
the pings as surely as a wedged loop does.  A fatal error anywhere ends the process non-zero,
so systemd restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc

from . import commands, config, events
from .cdidir import CdiSpecs
from .discovery import touched
from .exporter import Metrics
from .hotplug import Coalescer, DevnodeWatch, HotplugMonitor, Overflow
from .inventory import Inventory
from .kubelet import KubeletConnector
from .model import ResourceDiff
from .notify import Notifier, watchdog_interval
from .scheduler import HealthScheduler
from .servicer import PrestartLimit, ResourceState

log = logging.getLogger(__name__)

# The gRPC settings the start line names: entry.grpc_settings sets them (entry.BACKUP_POLL is the
# second), or the admin did.  Named here: importing entry would set GRPC_VERBOSITY in our environment.
GRPC_LOGGED = ("GRPC_EXPERIMENTS", "GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG; the unit's RestartPreventExitStatus=
# A udev event after a quiet spell is handled at once.  Events that follow others closely
# (a burst: 100 devices plugged at once) wait until HOTPLUG_HOLDOFF after the last handling,
# so the kubelet gets a few full lists, not one growing list per device.
HOTPLUG_QUIET = 0.005
HOTPLUG_HOLDOFF = 0.02

# After a change of this many devices or more (the first scan of a big node, a burst), and TRIM_DELAY
# later (the lists sent), glibc is asked to give back the heap pages the scan and gRPC's buffers freed:
# at 10,000 devices ~1 MiB of RSS, for ~0.5 ms.  Not done elsewhere: a small change frees little.
TRIM_AFTER = 256
TRIM_DELAY = 1.0


def trim_heap() -> bool:
    """malloc_trim(0): False where the C library has none (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


class Daemon:
    def __init__(self, config_path: str, kubelet_dir: Optional[str] = None,
                 notifier: Optional[Notifier] = None,
                 context_factory: Optional[Callable[[], Any]] = None,
                 monitor_factory: Optional[Callable[[Any], HotplugMonitor]] = None,
                 sink: Optional[events.Sink] = None,
                 clock: Callable[[], float] = time.monotonic,
                 reap_strays: bool = False) -> None:
        self.config_path = config_path
        self.kubelet_dir_override = kubelet_dir
        self.notifier = notifier or Notifier()
        self.context_factory = context_factory
        self.monitor_factory = monitor_factory or HotplugMonitor
        self._sink_override = sink
        self.clock = clock
        self.reap_strays = reap_strays
        self.cfg = self.load_config()  # raises ConfigError before anything is created
        self.sink: events.Sink = sink or events.make_sink(self.cfg.plugin.events)
        self.inventory = Inventory(self.sink)
        self.coalescer = Coalescer(HOTPLUG_QUIET, HOTPLUG_HOLDOFF)
        self.scheduler = HealthScheduler(clock, self.cfg.plugin.health_workers)
        self._lagging: Dict[str, float] = {}
        self._trim: Optional[asyncio.TimerHandle] = None
        self._exit_status = EXIT_OK
        self._stopping: Optional[asyncio.Event] = None
        self._ready = False
        self._started = False
        self._started_at = 0.0
        self._status = ""
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.runner: Optional[commands.Runner] = None
        self.connector: Optional[KubeletConnector] = None
        # A pyudev Context only where one is asked for: discovery reads sysfs itself and makes one
        # (loading pyudev) only for what needs libudev's device list (child_devnodes).
        self.context: Any = None
        self.monitor: Optional[HotplugMonitor] = None
        self.devnodes: Optional[DevnodeWatch] = None
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        self._tasks: set = set()
        self.prestarts: Optional[PrestartLimit] = None
        self.cdi: Optional[CdiSpecs] = None
        self._reloading = False
        self._reload_again = False
        self.metrics = Metrics(self, on_change=self._update_status)

    # --- config ---------------------------------------------------------------

    def load_config(self) -> config.Config:
        cfg = config.load(self.config_path)
        if self.kubelet_dir_override:
            cfg = cfg._replace(plugin=cfg.plugin._replace(kubelet_dir=self.kubelet_dir_override))
        return cfg

    @property
    def states(self) -> Dict[str, ResourceState]:
        return self.inventory.states

    # --- timers ---------------------------------------------------------------

    def _at(self, name: str, when: Optional[float], fn: Callable[[], None]) -> None:
        """Run ``fn`` at ``when`` (clock time); one timer per name, replaced on each call."""
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if when is None or self.loop is None:
            return

        def fire() -> None:
            self._timers.pop(name, None)
            fn()

        self._timers[name] = self.loop.call_later(max(0.0, when - self.clock()), fire)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._fatal_exception(exc)

    # --- start-up -----------------------------------------------------------------

    def _new_connector(self) -> KubeletConnector:
        assert self.runner is not None and self.prestarts is not None
        plugin = self.cfg.plugin
        connector = KubeletConnector(plugin.kubelet_dir, self.runner, self.prestarts,
                                     on_change=self._on_registration_change, fatal=self.fatal,
                                     register_timeout=plugin.register_timeout,
                                     backoff_max=plugin.register_backoff_max, keepalive=plugin.kubelet_keepalive,
                                     clock=self.clock,
                                     paths=_registration_paths(plugin.registration),
                                     registry_dir=plugin.plugins_registry_dir)
        connector.start()
        return connector

    def _on_registration_change(self, name: str) -> None:
        self._update_status()

    def start(self) -> None:
        self.loop = asyncio.get_event_loop()
        self._started_at = self.clock()
        self.runner = commands.Runner(self.loop, reap_strays=self.reap_strays)
        self.prestarts = PrestartLimit()
        self.context = self.context_factory() if self.context_factory is not None else None
        # The monitor opens before the first enumeration, so nothing in between is lost.
        self.monitor = self.monitor_factory(self.context)
        self.devnodes = DevnodeWatch()
        self.cdi = CdiSpecs(self.cfg.plugin.cdi_spec_dir, self.loop.call_later)
        self.cdi.start(self.cfg.resources)
        self.connector = self._new_connector()
        for fd in self.monitor.filenos():
            self.loop.add_reader(fd, self._handle_udev)
        self.loop.add_reader(self.devnodes.fileno(), self._handle_devnodes)
        for res in self.cfg.resources:
            self._start_resource(res)
        self._started = True
        self.metrics.start()
        self._update_status()

    def _start_resource(self, res: config.ResourceConfig) -> None:
        state = ResourceState(res)
        self.inventory.add(state)
        self._after_scan(self.inventory.scan(self.context, [res.name]))  # the first answer is the full list
        self._watch_devnodes()
        self._sync_cdi(res.name)  # the spec is in place before the kubelet hears of a device
        assert self.connector is not None
        self.connector.add(state)

    async def _stop_resource(self, name: str) -> None:
        assert self.connector is not None
        await self.connector.remove(name)
        if self.cdi is not None:
            self.cdi.remove(name)
        state = self.states.get(name)
        if self.devnodes is not None and state is not None:
            self.devnodes.adjust(removed=[n for d in state.current()[1].values() for n in d.devnodes])
        self.inventory.remove(name)
        self.scheduler.remove_group(name)
        self._lagging.pop(name, None)
        self._watch_devnodes()
        self._schedule_health()

    # --- discovery -------------------------------------------------------------------------

    def _after_scan(self, changes: Dict[str, ResourceDiff]) -> None:
        """Keep the health checks and the device-node watch in step with what the scan found."""
        for name, change in changes.items():
            self._sync_cdi(name)
            self._health_follow(name, change)
            if self.devnodes is not None:
                self.devnodes.adjust(added=[n for d in change.added for n in d.devnodes] +
                                     [n for _, d in change.changed for n in d.devnodes],
                                     removed=[n for d in change.removed for n in d.devnodes] +
                                     [n for d, _ in change.changed for n in d.devnodes])
        self._update_status()
        self._trim_later(changes)

    def _trim_later(self, changes: Dict[str, ResourceDiff]) -> None:
        """Once after a big change (TRIM_AFTER): the heap trimmed when the lists have gone out."""
        if self.loop is None or self._trim is not None:
            return
        if sum(map(len, changes.values())) >= TRIM_AFTER:
            self._trim = self.loop.call_later(TRIM_DELAY, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        trim_heap()

    def _sync_cdi(self, name: str) -> None:
        """Rewrite the resource's CDI spec if what it advertises changed it (in this same callback, so
        before a ListAndWatch message or an Allocate answer can name a new ID)."""
        state = self.states.get(name)
        if state is not None and self.cdi is not None:
            self.cdi.sync(state)

    def _health_follow(self, name: str, change: ResourceDiff) -> None:
        state = self.states.get(name)
        if state is None:
            return
        res = state.config
        for dev in change.removed:
            self.scheduler.remove((name, dev.id))
        if res.health_command:
            for dev in change.added:
                self.scheduler.add((name, dev.id), name, res.health_interval)
        self._schedule_health()

    def _watch_devnodes(self) -> None:
        """The resources changed: watch their extra nodes (their devices' nodes follow the diffs)."""
        if self.devnodes is not None:
            self.devnodes.set_extra(n for s in self.states.values() for n in s.config.extra_devnodes)

    def _handle_devnodes(self) -> None:
        """A device node appeared or vanished outside udev's events: look at its device again."""
        assert self.devnodes is not None
        paths = self.devnodes.changed()
        if not paths:
            return
        # devtmpfs deletes an unplugged device's node just before the kernel sends its remove uevent,
        # which is then waiting as often as not: applied first, it reaches the kubelet without this
        # handler's work ahead of it, and the node then belongs to no device.
        self._handle_udev()
        log.debug("device nodes changed: %s", ", ".join(sorted(paths)))
        changes: Dict[str, Dict[str, str]] = {}
        full = set()
        for name in sorted(self.states):
            extra = set(self.states[name].config.extra_devnodes)
            if "" in paths or extra & paths:
                full.add(name)  # events were lost, or a node every device shares
                continue
            for sys_path in sorted(self.inventory.at_nodes(name, paths)):
                changes.setdefault(name, {})[sys_path] = "change"
        self.metrics.hotplug_arrived(self.clock(), set(changes) | full)
        # Not a udev arrival: held for the remove (or add) event that usually follows (see Coalescer).
        self._apply_when(self.coalescer.add(self.clock(), changes, full, arrival=False))

    def _handle_udev(self) -> None:
        assert self.monitor is not None
        arrived = self.clock()
        try:
            batch = self.monitor.drain()
        except Overflow as exc:
            log.warning("%s; rescanning every resource", exc)
            self._after_scan(self.inventory.scan(self.context, list(self.states)))
            return
        if not batch:
            return
        paths_of = {n: self.inventory.paths(n) for n in self.states}
        resources = [s.config for s in self.states.values()]
        changes: Dict[str, Dict[str, str]] = {}
        full = set()
        for ev in batch:
            log.debug("udev %s %s (%s)", ev.action, ev.sys_path, ev.subsystem)
            for name, paths in touched(resources, paths_of, ev.subsystem, ev.sys_path).items():
                if ev.action == "move":
                    full.add(name)  # the old path is gone; only a scan knows what it was
                seen = changes.setdefault(name, {})
                for path in paths:
                    # The event's own action for its device; an ancestor is looked at again ("change").
                    seen[path] = ev.action if path == ev.sys_path else "change"
        if not changes and not full:
            return  # nothing of ours (a bdi device beside a loop device, say)
        self.metrics.hotplug_arrived(arrived, set(changes) | full)
        self._apply_when(self.coalescer.add(self.clock(), changes, full))

    def _apply_when(self, when: Optional[float]) -> None:
        if when is None:
            return
        if when <= self.clock():
            self._at("hotplug", None, self._apply_udev)  # a node change's hold, cut short
            self._apply_udev()
        else:
            self._at("hotplug", when, self._apply_udev)

    def _apply_udev(self) -> None:
        """Rescan or refresh what the udev events gathered so far touched."""
        changes, full = self.coalescer.take(self.clock())
        for name, seen in changes.items():
            # A burst that touches much of a resource costs less as one scan.
            if len(seen) > max(8, len(self.inventory.raw.get(name, {})) // 2):
                full.add(name)
        full &= set(self.states)
        result: Dict[str, ResourceDiff] = {}
        if full:
            result.update(self.inventory.scan(self.context, sorted(full)))
        for name in sorted(set(changes) - full):
            if name in self.states:
                change = self.inventory.refresh(self.context, name, changes[name])
                if change:
                    result[name] = change
        self.metrics.hotplug_applied(result)
        self._after_scan(result)

    # --- health commands ---------------------------------------------------------------------

    def _schedule_health(self) -> None:
        """Start what is due; sleep until the next due time (nothing while every worker is busy)."""
        for started in self.scheduler.take_due():
            key: Tuple[str, str] = started.key  # type: ignore[assignment]
            name, dev_id = key
            state = self.states.get(name)
            dev = self.inventory.raw.get(name, {}).get(dev_id)
            if state is None or dev is None:
                self.scheduler.remove(started.key)
                continue
            self._spawn(self._health_check(started.key, state.config, dev))
        self._check_lag()
        self._at("health", self.scheduler.next_deadline(), self._schedule_health)

    async def _health_check(self, key: Any, res: config.ResourceConfig, dev: Any) -> None:
        assert self.runner is not None
        argv, env = commands.health_command_args(res, dev)
        result = await self.runner.run(argv, env, res.health_timeout)
        self.metrics.health_result(res.name, result)
        name, dev_id = key
        if key not in self.scheduler or self.states.get(name) is None or self.states[name].config != res:
            self.scheduler.finished(key)
            self._schedule_health()
            return  # the device or resource went away (or was reconfigured) meanwhile
        if result.abandoned:
            self.scheduler.finished(key, hold=True)
            reason = f"health_command: {result.detail}"
            change = self.inventory.health_result(name, dev_id, False, reason, res.health_threshold, stuck=True)
            self._spawn(self._release_when_reaped(key, result.pid))
        else:
            self.scheduler.finished(key)
            ok, reason = result.ok, ("" if result.ok else f"health_command: {result.detail}")
            change = self.inventory.health_result(name, dev_id, ok, reason, res.health_threshold)
        if change:
            self._health_follow(name, change)
        self._update_status()
        self._schedule_health()

    async def _release_when_reaped(self, key: Any, pid: int) -> None:
        """A stuck check's device is checked again once its process has exited at last."""
        assert self.runner is not None
        await self.runner.wait_abandoned(pid)
        self.scheduler.release(key)
        change = self.inventory.release_stuck(*key)
        if change:
            self._health_follow(key[0], change)
        self._update_status()
        self._schedule_health()

    def _check_lag(self) -> None:
        lagging = self.scheduler.lagging()
        for name, worst in lagging.items():
            if name not in self._lagging:
                state = self.states.get(name)
                interval = state.config.health_interval if state else 0
                log.warning("%s: health checks are falling behind their %g s interval (up to %.1f s late); "
                            "[plugin] health_workers = %d may be too few for the checks configured",
                            name, interval, worst, self.scheduler.workers)
        for name in set(self._lagging) - set(lagging):
            log.info("%s: health checks are on time again", name)
        if lagging != self._lagging:
            self._lagging = dict(lagging)
            self._update_status()

    # --- reload ---------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        self._reloading = True
        try:
            while True:
                self._reload_again = False
                await self.reload()
                if not self._reload_again or (self._stopping is not None and self._stopping.is_set()):
                    return
        finally:
            self._reloading = False

    async def reload(self) -> None:
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={int(time.monotonic() * 1e6)}",
                             "STATUS=reloading the configuration")
        try:
            new = self.load_config()
        except config.ConfigError as exc:
            for message in exc.messages:
                log.error("reload refused: %s", message)
            log.error("keeping the running configuration")
            self.notifier.notify("READY=1", f"STATUS=reload refused ({len(exc.messages)} error(s)); "
                                 f"{self._summary()}")
            return
        old = self.cfg
        self.cfg = new
        if new.plugin.events != old.plugin.events and self._sink_override is None:
            self.sink.close()
            self.sink = events.make_sink(new.plugin.events)
            self.inventory.sink = self.sink
        _apply_log_level(new.plugin.log_level)
        self.scheduler.workers = new.plugin.health_workers
        if _connector_settings(new) != _connector_settings(old):
            log.info("kubelet settings changed: serving every resource again")
            for name in list(self.states):
                await self._stop_resource(name)
            assert self.connector is not None
            await self.connector.close()
            self.connector = self._new_connector()
        elif new.plugin.kubelet_keepalive != old.plugin.kubelet_keepalive:
            assert self.connector is not None
            log.info("kubelet_keepalive changed: checking that the kubelet answers every %g s",
                     new.plugin.kubelet_keepalive)
            self.connector.set_keepalive(new.plugin.kubelet_keepalive)
        wanted = {r.name: r for r in new.resources}
        for name in list(self.states):
            if name not in wanted:
                log.info("%s: removed from the configuration; no longer served", name)
                await self._stop_resource(name)
            elif self.states[name].config != wanted[name]:
                self._reconfigure(self.states[name], wanted[name])
        for res in new.resources:
            if res.name not in self.states:
                log.info("%s: added to the configuration", res.name)
                self._start_resource(res)
        if self.cdi is not None and new.plugin.cdi_spec_dir != old.plugin.cdi_spec_dir:
            self.cdi.set_directory(new.plugin.cdi_spec_dir, list(self.states.values()))
        self.metrics.configure(new.plugin)
        log.info("configuration reloaded: %d resource(s)", len(self.states))
        self._update_status()
        self.notifier.notify("READY=1", f"STATUS={self._summary()}")

    def _reconfigure(self, state: ResourceState, res: config.ResourceConfig) -> None:
        """A changed resource keeps its sockets and its registration unless the kubelet must re-read it.

        The kubelet reads the options (pre_start_required) only at registration; everything
        else (selectors, health, templates) reaches it through ListAndWatch and Allocate.
        Needless re-registrations are what the 1.25-1.35 handler turns into a lost stream.
        """
        old = state.config
        name = res.name
        state.reconfigure(res)
        self.scheduler.remove_group(name)
        self._after_scan(self.inventory.scan(self.context, [name]))
        self._watch_devnodes()  # extra_devnodes may have changed
        self._sync_cdi(name)  # the CDI settings may have changed alone
        if res.health_command:
            for dev_id in self.inventory.raw.get(name, {}):
                self.scheduler.add((name, dev_id), name, res.health_interval)
        self._schedule_health()
        if bool(old.prestart_command) != bool(res.prestart_command):
            log.info("%s: configuration changed what the kubelet reads at registration (pre_start_required); "
                     "registering again", name)
            assert self.connector is not None
            self.connector.reregister(name, "the options changed on reload")
        else:
            log.info("%s: configuration changed; devices rescanned, registration kept", name)

    # --- status and readiness ------------------------------------------------------------

    def _ready_deadline(self) -> float:
        # READY=1 waits for the kubelet to hold a stream of every resource; a kubelet that keeps
        # refusing (or a kubelet.sock nobody answers) must not hold the unit's start until
        # systemd gives up (TimeoutStartSec): past ready_timeout, READY=1 says why.
        return self._started_at + self.cfg.plugin.ready_timeout

    def _summary(self) -> str:
        count, sick = self.inventory.counts()
        text = f"{count} device(s)"
        if sick:
            text += f", {sick} unhealthy"
        if self.connector is not None:
            text = f"{self.connector.summary()}; {text}"
        if self._lagging:
            text += "; health checks falling behind: " + ", ".join(sorted(self._lagging))
        stuck = len(self.inventory.stuck)
        if stuck:
            text += f"; {stuck} health check(s) stuck in uninterruptible sleep"
        return text + self.metrics.status()

    def _update_status(self) -> None:
        if self.connector is None or not self._started:
            return
        if not self._ready:
            settled = self.connector.settled()
            if settled or self._ready_deadline() <= self.clock():
                self._ready = True
                self._status = self._summary()
                if not settled:
                    self._status += "; " + "; ".join(self.connector.errors())
                self.notifier.notify("READY=1", f"STATUS={self._status}")
                if settled:
                    log.info("ready: %s", self._status)
                else:
                    log.warning("ready without every registration after %g s: %s",
                                self.cfg.plugin.ready_timeout, self._status)
            else:
                self._at("ready", self._ready_deadline(), self._update_status)
            return
        summary = self._summary()
        if summary != self._status:
            self._status = summary
            self.notifier.notify(f"STATUS={summary}")

    # --- the watchdog -------------------------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every ``interval`` seconds, but only while our own sockets answer."""
        failing = False
        while True:
            started = self.clock()
            problem = await self.connector.probe(timeout=max(0.5, interval / 2)) if self.connector else None
            if problem is None:
                self.notifier.notify("WATCHDOG=1")
                if failing:
                    log.info("our sockets answer again; watchdog pings resumed")
                failing = False
            elif not failing:
                log.error("a call to our own socket failed (%s); not pinging the watchdog", problem)
                failing = True
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    # --- the main loop ----------------------------------------------------------------------

    def fatal(self, message: str) -> None:
        """Only a restart helps: stop, and exit non-zero so systemd restarts us."""
        log.error("%s; exiting so that a restart can serve again", message)
        self._exit_status = EXIT_FAILURE
        if self._stopping is not None:
            self._stopping.set()

    def _fatal_exception(self, exc: BaseException) -> None:
        log.error("internal error: %s: %s; exiting so that systemd restarts the service",
                  type(exc).__name__, exc, exc_info=exc)
        self._exit_status = EXIT_FAILURE
        if self._stopping is not None:
            self._stopping.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, (asyncio.CancelledError, ConnectionResetError, BrokenPipeError)):
            return
        if exc is None:
            log.debug("event loop: %s", context.get("message"))
            return
        if type(exc).__module__.startswith("grpc."):
            # Raised inside grpc.aio's own per-call task (grpcio 1.46 raises ExecuteBatchError there when a
            # stream's status cannot be sent because the client is gone): that call is over, the daemon's
            # state is untouched, and exiting would cost every registration.
            log.warning("gRPC: a call ended with an error inside grpcio: %s: %s", type(exc).__name__, exc)
            return
        self._fatal_exception(exc)

    def request_stop(self) -> None:
        """Stop the daemon; callable from any thread (tests drive an in-process daemon this way)."""
        if self.loop is not None and self._stopping is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)

    def _on_signal(self, signum: int) -> None:
        assert self._stopping is not None
        if self._stopping.is_set():
            return  # stopping: a reload or a check now would only hold up the exit
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s received: stopping", signal.Signals(signum).name)
            assert self._stopping is not None
            self._stopping.set()
        elif signum == signal.SIGHUP:
            log.info("SIGHUP received: reloading %s", self.config_path)
            if self._reloading:
                self._reload_again = True  # one more reload after this one, however many SIGHUPs came
            else:
                self._spawn(self._reload_loop())
        elif signum == signal.SIGUSR1:
            log.info("SIGUSR1 received: checking the registrations")
            if self.connector is not None:
                self.connector.verify()

    async def run_async(self, restore_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT (or a fatal error); return the exit status.

        Signals: the C-level handler writes each signal's number to a pipe the loop reads
        (``signal.set_wakeup_fd``; the Python-level handler does nothing), so a flood of signals
        costs a few bytes, never a nested handler.  Not the loop's own add_signal_handler, whose
        clean-up puts the default actions back when the loop closes: from the moment stopping
        begins, SIGHUP and SIGUSR1 are ignored, so one arriving in the exit window cannot end the
        process.  ``restore_signals``: put the previous handlers back at the end (an in-process
        daemon in a test) instead.
        """
        loop = asyncio.get_event_loop()
        loop.set_exception_handler(self._loop_exception)
        self._stopping = asyncio.Event()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {s: signal.signal(s, _noop_handler) for s in handled}
        loop.add_reader(wake_r, self._read_signals, wake_r)
        watchdog: Optional[asyncio.Future] = None
        try:
            self.start()
            interval = watchdog_interval()
            if interval is not None:
                watchdog = asyncio.ensure_future(self._watchdog(interval))
            await self._stopping.wait()
            return self._exit_status
        finally:
            for s in handled:
                signal.signal(s, signal.SIG_IGN if s in (signal.SIGHUP, signal.SIGUSR1) else _noop_handler)
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            if watchdog is not None:
                watchdog.cancel()
            await self._shutdown()
            loop.remove_reader(wake_r)
            signal.set_wakeup_fd(previous_fd)
            os.close(wake_r)
            os.close(wake_w)
            if restore_signals:
                for s, old in previous.items():
                    signal.signal(s, old)

    def _read_signals(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):  # each signal once per batch: a flood is one event
            self._on_signal(signum)

    def run(self, restore_signals: bool = True) -> int:
        """Run the daemon on a new event loop."""
        return asyncio.run(self.run_async(restore_signals))

    async def _shutdown(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self.loop is not None:
            for fd in ((self.monitor.filenos() if self.monitor else [])
                       + ([self.devnodes.fileno()] if self.devnodes else [])):
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(fd)
        self.metrics.close()
        if self.connector is not None:
            await self.connector.close()  # the kubelet's calls in progress end (UNAVAILABLE)
        if self.cdi is not None:
            self.cdi.close()  # no spec names a device nobody serves any more
        if self.runner is not None:
            self.runner.close()  # what is still running ends now, with its process group
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.devnodes is not None:
            self.devnodes.close()
        self.sink.close()


def _registration_paths(setting: str) -> Tuple[str, ...]:
    """[plugin] registration as the ways to register, preferred first."""
    from .registration import KUBELET_SOCKET_PATH, PLUGIN_WATCHER

    return {"kubelet-socket": (KUBELET_SOCKET_PATH,), "plugin-watcher": (PLUGIN_WATCHER,),
            "both": (PLUGIN_WATCHER, KUBELET_SOCKET_PATH)}[setting]


def _connector_settings(cfg: config.Config) -> Tuple[object, ...]:
    """What the kubelet side is built with: a change rebuilds it (every resource served afresh)."""
    p = cfg.plugin
    return (p.kubelet_dir, p.register_timeout, p.register_backoff_max, p.registration, p.plugins_registry_dir)


def _noop_handler(signum: int, frame: object) -> None:
    """A Python-level handler that does nothing: the wakeup fd carries the signal to the loop."""


def _apply_log_level(level: str) -> None:
    logging.getLogger("udev_device_plugin").setLevel(level.upper())


class JournalFormatter(logging.Formatter):
    """Under systemd, journald adds timestamps; a ``<N>`` prefix carries the priority."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class BrokenWriteFilter(logging.Filter):
    """grpc.aio logs a stream message that could not go out because the connection broke before
    it noticed the client leave (a kubelet restarting) as an error with a traceback
    ("ExecuteBatchError raised in core by servicer method [...ListAndWatch]").  Nothing is wrong
    with the daemon then: the stream's end is handled (registration.py) and logged by us.  The
    record becomes one DEBUG line; any other grpc error keeps its level and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "ExecuteBatchError":
            record.args = (record.getMessage(), exc)
            record.msg = "%s (the connection broke while a message was being sent: %s)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str) -> None:
    logging.getLogger("grpc._cython.cygrpc").addFilter(BrokenWriteFilter())
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    _apply_log_level(level)


def serve(config_path: str, kubelet_dir: Optional[str] = None) -> int:
    """The ``serve`` command: run until stopped and return the exit status."""
    try:
        daemon = Daemon(config_path, kubelet_dir, reap_strays=commands.become_subreaper())
    except config.ConfigError as exc:
        setup_logging("info")
        for message in exc.messages:
            log.error("%s", message)
        log.error("invalid configuration: not starting (%d error(s))", len(exc.messages))
        return EXIT_CONFIG
    setup_logging(daemon.cfg.plugin.log_level)
    settings = " ".join(f"{name}={os.environ[name]}" for name in GRPC_LOGGED if os.environ.get(name))
    log.info("udev-device-plugin starting: %d resource(s), kubelet directory %s; grpcio %s%s",
             len(daemon.cfg.resources), daemon.cfg.plugin.kubelet_dir, grpc.__version__,
             f" ({settings})" if settings else "")
    return daemon.run(restore_signals=False)


__all__: List[str] = ["Daemon", "serve", "EXIT_OK", "EXIT_FAILURE", "EXIT_CONFIG"]
