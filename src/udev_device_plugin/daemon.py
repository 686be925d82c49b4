"""The composition root: builds the udev context and monitor, the kubelet connector and
the notifier, and runs the main loop that owns signals, readiness and the watchdog.

One thread (the main one) decides everything.  gRPC handler threads only read the
published device lists; Register results and health command results come back
through :meth:`Daemon.post`.  Nothing polls: the loop sleeps in ``select`` until a
udev event, an inotify event, a signal, a posted result or the next timer
(watchdog ping, Register retry, health check).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import selectors
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Dict, List, Mapping, Optional, Set, Tuple

import pyudev

from . import commands, config, discovery, events
from .health import CommandHealth
from .hotplug import DevnodeWatch, HotplugMonitor, Overflow
from .kubelet import KubeletConnector
from .model import HEALTHY, UNHEALTHY, Device, diff
from .notify import Notifier, watchdog_interval
from .servicer import ResourceState

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG; the unit's RestartPreventExitStatus=
# A udev event after a quiet spell is handled at once.  Events that follow others closely
# (a burst: 100 devices plugged at once) wait until HOTPLUG_HOLDOFF after the last handling,
# so the kubelet gets a few full lists, not one growing list per device.
HOTPLUG_QUIET = 0.005
HOTPLUG_HOLDOFF = 0.02


class Daemon:
    def __init__(self, config_path: str, kubelet_dir: Optional[str] = None,
                 notifier: Optional[Notifier] = None,
                 context_factory: Callable[[], pyudev.Context] = pyudev.Context,
                 monitor_factory: Optional[Callable[[pyudev.Context], HotplugMonitor]] = None,
                 sink: Optional[events.Sink] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config_path = config_path
        self.kubelet_dir_override = kubelet_dir
        self.notifier = notifier or Notifier()
        self.context_factory = context_factory
        self.monitor_factory = monitor_factory or HotplugMonitor
        self._sink_override = sink
        self.clock = clock
        self.cfg = self.load_config()  # raises ConfigError before anything is created
        self.sink: events.Sink = sink or events.make_sink(self.cfg.plugin.events)
        self.states: Dict[str, ResourceState] = {}
        self.raw: Dict[str, Mapping[str, Device]] = {}
        self.problems: Set[str] = set()
        self.command_health = CommandHealth()
        self.health_due: Dict[Tuple[str, str], float] = {}
        self.health_running: Set[Tuple[str, str]] = set()
        self.health_pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health")
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._signals: List[int] = []
        self._stop = False
        self._ready = False
        self._started = False
        self._started_at = 0.0
        self._status = ""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.connector: Optional[KubeletConnector] = None
        self.context: Optional[pyudev.Context] = None
        self.monitor: Optional[HotplugMonitor] = None
        self.devnodes: Optional[DevnodeWatch] = None
        self._udev_changes: Dict[str, Dict[str, str]] = {}
        self._udev_full: Set[str] = set()
        self._udev_due: Optional[float] = None
        self._udev_applied = float("-inf")
        self._udev_arrived = float("-inf")

    # --- config ---------------------------------------------------------------

    def load_config(self) -> config.Config:
        cfg = config.load(self.config_path)
        if self.kubelet_dir_override:
            cfg = dataclasses.replace(cfg, plugin=dataclasses.replace(cfg.plugin,
                                                                       kubelet_dir=self.kubelet_dir_override))
        return cfg

    # --- cross-thread hand-off ----------------------------------------------------

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the main thread soon; callable from any thread."""
        self._posted.put(fn)
        try:
            os.write(self._wake_w, b"p")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    # --- start-up -----------------------------------------------------------------

    def _new_connector(self) -> KubeletConnector:
        connector = KubeletConnector(self.cfg.plugin.kubelet_dir, self.post,
                                     register_timeout=self.cfg.plugin.register_timeout,
                                     backoff_max=self.cfg.plugin.register_backoff_max,
                                     on_registered=self._on_registered, clock=self.clock)
        connector.start()
        return connector

    def _on_registered(self, name: str, ok: bool, why: str) -> None:
        self._update_status()

    def start(self) -> None:
        self._started_at = self.clock()
        self.context = self.context_factory()
        # The monitor opens before the first enumeration, so nothing in between is lost.
        self.monitor = self.monitor_factory(self.context)
        self.devnodes = DevnodeWatch()
        self.connector = self._new_connector()
        for res in self.cfg.resources:
            self._start_resource(res)
        self._started = True
        self._update_status()

    def _start_resource(self, res: config.ResourceConfig) -> None:
        state = ResourceState(res)
        self.states[res.name] = state
        self._rescan([res.name])  # the first ListAndWatch answer is the full list
        assert self.connector is not None
        self.connector.add(state)

    def _stop_resource(self, name: str) -> None:
        assert self.connector is not None
        self.connector.remove(name)
        state = self.states.pop(name)
        self.raw.pop(name, None)
        for dev in state.current()[1].values():
            self.command_health.forget((name, dev.id))
            self.health_due.pop((name, dev.id), None)
        self.problems = {p for p in self.problems if not p.startswith(name + ":")}
        self._watch_devnodes()

    # --- discovery and health -------------------------------------------------------

    def _rescan(self, names: List[str]) -> None:
        assert self.context is not None
        resources = [self.states[n].config for n in names if n in self.states]
        result = discovery.scan(self.context, resources)
        problems = {p for p in self.problems if not any(p.startswith(r.name + ":") for r in resources)}
        problems |= set(result.problems)
        for problem in sorted(problems - self.problems):
            log.warning("%s", problem)
        self.problems = problems
        for res in resources:
            self.raw[res.name] = result.snapshot[res.name]
            self._publish(res.name)
        self._watch_devnodes()

    def _nodes_of(self, name: str) -> Set[str]:
        state = self.states.get(name)
        nodes = {n for dev in self.raw.get(name, {}).values() for n in dev.devnodes}
        return nodes | set(state.config.extra_devnodes) if state else nodes

    def _watch_devnodes(self) -> None:
        if self.devnodes is not None:
            self.devnodes.watch({n for name in self.states for n in self._nodes_of(name)})

    def _handle_devnodes(self) -> None:
        """A device node appeared or vanished outside udev's events: look at its device again."""
        assert self.devnodes is not None
        paths = self.devnodes.changed()
        if not paths:
            return
        log.debug("device nodes changed: %s", ", ".join(sorted(paths)))
        for name in sorted(self.states):
            extra = set(self.states[name].config.extra_devnodes)
            if "" in paths or extra & paths:
                self._udev_full.add(name)  # events were lost, or a node every device shares
                continue
            for dev in self.raw.get(name, {}).values():
                if paths.intersection(dev.devnodes):
                    self._udev_changes.setdefault(name, {}).setdefault(dev.sys_path, "change")
        # Not counted as a udev arrival: a node's deletion is followed at once by its remove event.
        self._schedule_apply(quiet=True)

    def _effective(self, name: str) -> Dict[str, Device]:
        """Rule health from the scan, overlaid with the damped health_command result."""
        out = {}
        for dev_id, dev in self.raw.get(name, {}).items():
            cmd = self.command_health.get((name, dev_id))
            if dev.healthy and cmd is not None and not cmd[0]:
                dev = dataclasses.replace(dev, health=UNHEALTHY, reason=cmd[1])
            out[dev_id] = dev
        return out

    def _publish(self, name: str) -> None:
        state = self.states.get(name)
        if state is None:
            return
        res = state.config
        old = state.current()[1]
        new = self._effective(name)
        if not state.publish(new):
            return
        change = diff({name: old}, {name: new}).get(name)
        if change is None:
            return
        now = self.clock()
        for dev in change.added:
            self.sink.emit(events.devices_event("added", name, dev.id, dev.devnodes, dev.health, dev.reason))
            if res.health_command:
                self.health_due[(name, dev.id)] = now
        for dev in change.removed:
            allocated = state.allocated_at(dev.id)
            extra = ""
            if allocated:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(allocated))
                extra = f"it was allocated to a container at {stamp}, which may have lost it"
            self.sink.emit(events.devices_event("removed", name, dev.id, dev.devnodes, dev.health, "", extra))
            self.command_health.forget((name, dev.id))
            self.health_due.pop((name, dev.id), None)
        for before, after in change.changed:
            if before.healthy and not after.healthy:
                self.sink.emit(events.devices_event("unhealthy", name, after.id, after.devnodes, after.health,
                                                    after.reason))
            elif not before.healthy and after.healthy:
                self.sink.emit(events.devices_event("recovered", name, after.id, after.devnodes, after.health,
                                                    before.reason))
            elif before.reason != after.reason and not after.healthy:
                log.info("%s: device %s still unhealthy: %s", name, after.id, after.reason)
            else:
                log.debug("%s: device %s changed: %s -> %s", name, after.id, before, after)
        self._update_status()

    def _run_health_checks(self) -> None:
        now = self.clock()
        for key, due in list(self.health_due.items()):
            if due > now or key in self.health_running:
                continue
            name, dev_id = key
            state = self.states.get(name)
            dev = self.raw.get(name, {}).get(dev_id)
            if state is None or dev is None:
                self.health_due.pop(key, None)
                continue
            res = state.config
            self.health_running.add(key)
            self.health_due[key] = now + res.health_interval
            fut = self.health_pool.submit(commands.run_health_command, res, dev)
            fut.add_done_callback(self._health_done(key, res))

    def _health_done(self, key: Tuple[str, str], res: config.ResourceConfig
                     ) -> Callable[[futures.Future[commands.Result]], None]:
        """A done-callback (pool thread) that hands the result to the main thread."""
        def done(fut: futures.Future[commands.Result]) -> None:
            self.post(lambda: self._health_result(key, res, fut))
        return done

    def _health_result(self, key: Tuple[str, str], res: config.ResourceConfig,
                       fut: futures.Future[commands.Result]) -> None:
        self.health_running.discard(key)
        state = self.states.get(key[0])
        if state is None or state.config is not res or key[1] not in self.raw.get(key[0], {}):
            return  # the device or resource went away meanwhile
        try:
            result = fut.result()
            ok, reason = result.ok, ("" if result.ok else f"health_command: {result.detail}")
        except Exception as exc:  # noqa: BLE001 - a failing check must not stop the daemon
            ok, reason = False, f"health_command could not run: {exc}"
        self.command_health.observe(key, ok, reason, res.health_threshold)
        self._publish(key[0])

    def _handle_udev(self) -> None:
        assert self.monitor is not None
        try:
            batch = self.monitor.drain()
        except Overflow as exc:
            log.warning("%s; rescanning every resource", exc)
            self._rescan(list(self.states))
            return
        if not batch:
            return
        snapshot = {n: self.raw.get(n, {}) for n in self.states}
        resources = [s.config for s in self.states.values()]
        ours = False
        for ev in batch:
            log.debug("udev %s %s (%s)", ev.action, ev.sys_path, ev.subsystem)
            for name, paths in discovery.touched(resources, snapshot, ev.subsystem, ev.sys_path).items():
                ours = True
                if ev.action == "move":
                    self._udev_full.add(name)  # the old path is gone; only a scan knows what it was
                for path in paths:
                    # The event's own action for its device; an ancestor is looked at again ("change").
                    self._udev_changes.setdefault(name, {})[path] = ev.action if path == ev.sys_path else "change"
        if not ours:
            return  # nothing of ours (a bdi device beside a loop device, say)
        now = self.clock()
        quiet = now - self._udev_arrived >= HOTPLUG_QUIET
        self._udev_arrived = now
        self._schedule_apply(quiet)

    def _schedule_apply(self, quiet: bool) -> None:
        """Apply the gathered changes now, or at the end of the hold-off after the last time."""
        if not (self._udev_changes or self._udev_full) or self._udev_due is not None:
            return
        if quiet or self.clock() - self._udev_applied >= HOTPLUG_HOLDOFF:
            self._apply_udev()
        else:
            self._udev_due = self._udev_applied + HOTPLUG_HOLDOFF

    def _apply_udev(self) -> None:
        """Rescan or refresh what the udev events gathered so far touched."""
        changes, full = self._udev_changes, self._udev_full
        self._udev_changes, self._udev_full, self._udev_due = {}, set(), None
        self._udev_applied = self.clock()
        for name, seen in changes.items():
            # A burst that touches much of a resource costs less as one scan.
            if len(seen) > max(8, len(self.raw.get(name, {})) // 2):
                full.add(name)
        full &= set(self.states)
        if full:
            self._rescan(sorted(full))
        for name in sorted(set(changes) - full):
            if name in self.states:
                self._refresh(name, changes[name])

    def _refresh(self, name: str, changes: Mapping[str, str]) -> None:
        """Look again at only the devices an event touched."""
        assert self.context is not None
        res = self.states[name].config
        result = discovery.refresh(self.context, res, self.raw.get(name, {}), changes)
        if result is None:
            self._rescan([name])
            return
        self.raw[name], problems = result
        for problem in problems:
            if problem not in self.problems:
                self.problems.add(problem)
                log.warning("%s", problem)
        self._publish(name)
        self._watch_devnodes()

    # --- reload ---------------------------------------------------------------------

    def reload(self) -> None:
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
        _apply_log_level(new.plugin.log_level)
        if (new.plugin.kubelet_dir, new.plugin.register_timeout, new.plugin.register_backoff_max) != (
                old.plugin.kubelet_dir, old.plugin.register_timeout, old.plugin.register_backoff_max):
            log.info("kubelet settings changed: serving every resource again")
            for name in list(self.states):
                self._stop_resource(name)
            assert self.connector is not None
            self.connector.close()
            self.connector = self._new_connector()
        wanted = {r.name: r for r in new.resources}
        for name in list(self.states):
            if name not in wanted:
                log.info("%s: removed from the configuration; no longer served", name)
                self._stop_resource(name)
            elif self.states[name].config != wanted[name]:
                log.info("%s: configuration changed; serving and registering it again", name)
                self._stop_resource(name)
        for res in new.resources:
            if res.name not in self.states:
                self._start_resource(res)
        log.info("configuration reloaded: %d resource(s)", len(self.states))
        self._update_status()
        self.notifier.notify("READY=1", f"STATUS={self._summary()}")

    # --- status and readiness ------------------------------------------------------------

    def _ready_deadline(self) -> float:
        # READY=1 waits for the kubelet to accept every registration; a kubelet that keeps
        # refusing (or a kubelet.sock nobody answers) must not hold the unit's start until
        # systemd gives up (TimeoutStartSec): past ready_timeout, READY=1 says why.
        return self._started_at + self.cfg.plugin.ready_timeout

    def _summary(self) -> str:
        devices = [d for s in self.states.values() for d in s.current()[1].values()]
        sick = sum(1 for d in devices if d.health != HEALTHY)
        text = f"{len(devices)} device(s)"
        if sick:
            text += f", {sick} unhealthy"
        if self.connector is not None:
            text = f"{self.connector.summary()}; {text}"
        return text

    def _update_status(self) -> None:
        if self.connector is None or not self._started:
            return
        if not self._ready and (self.connector.settled() or self._ready_deadline() <= self.clock()):
            self._ready = True
            self._status = self._summary()
            settled = self.connector.settled()
            if not settled:
                errors = sorted({p.last_error for p in self.connector.plugins.values() if p.last_error})
                self._status += "; " + "; ".join(errors)
            self.notifier.notify("READY=1", f"STATUS={self._status}")
            if settled:
                log.info("ready: %s", self._status)
            else:
                log.warning("ready without every registration after %g s: %s", self.cfg.plugin.ready_timeout,
                            self._status)
            return
        if self._ready:
            summary = self._summary()
            if summary != self._status:
                self._status = summary
                self.notifier.notify(f"STATUS={summary}")

    # --- the main loop ----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status."""
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        sel = selectors.DefaultSelector()
        try:
            self.start()
            assert self.connector is not None and self.monitor is not None
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(self.monitor.fileno(), selectors.EVENT_READ, "udev")
            sel.register(self.connector.fileno(), selectors.EVENT_READ, "kubelet")
            assert self.devnodes is not None
            sel.register(self.devnodes.fileno(), selectors.EVENT_READ, "devnodes")
            interval = watchdog_interval()
            next_ping = self.clock()
            while not self._stop:
                now = self.clock()
                if interval is not None and now >= next_ping:
                    self.notifier.notify("WATCHDOG=1")
                    next_ping = now + interval
                deadlines = [d for d in (self.connector.next_deadline(), self._udev_due,
                                         None if self._ready else self._ready_deadline(),
                                         min(self.health_due.values(), default=None),
                                         next_ping if interval is not None else None) if d is not None]
                timeout = max(0.0, min(deadlines) - self.clock()) if deadlines else None
                for key, _ in sel.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "udev":
                        self._handle_udev()
                    elif key.data == "kubelet":
                        self.connector.handle_inotify()
                    elif key.data == "devnodes":
                        self._handle_devnodes()
                if self._udev_due is not None and self.clock() >= self._udev_due:
                    self._apply_udev()
                self._run_posted()
                self._handle_signals(sel)
                self.connector.run_due()
                self._run_health_checks()
                self._update_status()
            return EXIT_OK
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=stopping")
            self._shutdown()
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_posted(self) -> None:
        while True:
            try:
                fn = self._posted.get_nowait()
            except queue.Empty:
                return
            fn()

    def _handle_signals(self, sel: selectors.BaseSelector) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s received: stopping", signal.Signals(signum).name)
                self._stop = True
            elif signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading %s", self.config_path)
                old = self.connector
                assert old is not None
                old_fd = old.fileno()
                self.reload()
                if self.connector is not old and self.connector is not None:
                    # kubelet_dir changed: a new connector with a new inotify descriptor
                    # (possibly reusing the old number, so unregister by number first).
                    _unregister(sel, old_fd)
                    sel.register(self.connector.fileno(), selectors.EVENT_READ, "kubelet")
            elif signum == signal.SIGUSR1:
                log.info("SIGUSR1 received: checking the registrations")
                assert self.connector is not None
                self.connector.verify()

    def _shutdown(self) -> None:
        if self.connector is not None:
            self.connector.close()  # the kubelet's calls in progress end (UNAVAILABLE)
        # A prestart or health command still running would hold its handler thread, and so
        # the exit: end it.
        commands.kill_running()
        self.health_pool.shutdown(wait=False, cancel_futures=True)
        if self.devnodes is not None:
            self.devnodes.close()
        self.sink.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _unregister(sel: selectors.BaseSelector, fd: int) -> None:
    try:
        sel.unregister(fd)
    except (KeyError, ValueError):
        pass


def _apply_log_level(level: str) -> None:
    logging.getLogger("udev_device_plugin").setLevel(level.upper())


class JournalFormatter(logging.Formatter):
    """Under systemd, journald adds timestamps; a ``<N>`` prefix carries the priority."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
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
        daemon = Daemon(config_path, kubelet_dir)
    except config.ConfigError as exc:
        setup_logging("info")
        for message in exc.messages:
            log.error("%s", message)
        log.error("invalid configuration: not starting (%d error(s))", len(exc.messages))
        return EXIT_CONFIG
    setup_logging(daemon.cfg.plugin.log_level)
    log.info("udev-device-plugin starting: %d resource(s), kubelet directory %s",
             len(daemon.cfg.resources), daemon.cfg.plugin.kubelet_dir)
    status = daemon.run()
    _exit_leftover_threads(status)
    return status


def _exit_leftover_threads(status: int) -> None:
    """A handler still finishing must not hold the exit past systemd's patience.

    Our pools' threads (gRPC handlers, health checks) are joined by concurrent.futures at
    interpreter exit, whatever their daemon flag; their commands were killed in _shutdown.
    """
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread is threading.current_thread():
            continue
        if thread.daemon and not thread.name.startswith(("grpc_", "health_")):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("thread %s still busy at exit; exiting anyway", thread.name)
            logging.shutdown()
            os._exit(status)
