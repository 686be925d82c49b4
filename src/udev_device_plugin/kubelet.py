"""Our side of the kubelet's device manager: serve sockets, register, follow the kubelet.

This module carries out what registration.py decides.  It owns the socket directory
(sockdir.py: opened by descriptor, watched with inotify together with its parent, so a
rename, a removal or a replacement by a file or a symlink is seen at once and never
followed), one grpc.aio server per fresh socket, the Register calls, and the timers of
each resource's state machine.  It turns what it sees into registration events:

- our socket deleted (a kubelet restart's clean-up)      -> SocketGone
- kubelet.sock created / removed                          -> KubeletAppeared / KubeletGone
- a ListAndWatch stream opened or ended on our socket     -> StreamOpened / StreamEnded
- Register answered                                        -> Answered
- the socket directory lost or back                        -> DirectoryLost / DirectoryBack
- the kubelet silent on kubelet.sock, or answering again   -> KubeletSilent / KubeletAnswers

Everything runs on the daemon's event loop; nothing polls, except the short, bounded wait
for the kubelet to close an ended stream's connection before a re-registration
(kubernetes#121994), which reads /proc/net/unix every few milliseconds for at most a second,
and the check every ``kubelet_keepalive`` seconds, while a resource has the kubelet's stream,
that the kubelet still answers (:func:`kubelet_answers`): one connection for the whole kubelet,
where keepalive pings on each resource's connection woke grpc's threads ~11 times per
connection and round.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import stat
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import grpc

from . import __version__, commands, registration, wire
from . import inotify as ino
from .config import KUBELET_SOCKET
from .registration import Registration, State
from .servicer import DevicePluginServicer, PrestartLimit, ResourceState, StatusServicer, StreamHooks, options_for
from .sockdir import SOCKET_MODE, RestartNeeded, SocketDir, connections

log = logging.getLogger(__name__)

API_VERSION = wire.API_VERSION
SOCKET_PREFIX = "udevdp-"
# sun_path holds 108 bytes including the terminating NUL; the kubelet dials the real path.
_MAX_SOCKET_PATH = 107
_DRAIN_POLL = 0.005

# The kubelet silent this long on kubelet.sock hangs (at most the check's interval).
KEEPALIVE_TIMEOUT = 10.0

# Our servers' options.  Whether the kubelet answers is checked once for the whole kubelet, on
# kubelet.sock (a hang stops all of its connections alike), so our servers ping only as rarely as
# grpc's own default for servers, every 2 hours: a backstop that closes a connection a kubelet has
# left unanswered that long.  (INT_MAX, grpc's "never", measured two more wake-ups a second than this
# on grpcio 1.85.)
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 2 * 3600 * 1000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]

# The HTTP/2 client connection preface (RFC 9113 3.4) with an empty SETTINGS frame; a GOAWAY (no
# error) to leave.  A server's first frame on a connection is its SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))
_H2_GOAWAY = bytes((0, 0, 8, 7, 0, 0, 0, 0, 0)) + bytes(8)
_H2_SETTINGS = 4
_H2_ACK = 1
# How long a check waits, once answered, for the server to close after our GOAWAY.
_LEAVE_TIMEOUT = 1.0


async def _read_to_end(reader: asyncio.StreamReader, limit: int = 1 << 16) -> None:
    while limit > 0:
        data = await reader.read(min(limit, 4096))
        if not data:
            return
        limit -= len(data)


async def kubelet_answers(path: str) -> None:
    """Return once the gRPC server on the socket ``path`` answers a new connection: its HTTP/2
    SETTINGS frame, which the kubelet's transport writes the moment it accepts.  No call is made,
    so the kubelet logs nothing and no ping policy applies.  Raises OSError when the connection
    fails or closes first, ValueError when something that is not an HTTP/2 server answers."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(_H2_PREFACE)
        try:
            header = await reader.readexactly(9)
        except asyncio.IncompleteReadError:
            raise ConnectionResetError(errno.ECONNRESET, "the connection was closed before an answer") from None
        if header[3] != _H2_SETTINGS or header[4] & _H2_ACK:
            raise ValueError(f"not an HTTP/2 server: its first frame is of type {header[3]}")
        # Leave as a client does: GOAWAY, our end shut, and what the server still sends read until it
        # closes (closing a UNIX socket with unread data resets the peer, which grpc-go would log).
        writer.write(_H2_GOAWAY)
        writer.write_eof()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(_read_to_end(reader), _LEAVE_TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# Our own client channels (Register, the watchdog's probe) keep their connections to themselves: in
# grpc's shared subchannel pool, a connection to a kubelet that went away could outlive the channel.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# Calls one socket serves at once; the kubelet makes one at a time, plus its stream.
MAX_CONCURRENT_RPCS = 64

# Socket numbers are unique for the life of the process, across reloads (a name must never be
# offered to a kubelet twice).
_socket_numbers = itertools.count(1)


def next_socket_number() -> int:
    return next(_socket_numbers)


def socket_name(resource: str, pid: int, seq: int, kubelet_dir: str) -> str:
    stem = resource.replace("/", "_")
    name = f"{SOCKET_PREFIX}{stem}-{pid}-{seq}.sock"
    if len(os.path.join(kubelet_dir, name)) > _MAX_SOCKET_PATH:
        import hashlib  # here: hashlib loads OpenSSL's libcrypto (~0.5 MiB), and only long names need it

        digest = hashlib.sha1(resource.encode()).hexdigest()[:10]
        name = f"{SOCKET_PREFIX}{digest}-{pid}-{seq}.sock"
    return name


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


class Endpoint:
    """One grpc.aio server on one fresh socket file, serving one resource.

    In the kubelet's socket directory (registered with Register), or in plugins_registry (``via``
    PLUGIN_WATCHER), where the same socket also answers the plugin watcher's Registration service.
    """

    def __init__(self, plugin: Plugin, connector: KubeletConnector, seq: int,
                 via: str = registration.KUBELET_SOCKET_PATH) -> None:
        self.seq = seq
        self.via = via
        self.offer_attempt = 0  # plugin watcher: the registration attempt this socket stands for
        watched = connector.watched(via)
        assert watched is not None
        directory = watched.dir
        self.name = socket_name(plugin.name, os.getpid(), seq, directory.path)
        self.path = os.path.join(directory.path, self.name)
        if len(self.path) > _MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, f"socket path {self.path} is longer than {_MAX_SOCKET_PATH} bytes")
        self.bind_path = directory.at(self.name)
        self.directory = directory
        name = plugin.name
        hooks = StreamHooks(
            opened=lambda stream: connector.feed(name, registration.StreamOpened(seq, stream)),
            ended=lambda stream, by_us, why: connector.feed(name, registration.StreamEnded(seq, stream, by_us, why)))
        self.servicer = DevicePluginServicer(plugin.state, hooks, connector.runner, connector.prestarts)
        self.server = grpc.aio.server(options=SERVER_OPTIONS,
                                      maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
        handlers = [self.servicer.handler(), StatusServicer(plugin.state, plugin.status, __version__).handler()]
        if via == registration.PLUGIN_WATCHER:
            handlers.append(WatcherRegistration(plugin, self, connector).handler())
        self.server.add_generic_rpc_handlers(handlers)
        # 0600 whatever the caller's umask: only root (the kubelet) may connect.
        with _umask(0o777 & ~SOCKET_MODE):
            try:
                port = self.server.add_insecure_port("unix:" + self.bind_path)
            except RuntimeError as exc:  # new grpcio raises, old returns 0; neither says why
                raise OSError(_bind_errno(directory), f"cannot listen on {self.path}: {exc}") from None
        if not port:
            raise OSError(_bind_errno(directory), f"cannot listen on {self.path}")
        st = directory.lstat(self.name)
        if st is None or not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EADDRNOTAVAIL, f"{self.path} is not our socket after bind")
        self.inode = st.st_ino
        if stat.S_IMODE(st.st_mode) != SOCKET_MODE:
            os.chmod(self.bind_path, SOCKET_MODE)
        self.started: asyncio.Future = asyncio.ensure_future(self.server.start())
        self.stopped = False

    def alive(self) -> bool:
        st = self.directory.lstat(self.name)
        return st is not None and stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode

    def connections(self) -> int:
        return connections(self.bind_path)

    async def stop(self, grace: Optional[float] = 0.2) -> None:
        """End the streams, stop the server and remove our socket file (if still ours)."""
        if self.stopped:
            return
        self.stopped = True
        self.servicer.end_streams()
        with contextlib.suppress(Exception):
            await self.started
        await self.server.stop(grace)
        self.directory.remove_socket(self.name, self.inode)


