"""Serve -> register -> watch -> re-register: our side of the kubelet's device manager.

What the kubelet does that shapes this file (see KUBELET.md):
- During Register it dials our socket and calls GetDevicePluginOptions, so we serve first.
- On start it deletes every socket in its directory, then creates kubelet.sock.  The
  newest kubelet also recreates kubelet.sock when its own gRPC server fails.
- Re-registering on a socket path that a kubelet still holds a stream for is either
  rejected (new kubelets) or disconnects the new stream later (old ones, upstream issue
  kubernetes/kubernetes#121994), so every registration gets a fresh socket file.

Nothing polls: an inotify watch on the directory reports our socket vanishing and
kubelet.sock appearing; failed Register calls are retried with capped backoff.
Everything here runs on the daemon's main thread except gRPC callbacks, which only
hand results back through ``post``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import stat
import time
from concurrent import futures
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from . import __version__, api
from . import inotify as ino
from .config import KUBELET_SOCKET
from .servicer import DevicePluginServicer, ResourceState, StatusServicer, options_for

log = logging.getLogger(__name__)

API_VERSION = api.API_VERSION
SOCKET_PREFIX = "udevdp-"
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_FIRST_RETRY = 0.02

SERVER_OPTIONS = [
    # Notice a kubelet that hangs without closing the connection.
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.http2.ping_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
]

SocketId = Tuple[int, int, int]  # st_dev, st_ino, st_ctime_ns of kubelet.sock


def socket_identity(path: str) -> Optional[SocketId]:
    """Which kubelet.sock is there now: None when absent or not a socket."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def remove_socket(path: str, inode: Optional[int] = None) -> bool:
    """Unlink ``path`` only if it is a UNIX socket (never through a symlink) and, if given, ours."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (inode is not None and st.st_ino != inode):
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def socket_name(resource: str, pid: int, seq: int, kubelet_dir: str) -> str:
    stem = resource.replace("/", "_")
    name = f"{SOCKET_PREFIX}{stem}-{pid}-{seq}.sock"
    if len(os.path.join(kubelet_dir, name)) > _MAX_SOCKET_PATH:
        digest = hashlib.sha1(resource.encode()).hexdigest()[:10]
        name = f"{SOCKET_PREFIX}{digest}-{pid}-{seq}.sock"
    return name


class Endpoint:
    """One gRPC server on one fresh socket file, serving one resource."""

    def __init__(self, plugin: ResourcePlugin, kubelet_dir: str, name: str,
                 executor: futures.ThreadPoolExecutor) -> None:
        self.name = name
        self.path = os.path.join(kubelet_dir, name)
        if len(self.path) > _MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, f"socket path {self.path} is longer than {_MAX_SOCKET_PATH} bytes")
        self.servicer = DevicePluginServicer(plugin.state)
        self.server = grpc.server(executor, options=SERVER_OPTIONS)
        self.server.add_generic_rpc_handlers([
            self.servicer.handler(),
            StatusServicer(plugin.state, plugin.registration_status, __version__).handler()])
        try:
            port = self.server.add_insecure_port("unix:" + self.path)
        except RuntimeError as exc:  # new grpcio raises, old returns 0
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {self.path}: {exc}") from None
        if not port:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {self.path}")
        self.server.start()
        st = os.lstat(self.path)
        self.inode = st.st_ino
        self.offered = False  # named in a Register already: never offer it twice

    def alive(self) -> bool:
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode

    def stop(self) -> None:
        """End the streams, stop the server and remove our socket file (if still ours)."""
        self.servicer.close()
        self.server.stop(grace=None)
        remove_socket(self.path, self.inode)


class ResourcePlugin:
    """Registration state of one resource."""

    def __init__(self, state: ResourceState) -> None:
        self.state = state
        self.endpoint: Optional[Endpoint] = None
        self.registered_with: Optional[SocketId] = None
        self.registered = False
        self.last_error = ""
        self.registrations = 0
        self.attempt = 0  # generation: results of older attempts are ignored
        self.in_flight: Optional[SocketId] = None  # the kubelet.sock a Register is under way with
        self.retry_at: Optional[float] = None
        self.backoff = _FIRST_RETRY

    @property
    def name(self) -> str:
        return self.state.config.name

    def registration_status(self) -> Tuple[bool, str, int]:
        return self.registered, self.last_error, self.registrations


class KubeletConnector:
    """Keeps every resource served on a live socket and registered with the current kubelet."""

    def __init__(self, kubelet_dir: str, post: Callable[[Callable[[], None]], None],
                 register_timeout: float = 5.0, backoff_max: float = 10.0,
                 on_registered: Optional[Callable[[str, bool, str], None]] = None,
                 clock: Callable[[], float] = time.monotonic, max_workers: int = 32) -> None:
        self.kubelet_dir = kubelet_dir
        self.kubelet_socket = os.path.join(kubelet_dir, KUBELET_SOCKET)
        self.post = post
        self.register_timeout = register_timeout
        self.backoff_max = backoff_max
        self.on_registered = on_registered or (lambda name, ok, why: None)
        self.clock = clock
        self.plugins: Dict[str, ResourcePlugin] = {}
        self.executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc")
        self.inotify = ino.Inotify()
        self._wd = -1
        self._seq = itertools.count(1)
        self._pid = os.getpid()

    # --- setup and teardown -------------------------------------------------

    def start(self) -> None:
        self._watch_dir()
        self._remove_stale_sockets()

    def fileno(self) -> int:
        return self.inotify.fileno()

    def _watch_dir(self) -> None:
        os.makedirs(self.kubelet_dir, mode=0o750, exist_ok=True)
        mask = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_DELETE_SELF
                | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)
        self._wd = self.inotify.add_watch(self.kubelet_dir, mask)

    def _remove_stale_sockets(self) -> None:
        """Sockets a previous run of ours left behind (after a crash or kill -9)."""
        try:
            names = os.listdir(self.kubelet_dir)
        except OSError:
            return
        ours = {p.endpoint.name for p in self.plugins.values() if p.endpoint}
        for name in names:
            if name.startswith(SOCKET_PREFIX) and name not in ours:
                if remove_socket(os.path.join(self.kubelet_dir, name)):
                    log.info("removed stale socket %s", name)

    def close(self) -> None:
        for plugin in list(self.plugins.values()):
            self._stop_endpoint(plugin)
        self.plugins.clear()
        # Handlers still running (a prestart_command) must not hold up the exit; the servers
        # are stopped, so no new call starts.
        self.executor.shutdown(wait=False)
        self.inotify.close()

    # --- resources ------------------------------------------------------------

    def add(self, state: ResourceState) -> ResourcePlugin:
        plugin = ResourcePlugin(state)
        self.plugins[plugin.name] = plugin
        self._new_endpoint(plugin)
        self._register_if_kubelet(plugin)
        return plugin

    def remove(self, name: str) -> None:
        plugin = self.plugins.pop(name, None)
        if plugin:
            plugin.attempt += 1
            self._stop_endpoint(plugin)

    def _stop_endpoint(self, plugin: ResourcePlugin) -> None:
        if plugin.endpoint is not None:
            plugin.endpoint.stop()
            plugin.endpoint = None

    def _new_endpoint(self, plugin: ResourcePlugin) -> bool:
        """Serve the resource on a fresh socket, then retire the old one."""
        old = plugin.endpoint
        name = socket_name(plugin.name, self._pid, next(self._seq), self.kubelet_dir)
        try:
            plugin.endpoint = Endpoint(plugin, self.kubelet_dir, name, self.executor)
        except OSError as exc:
            plugin.endpoint = None
            plugin.last_error = f"cannot serve: {exc.strerror or exc}"
            log.error("%s: %s", plugin.name, plugin.last_error)
            self._schedule_retry(plugin)
        if old is not None:
            old.stop()
        plugin.registered = False
        plugin.registered_with = None
        return plugin.endpoint is not None

    # --- registration ---------------------------------------------------------

    def _register_if_kubelet(self, plugin: ResourcePlugin) -> None:
        if socket_identity(self.kubelet_socket) is None:
            # No kubelet: inotify tells us when kubelet.sock appears.
            plugin.retry_at = None
            plugin.last_error = f"waiting for {self.kubelet_socket}"
            return
        self._register(plugin)

    @staticmethod
    def _current(plugin: ResourcePlugin, kubelet: Optional[SocketId]) -> bool:
        """The plugin's live socket is registered with ``kubelet``, or a Register naming it is under way."""
        endpoint = plugin.endpoint
        return endpoint is not None and endpoint.alive() and (
            (endpoint.offered and plugin.in_flight == kubelet)
            or (plugin.registered and plugin.registered_with == kubelet))

    def _register(self, plugin: ResourcePlugin) -> None:
        kubelet = socket_identity(self.kubelet_socket)
        endpoint = plugin.endpoint
        if self._current(plugin, kubelet):
            # This kubelet is answering a Register that names this very socket, or accepted it
            # already: inotify can report a restart in two batches (our socket gone, then
            # kubelet.sock created), and registering again would retire a stream the kubelet just
            # opened (older kubelets then drop the new registration too, upstream issue
            # kubernetes/kubernetes#121994).  A Register still under way for a socket we have since
            # replaced covers nothing: the new socket is registered (the old answer is ignored).
            return
        # Every Register names a socket no kubelet has seen (KUBELET.md: duplicates on one
        # path are refused by new kubelets and break old ones).
        if endpoint is None or endpoint.offered or not endpoint.alive():
            if not self._new_endpoint(plugin):
                return
        endpoint = plugin.endpoint
        assert endpoint is not None
        endpoint.offered = True
        plugin.attempt += 1
        attempt = plugin.attempt
        plugin.in_flight = kubelet
        plugin.retry_at = None
        request = api.RegisterRequest(version=API_VERSION, endpoint=endpoint.name, resource_name=plugin.name,
                                      options=options_for(plugin.state.config))
        channel = grpc.insecure_channel("unix:" + self.kubelet_socket)
        try:
            future = api.Stub(channel, (api.REGISTER,)).Register.future(request, timeout=self.register_timeout)
        except Exception as exc:  # noqa: BLE001 - a broken channel must not stop the daemon
            channel.close()
            self._finish(plugin, attempt, endpoint, kubelet, False, f"Register could not start: {exc}")
            return

        def done(fut: grpc.Future) -> None:
            try:
                fut.result()
                ok, why = True, ""
            except grpc.RpcError as exc:
                ok, why = False, f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # noqa: BLE001
                ok, why = False, str(exc)
            def finish() -> None:  # back on the main thread
                channel.close()
                self._finish(plugin, attempt, endpoint, kubelet, ok, why)

            self.post(finish)

        future.add_done_callback(done)

    def _finish(self, plugin: ResourcePlugin, attempt: int, endpoint: Endpoint, kubelet: Optional[SocketId],
                ok: bool, why: str) -> None:
        if attempt != plugin.attempt or self.plugins.get(plugin.name) is not plugin:
            return  # superseded by a newer attempt, or the resource was removed
        plugin.in_flight = None
        if ok:
            plugin.registered = True
            plugin.registered_with = kubelet
            plugin.registrations += 1
            plugin.last_error = ""
            plugin.backoff = _FIRST_RETRY
            log.info("%s: registered with the kubelet as %s", plugin.name, endpoint.name)
        else:
            plugin.registered = False
            plugin.last_error = f"Register failed: {why}"
            log.warning("%s: %s; retrying in %.2f s", plugin.name, plugin.last_error, plugin.backoff)
            self._schedule_retry(plugin)
        self.on_registered(plugin.name, ok, why)

    def _schedule_retry(self, plugin: ResourcePlugin) -> None:
        plugin.retry_at = self.clock() + plugin.backoff
        plugin.backoff = min(plugin.backoff * 2, self.backoff_max)

    def next_deadline(self) -> Optional[float]:
        times = [p.retry_at for p in self.plugins.values() if p.retry_at is not None]
        return min(times) if times else None

    def run_due(self) -> None:
        now = self.clock()
        for plugin in list(self.plugins.values()):
            if plugin.retry_at is not None and plugin.retry_at <= now:
                plugin.retry_at = None
                if plugin.endpoint is None or not plugin.endpoint.alive():
                    if not self._new_endpoint(plugin):
                        continue
                self._register_if_kubelet(plugin)

    # --- reacting to the kubelet ----------------------------------------------

    def handle_inotify(self) -> None:
        """Read the directory's events and act once on the batch."""
        ours_gone = set()
        kubelet_new = False
        rewatch = False
        by_socket = {p.endpoint.name: p.name for p in self.plugins.values() if p.endpoint}
        for event in self.inotify.read():
            if event.mask & ino.IN_Q_OVERFLOW:
                log.warning("inotify queue overflow on %s; checking every registration", self.kubelet_dir)
                self.verify()
                continue
            if event.mask & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_IGNORED):
                rewatch = True
                continue
            if event.mask & (ino.IN_DELETE | ino.IN_MOVED_FROM):
                if event.name in by_socket:
                    ours_gone.add(by_socket[event.name])
                elif event.name == KUBELET_SOCKET:
                    log.info("kubelet.sock removed: the kubelet is stopping or restarting")
            elif event.mask & (ino.IN_CREATE | ino.IN_MOVED_TO) and event.name == KUBELET_SOCKET:
                kubelet_new = True
        if rewatch:
            log.warning("%s was removed; recreating it and serving again", self.kubelet_dir)
            if self._wd >= 0:
                self.inotify.rm_watch(self._wd)
            self._watch_dir()
            ours_gone = set(self.plugins)
            kubelet_new = kubelet_new or socket_identity(self.kubelet_socket) is not None
        for name in sorted(ours_gone):
            plugin = self.plugins[name]
            if plugin.endpoint is not None and plugin.endpoint.alive():
                continue  # an older socket of ours, already replaced
            log.info("%s: our socket was removed; serving on a new one", name)
            self._new_endpoint(plugin)
        if kubelet_new:
            log.info("kubelet.sock created: registering every resource again")
        for plugin in self.plugins.values():
            if kubelet_new or plugin.name in ours_gone:
                self._reregister(plugin)

    def _reregister(self, plugin: ResourcePlugin) -> None:
        plugin.backoff = _FIRST_RETRY
        self._register_if_kubelet(plugin)

    def verify(self) -> List[str]:
        """Re-register what is not registered with the kubelet serving now; return those names.

        Idempotent: when every socket is ours and registered with the current
        kubelet.sock, nothing happens (this is what the systemd path unit asks for).
        """
        kubelet = socket_identity(self.kubelet_socket)
        redone = []
        for plugin in self.plugins.values():
            if self._current(plugin, kubelet):
                continue
            redone.append(plugin.name)
            self._reregister(plugin)
        if redone:
            log.info("re-registering %s", ", ".join(redone))
        else:
            log.info("every resource is registered with the current kubelet; nothing to do")
        return redone

    # --- readiness --------------------------------------------------------------

    def kubelet_present(self) -> bool:
        return socket_identity(self.kubelet_socket) is not None

    def settled(self) -> bool:
        """Every resource serves and, when a kubelet is there, it accepted every registration."""
        if not all(p.endpoint is not None for p in self.plugins.values()):
            return False
        if not self.kubelet_present():
            return True
        return all(p.registered for p in self.plugins.values())

    def summary(self) -> str:
        total = len(self.plugins)
        registered = sum(1 for p in self.plugins.values() if p.registered)
        if not self.kubelet_present():
            return f"serving {total} resource(s); waiting for the kubelet ({self.kubelet_socket})"
        return f"{registered}/{total} resource(s) registered with the kubelet"