class WatcherRegistration:
    """pluginregistration.Registration on a socket in plugins_registry: what the kubelet's plugin
    watcher asks of a socket it finds there (GetInfo), and how it says whether it registered it."""

    def __init__(self, plugin: Plugin, endpoint: Endpoint, connector: KubeletConnector) -> None:
        self.name = plugin.name
        self.endpoint = endpoint
        self.connector = connector

    def handler(self) -> grpc.GenericRpcHandler:
        return wire.service_handler(wire.PLUGIN_REGISTRATION, {
            "GetInfo": wire.method_handler(wire.GET_INFO, self.GetInfo),
            "NotifyRegistrationStatus": wire.method_handler(wire.NOTIFY_REGISTRATION_STATUS,
                                                           self.NotifyRegistrationStatus)})

    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        log.debug("%s: the plugin watcher asked GetInfo on %s", self.name, self.endpoint.name)
        self.connector.feed(self.name, registration.InfoRequested(self.endpoint.seq))
        # The endpoint is this very socket, by its real path: the kubelet dials it for DevicePlugin.
        return wire.PluginInfo(type=wire.PLUGIN_TYPE, name=self.name, endpoint=self.endpoint.path,
                              supported_versions=[API_VERSION])

    async def NotifyRegistrationStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.plugin_registered:
            log.debug("%s: the plugin watcher registered %s", self.name, self.endpoint.name)
        else:
            log.warning("%s: the kubelet's plugin watcher could not register %s: %s", self.name,
                        self.endpoint.name, request.error[:500])
        self.connector.feed(self.name, registration.Answered(self.endpoint.offer_attempt, request.plugin_registered,
                                                             request.error[:500]))
        return wire.RegistrationStatusResponse()


def _bind_errno(directory: SocketDir) -> int:
    """Why did bind fail?  grpcio only says it did; test what we can."""
    if directory.fd is None:
        return errno.ENOENT
    probe = f".udevdp-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600, dir_fd=directory.fd)
    except OSError as exc:
        return exc.errno or errno.EADDRNOTAVAIL
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe, dir_fd=directory.fd)
    return errno.EADDRNOTAVAIL


class Plugin:
    """One resource: its devices, its registration and the sockets serving it."""

    def __init__(self, state: ResourceState, reg: Registration) -> None:
        self.state = state
        self.reg = reg
        self.endpoints: Dict[int, Endpoint] = {}
        self.timer: Optional[asyncio.TimerHandle] = None
        self.drain: Optional[asyncio.TimerHandle] = None

    @property
    def name(self) -> str:
        return self.state.config.name

    def endpoint(self) -> Optional[Endpoint]:
        return self.endpoints.get(self.reg.endpoint)

    def status(self) -> Dict[str, Any]:
        """The registration as ``inspect`` shows it (fields of status.proto's StatusResponse)."""
        reg = self.reg
        ep = self.endpoint()
        wall = time.time() - time.monotonic()
        return {"registered": reg.registered, "last_error": reg.reason, "registrations": reg.registrations,
                "state": reg.state.name.lower(), "since": reg.since + wall,
                "stream_since": (reg.stream_since + wall) if reg.stream_since is not None else 0.0,
                "endpoint": ep.name if ep is not None and reg.offered else "", "streams_lost": reg.streams_lost,
                "registered_via": reg.via if reg.offered else ""}


class Watched:
    """A directory we serve sockets in, held by descriptor (sockdir.py) and watched with inotify
    together with its parent: the kubelet's socket directory, or plugins_registry.  Compared and
    hashed by identity: there is one per directory."""

    def __init__(self, via: str, dir: SocketDir, label: str) -> None:
        self.via = via
        self.dir = dir
        self.label = label
        self.wd_dir = -1
        self.wd_parent = -1
        self.parent_watched = ""
        self.problem = ""

    @property
    def path(self) -> str:
        return self.dir.path


class KubeletConnector:
    """Keeps every resource served on a live socket and registered with the kubelet there now."""

    def __init__(self, kubelet_dir: str, runner: commands.Runner, prestarts: PrestartLimit,
                 on_change: Callable[[str], None], fatal: Callable[[str], None],
                 register_timeout: float = 5.0, backoff_max: float = 10.0, keepalive: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 stream_timeout: float = registration.STREAM_TIMEOUT,
                 paths: Tuple[str, ...] = (registration.KUBELET_SOCKET_PATH,),
                 registry_dir: str = "") -> None:
        self.kubelet_dir = kubelet_dir
        self.paths = paths
        self.sockets: Optional[Watched] = None
        self.registry: Optional[Watched] = None
        if registration.KUBELET_SOCKET_PATH in paths:
            self.sockets = Watched(registration.KUBELET_SOCKET_PATH, SocketDir(kubelet_dir), "socket directory")
        if registration.PLUGIN_WATCHER in paths:
            self.registry = Watched(registration.PLUGIN_WATCHER, SocketDir(registry_dir), "plugins_registry directory")
        self.runner = runner
        self.prestarts = prestarts
        self.on_change = on_change
        self.fatal = fatal
        self.register_timeout = register_timeout
        self.backoff_max = backoff_max
        self.keepalive = keepalive
        self.stream_timeout = stream_timeout
        self.clock = clock
        self.loop = asyncio.get_event_loop()
        self.plugins: Dict[str, Plugin] = {}
        self.inotify = ino.Inotify()
        self._kubelet_key: Optional[tuple] = None
        self._kubelet_gen = 0
        self.kubelet_restarts = 0  # kubelet.sock creations seen (metrics)
        self._tasks: set = set()
        self._closed = False
        self.silent_since: Optional[float] = None  # the kubelet stopped answering on kubelet.sock then
        self._checker: Optional[asyncio.Future] = None

    def watched(self, via: str) -> Optional[Watched]:
        return self.registry if via == registration.PLUGIN_WATCHER else self.sockets

    def _all_watched(self) -> List[Watched]:
        return [w for w in (self.sockets, self.registry) if w is not None]

    @property
    def directory_problem(self) -> str:
        return self.sockets.problem if self.sockets is not None else ""

    # --- setup and teardown -------------------------------------------------------------------

    def start(self) -> None:
        self.loop.add_reader(self.inotify.fileno(), self.handle_inotify)
        for watched in self._all_watched():
            self._check_directory(watched, initial=True)
        self._checker = self._spawn(self._check_kubelet())

    def set_keepalive(self, keepalive: float) -> None:
        """A reload changed kubelet_keepalive: check at the new interval from now on (nothing is
        registered again: the setting is not part of any registration)."""
        if keepalive == self.keepalive:
            return
        self.keepalive = keepalive
        if self._checker is not None and not self._closed:
            self._checker.cancel()
            self._checker = self._spawn(self._check_kubelet())

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.inotify.fileno())
        for plugin in self.plugins.values():
            self._cancel_timers(plugin)
        stops = [ep.stop(grace=None) for p in self.plugins.values() for ep in p.endpoints.values()]
        self.plugins.clear()
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.inotify.close()
        for watched in self._all_watched():
            watched.dir.close()

    # --- resources --------------------------------------------------------------------------------

    def add(self, state: ResourceState) -> Plugin:
        plugin = Plugin(state, Registration(state.config.name, since=self.clock()))
        self.plugins[plugin.name] = plugin
        self.feed(plugin.name, registration.Start())
        return plugin

    async def remove(self, name: str) -> None:
        plugin = self.plugins.pop(name, None)
        if plugin is None:
            return
        self._cancel_timers(plugin)
        await asyncio.gather(*(ep.stop() for ep in plugin.endpoints.values()), return_exceptions=True)
        plugin.endpoints.clear()

    def reregister(self, name: str, why: str) -> None:
        self.feed(name, registration.Reregister(why))

    # --- the state machines ---------------------------------------------------------------------

    def env(self) -> registration.Env:
        return registration.Env(now=self.clock(), kubelet=self.kubelet(), next_endpoint=next_socket_number,
                                directory_problem=self.directory_problem, backoff_max=self.backoff_max,
                                stream_timeout=self.stream_timeout, paths=self.paths,
                                registry_problem=self.registry.problem if self.registry is not None else "",
                                fallback_timeout=3 * self.register_timeout)

    def feed(self, name: str, event: registration.Event) -> None:
        """Hand ``event`` to the resource's state machine and carry out what it decides."""
        plugin = self.plugins.get(name)
        if plugin is None or self._closed:
            return
        before = (plugin.reg.state, plugin.reg.reason)
        actions = registration.step(plugin.reg, event, self.env())
        log.debug("%s: %s in %s -> %s %s", name, type(event).__name__, before[0].name, plugin.reg.state.name,
                  [type(a).__name__ for a in actions if not isinstance(a, registration.Log)])
        for action in actions:
            self._execute(plugin, action)
        self._arm_timer(plugin)
        if (plugin.reg.state, plugin.reg.reason) != before:
            self.on_change(name)

    def _execute(self, plugin: Plugin, action: registration.Action) -> None:
        if isinstance(action, registration.Serve):
            try:
                plugin.endpoints[action.endpoint] = Endpoint(plugin, self, action.endpoint, action.via)
            except OSError as exc:
                if exc.errno == errno.EROFS:
                    watched = self.watched(action.via)
                    where = watched.path if watched is not None else self.kubelet_dir
                    self.fatal(f"cannot create sockets in {where}: read-only here (under systemd: the "
                               "directory was replaced after the service started, outside its ReadWritePaths=)")
                    return
                why = exc.strerror or str(exc)
                self.loop.call_soon(self.feed, plugin.name, registration.ServeFailed(action.endpoint, why))
        elif isinstance(action, registration.Retire):
            endpoint = plugin.endpoints.pop(action.endpoint, None)
            if endpoint is not None:
                self._spawn(endpoint.stop())
        elif isinstance(action, (registration.EndStreams, registration.WatchDrain)):
            endpoint = plugin.endpoints.get(action.endpoint)
            if endpoint is None:
                self.loop.call_soon(self.feed, plugin.name, registration.Drained(action.endpoint))
            else:
                if isinstance(action, registration.EndStreams):
                    endpoint.servicer.end_streams()
                self._watch_drain(plugin, endpoint)
        elif isinstance(action, registration.Offer):
            endpoint = plugin.endpoints.get(action.endpoint)
            if endpoint is not None:
                endpoint.offer_attempt = action.attempt
        elif isinstance(action, registration.Register):
            self._spawn(self._register_call(plugin, action.endpoint, action.attempt))
        elif isinstance(action, registration.Log):
            log.log(action.level, "%s", action.message)

    def _arm_timer(self, plugin: Plugin) -> None:
        if plugin.timer is not None:
            plugin.timer.cancel()
            plugin.timer = None
        deadline = plugin.reg.deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            plugin.timer = self.loop.call_later(delay, self.feed, plugin.name, registration.Tick())

    def _cancel_timers(self, plugin: Plugin) -> None:
        for handle in (plugin.timer, plugin.drain):
            if handle is not None:
                handle.cancel()
        plugin.timer = plugin.drain = None

    def _watch_drain(self, plugin: Plugin, endpoint: Endpoint) -> None:
        """Tell the machine when the kubelet has closed its connection to ``endpoint`` (bounded by its timer)."""
        def check() -> None:
            plugin.drain = None
            if self.plugins.get(plugin.name) is not plugin or plugin.reg.state is not State.DRAINING:
                return
            if endpoint.connections() == 0:
                self.feed(plugin.name, registration.Drained(endpoint.seq))
            else:
                plugin.drain = self.loop.call_later(_DRAIN_POLL, check)

        if plugin.drain is not None:
            plugin.drain.cancel()
        plugin.drain = self.loop.call_later(_DRAIN_POLL, check)

    def _spawn(self, coro: Any) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _register_call(self, plugin: Plugin, seq: int, attempt: int) -> None:
        endpoint = plugin.endpoints.get(seq)
        if endpoint is None:
            self.feed(plugin.name, registration.Answered(attempt, False, "our socket was retired meanwhile"))
            return
        request = wire.RegisterRequest(version=API_VERSION, endpoint=endpoint.name, resource_name=plugin.name,
                                      options=options_for(plugin.state.config))
        try:
            await endpoint.started  # serving before Register: the kubelet dials back during it
            assert self.sockets is not None
            channel = grpc.aio.insecure_channel("unix:" + self.sockets.dir.at(KUBELET_SOCKET), options=CHANNEL_OPTIONS)
            try:
                await wire.Stub(channel, (wire.REGISTER,)).Register(request, timeout=self.register_timeout)
            finally:
                await channel.close()
            ok, why = True, ""
        except grpc.aio.AioRpcError as exc:
            ok, why = False, f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken channel must not stop the daemon
            ok, why = False, str(exc) or type(exc).__name__
        self.feed(plugin.name, registration.Answered(attempt, ok, why))

    # --- what the kubelet is doing ---------------------------------------------------------------

    def _kubelet_socket(self) -> Optional[str]:
        """Where to reach kubelet.sock now (through our descriptor of the socket directory); None if absent."""
        if self.sockets is None:
            return os.path.join(self.kubelet_dir, KUBELET_SOCKET) if self.kubelet_present() else None
        return self.sockets.dir.at(KUBELET_SOCKET) if self.kubelet() is not None else None

    async def _check_kubelet(self) -> None:
        """Every ``keepalive`` seconds while a resource has the kubelet's stream: does the kubelet answer?

        One connection at a time.  One unanswered within KEEPALIVE_TIMEOUT makes the streaming resources
        STALLED; the same connection then waits on, and its answer (the kubelet runs again) makes them
        REGISTERED at once.  A refused or closed connection changes nothing: a kubelet that stopped or
        restarted closed its streams too, and those say so.
        """
        while True:
            await asyncio.sleep(self.keepalive)
            timeout = min(KEEPALIVE_TIMEOUT, self.keepalive)
            if not any(p.reg.state in registration.STREAMING for p in self.plugins.values()):
                continue
            path = self._kubelet_socket()
            if path is None:
                continue
            check = asyncio.ensure_future(kubelet_answers(path))
            try:
                done, _ = await asyncio.wait({check}, timeout=timeout)
                if not done:
                    self._kubelet_silent(f"the kubelet has not answered on {KUBELET_SOCKET} for {timeout:g} s "
                                         "(stopped or hung?)")
                    await asyncio.wait({check})
                check.result()
            except (OSError, ValueError) as exc:
                log.debug("checking that the kubelet answers on %s: %s", KUBELET_SOCKET, exc)
                continue
            finally:
                check.cancel()
            self._kubelet_answers()

    def _kubelet_silent(self, why: str) -> None:
        self.silent_since = self.clock()
        stalled = [name for name, p in self.plugins.items() if p.reg.state is State.REGISTERED]
        log.warning("%s: %d resource(s) no longer count as registered until it answers; their streams are kept",
                    why, len(stalled))
        for name in stalled:
            self.feed(name, registration.KubeletSilent(why))

    def _kubelet_answers(self) -> None:
        if self.silent_since is None:
            return
        silent = self.clock() - self.silent_since
        self.silent_since = None
        back = [name for name, p in self.plugins.items() if p.reg.state is State.STALLED]
        log.info("the kubelet answers on %s again, after %.1f s; %d resource(s) registered again", KUBELET_SOCKET,
                 silent, len(back))
        for name in back:
            self.feed(name, registration.KubeletAnswers())

    def kubelet(self) -> Optional[registration.KubeletId]:
        """kubelet.sock now: its inode and how many times we saw it created; None when absent."""
        if self.sockets is None or self.sockets.problem:
            return None
        st = self.sockets.dir.lstat(KUBELET_SOCKET)
        if st is None or not stat.S_ISSOCK(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino)
        if key != self._kubelet_key:
            self._kubelet_key = key
            self._kubelet_gen += 1
        return (st.st_dev, st.st_ino, self._kubelet_gen)

    def kubelet_present(self) -> bool:
        if self.sockets is None:  # plugin watcher only: kubelet.sock still tells whether a kubelet runs
            try:
                return stat.S_ISSOCK(os.lstat(os.path.join(self.kubelet_dir, KUBELET_SOCKET)).st_mode)
            except OSError:
                return False
        return self.kubelet() is not None

    def handle_inotify(self) -> None:
        """Read the watches' events and act once on the batch."""
        try:
            events = self.inotify.read()
        except OSError as exc:  # pragma: no cover - EBADF at shutdown
            log.debug("inotify read failed: %s", exc)
            return
        ours_gone: List[tuple] = []
        kubelet_created = kubelet_removed = overflow = False
        recheck: List[Watched] = []
        by_socket = {(ep.via, ep.name): (p.name, seq) for p in self.plugins.values()
                     for seq, ep in p.endpoints.items()}
        for event in events:
            if event.mask & ino.IN_Q_OVERFLOW:
                overflow = True
                continue
            for watched in self._all_watched():
                if event.wd == watched.wd_dir and watched.wd_dir >= 0:
                    if event.mask & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_IGNORED):
                        recheck.append(watched)
                    elif event.mask & (ino.IN_DELETE | ino.IN_MOVED_FROM):
                        if (watched.via, event.name) in by_socket:
                            ours_gone.append(by_socket[(watched.via, event.name)])
                        elif event.name == KUBELET_SOCKET and watched is self.sockets:
                            kubelet_removed = True
                    elif event.mask & (ino.IN_CREATE | ino.IN_MOVED_TO) and event.name == KUBELET_SOCKET \
                            and watched is self.sockets:
                        kubelet_created = True
                        self._kubelet_key = None  # a new kubelet.sock, even if its inode number is reused
                elif event.wd == watched.wd_parent and watched.wd_parent >= 0:
                    if event.mask & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_IGNORED) \
                            or event.name == os.path.basename(watched.path) \
                            or watched.parent_watched != os.path.dirname(watched.path):
                        recheck.append(watched)  # our directory's name changed, or an ancestor we wait on did
            # Events of watches already replaced (IN_IGNORED of a removed watch) match none: ignored.
        if overflow:
            log.warning("inotify queue overflow; checking the directories and every registration")
            recheck = self._all_watched()
        changed = False
        for watched in dict.fromkeys(recheck):
            changed |= self._check_directory(watched)
        if changed:
            return  # lost or back: the machines were told
        for name, seq in ours_gone:
            plugin = self.plugins.get(name)
            if plugin is not None and seq in plugin.endpoints and not plugin.endpoints[seq].alive():
                self.feed(name, registration.SocketGone(seq))
        if overflow:
            self._verify_sockets()
        kubelet = self.kubelet()
        if kubelet is not None and (kubelet_created or overflow):
            if kubelet_created:
                self.kubelet_restarts += 1
                log.info("kubelet.sock created: registering with the kubelet")
            for name in list(self.plugins):
                self.feed(name, registration.KubeletAppeared(kubelet))
        elif kubelet is None and kubelet_removed:
            log.info("kubelet.sock removed: the kubelet is stopping or restarting")
            for name in list(self.plugins):
                self.feed(name, registration.KubeletGone())

    def _verify_sockets(self) -> None:
        for plugin in list(self.plugins.values()):
            endpoint = plugin.endpoint()
            if endpoint is not None and not endpoint.alive():
                self.feed(plugin.name, registration.SocketGone(endpoint.seq))

    def verify(self) -> List[str]:
        """SIGUSR1: register again whatever is not registered with the kubelet there now; return those."""
        for watched in self._all_watched():
            self._check_directory(watched)
        self._verify_sockets()
        redone = []
        for name in list(self.plugins):
            plugin = self.plugins[name]
            before = (plugin.reg.attempt, plugin.reg.state)
            self.feed(name, registration.Verify())
            if (plugin.reg.attempt, plugin.reg.state) != before:
                redone.append(name)
        stalled = [name for name, plugin in self.plugins.items() if plugin.reg.state is State.STALLED]
        if redone:
            log.info("re-registering %s", ", ".join(redone))
        if stalled:
            # Registering again would wait on the same kubelet that does not answer the check.
            log.info("%s: registered, but the kubelet does not answer on %s; not registering again: the "
                     "resource counts as registered once the kubelet answers", ", ".join(stalled), KUBELET_SOCKET)
        if not redone and not stalled:
            log.info("every resource is registered with the current kubelet, or waiting for one; nothing to do")
        return redone

    # --- the directories ------------------------------------------------------------------------------

    def _check_directory(self, watched: Watched, initial: bool = False) -> bool:
        """Is the directory still there?  Handle a loss or a return; True when either happened.

        One WARNING per event: the loss (or, at start, the problem); a return is INFO.
        """
        changed = False
        try:
            if watched.dir.fd is not None:
                lost = watched.dir.check()
                if not lost:
                    self._watch_parent(watched)
                    return False
                log.warning("%s: %s; our sockets in it were removed", watched.label, lost)
                self._abandon_directory(watched)
                self._set_problem(watched, lost)
                changed = True
            problem = watched.dir.open()
        except RestartNeeded as exc:
            self.fatal(str(exc))
            return True
        self._watch_parent(watched)
        if problem:
            if problem != watched.problem:
                if changed:
                    log.info("%s: %s; waiting for a directory there", watched.label, problem)
                else:
                    log.warning("%s: %s; waiting for a directory there (nothing is served there until then)",
                                watched.label, problem)
                self._set_problem(watched, problem)
                changed = True
            return changed
        self._watch_dir(watched)
        self._remove_stale_sockets(watched)
        if watched.problem:
            log.info("%s %s is usable: serving and registering", watched.label, watched.path)
        watched.problem = ""
        if not initial:
            for name in list(self.plugins):
                self.feed(name, registration.DirectoryBack(watched.via))
        return True

    def _set_problem(self, watched: Watched, problem: str) -> None:
        watched.problem = problem
        for name in list(self.plugins):
            self.feed(name, registration.DirectoryLost(f"{watched.label}: {problem}", watched.via))

    def _abandon_directory(self, watched: Watched) -> None:
        """The directory was moved or replaced: take our sockets out of it and let it go."""
        for plugin in self.plugins.values():
            for endpoint in plugin.endpoints.values():
                if endpoint.via == watched.via:
                    watched.dir.remove_socket(endpoint.name, endpoint.inode)
        if watched.wd_dir >= 0:
            wd, watched.wd_dir = watched.wd_dir, -1
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(wd)
        watched.dir.close()

    def _watch_dir(self, watched: Watched) -> None:
        mask = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_DELETE_SELF
                | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)
        try:
            watched.wd_dir = self.inotify.add_watch(watched.dir.watch_path(), mask)
        except OSError as exc:
            log.error("cannot watch %s: %s; its changes are seen only through SIGUSR1", watched.path, exc.strerror)
            watched.wd_dir = -1

    def _watch_parent(self, watched: Watched) -> None:
        """Watch the directory's parent (or, while that is missing, its nearest existing ancestor)."""
        parent = os.path.dirname(watched.path)
        while parent != "/" and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        if parent == watched.parent_watched and watched.wd_parent >= 0:
            return
        if watched.wd_parent >= 0 and not any(w.wd_parent == watched.wd_parent for w in self._all_watched()
                                              if w is not watched):
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(watched.wd_parent)
        watched.wd_parent = -1
        mask = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_DELETE_SELF
                | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)
        try:
            watched.wd_parent = self.inotify.add_watch(parent, mask)
            watched.parent_watched = parent
        except OSError as exc:
            log.warning("cannot watch %s: %s", parent, exc.strerror)
            watched.parent_watched = ""

    def _remove_stale_sockets(self, watched: Watched) -> None:
        """Sockets of ours that no live process serves (left by a crash or kill -9)."""
        ours = {ep.name for p in self.plugins.values() for ep in p.endpoints.values() if ep.via == watched.via}
        for name in watched.dir.names():
            if not name.startswith(SOCKET_PREFIX) or name in ours:
                continue
            st = watched.dir.lstat(name)
            if st is None or not stat.S_ISSOCK(st.st_mode) or watched.dir.answers(name):
                continue  # not a socket, or another running instance serves it
            if watched.dir.remove_socket(name, st.st_ino):
                log.info("removed stale socket %s from %s", name, watched.path)

    # --- readiness and status -------------------------------------------------------------------------

    def settled(self) -> bool:
        """Every resource is registered with a live stream, or (no kubelet) served and waiting."""
        if all(p.reg.registered for p in self.plugins.values()):
            return True
        if self.kubelet_present() or any(w.problem for w in self._all_watched()):
            return False
        return all(p.endpoints for p in self.plugins.values())

    def errors(self) -> List[str]:
        return sorted({f"{p.name}: {p.reg.reason}" for p in self.plugins.values()
                       if not p.reg.registered and p.reg.reason})

    def summary(self) -> str:
        total = len(self.plugins)
        problems = [f"{w.label}: {w.problem}" for w in self._all_watched() if w.problem]
        if problems and len(problems) == len(self._all_watched()):
            return "serving nothing: " + "; ".join(problems)
        registered = sum(1 for p in self.plugins.values() if p.reg.registered)
        if not self.kubelet_present() and registered == 0:
            where = os.path.join(self.kubelet_dir, KUBELET_SOCKET)
            return f"serving {total} resource(s); waiting for the kubelet ({where})"
        text = f"{registered}/{total} resource(s) registered with the kubelet (stream connected)"
        waiting = [p for p in self.plugins.values() if not p.reg.registered]
        if waiting:
            text += "; " + "; ".join(f"{p.name}: {p.reg.state.value}" for p in waiting[:3])
            if len(waiting) > 3:
                text += f"; and {len(waiting) - 3} more"
        return text

    async def probe(self, timeout: float = 2.0) -> Optional[str]:
        """Call one of our own sockets as the kubelet would; None when it answered, else why not."""
        endpoint = next((ep for p in self.plugins.values() for ep in p.endpoints.values()
                         if not ep.stopped and not ep.servicer.closing), None)
        if endpoint is None:
            return None
        channel = grpc.aio.insecure_channel("unix:" + endpoint.bind_path, options=CHANNEL_OPTIONS)
        try:
            await wire.Stub(channel, (wire.GET_DEVICE_PLUGIN_OPTIONS,)).GetDevicePluginOptions(wire.Empty(),
                                                                                             timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if endpoint.stopped:
                return None  # retired meanwhile
            return f"{endpoint.name}: {exc.code().name}: {exc.details()}"
        finally:
            await channel.close()
        return None
