"""A stand-in kubelet for the tests: the Registration side of the device plugin API, with the
behaviours of real kubelet releases.  A test double: it is not part of the shipped package.

    python -m tests.standin --kubelet-dir DIR [--state-file FILE] [--behaviour 1.20|1.25|1.36]
    python3 standin.py --kubelet-dir DIR ...    # this file alone, beside an installed udev_device_plugin

It imports nothing of the project but ``udev_device_plugin.api`` (and grpc), so the system tests
copy this one file into their containers.  Started from the command line (or ``start()``), it
refuses a directory where something already answers on ``kubelet.sock``: it never takes over a live
kubelet's directory, whose sockets it would delete.

What it copies from the kubelet's device manager (../shared/KUBELET.md; kubernetes/kubernetes
``pkg/kubelet/cm/devicemanager``, ``manager.go``, ``endpoint.go`` and ``plugin/v1beta1``):

Every behaviour
- start: delete every UNIX socket in the directory (``cleanup="sockets"``, current kubelets) or every
  entry but directories and the checkpoint (``cleanup="all"``, the first versions and 1.20's
  ``removeContents``), then serve a new ``kubelet.sock``;
- Register checks the version and the extended resource name (``IsExtendedResourceName``); the
  endpoint is joined to the directory, unchecked;
- ListAndWatch is opened without a deadline and never cancelled by the kubelet; every message on any
  stream of a resource replaces the resource's device list (the kubelet's callback is keyed by
  resource name); capacity is every device, allocatable the healthy ones;
- a disconnected plugin (``PluginDisconnected``, keyed by resource name) makes every device of the
  resource unhealthy and marks the resource's current endpoint stopped, until a new registration;
- Allocate, GetPreferredAllocation and GetDevicePluginOptions carry no deadline (PreStartContainer:
  30 s); ``allocate()`` and the others bound only the *test's* wait (``wait=``, then `NoAnswer`).

``behaviour="1.20"`` (``manager.go``/``endpoint.go`` of 1.20, the OpenShift 4.7 era)
- Register validates and answers OK at once, then dials in the background (``go m.addEndpoint(r)``):
  a failed dial is only logged (``dial_failures``); the options are the RegisterRequest's own;
- a new registration replaces the resource's endpoint without stopping the old one; when an
  endpoint's stream ends, its connection is closed and the resource is marked unhealthy only if that
  endpoint is still the current one.

``behaviour="1.25"`` (the ``plugin/v1beta1`` server of PR #109016, 1.25 to 1.35)
- Register dials synchronously (10 s) and calls GetDevicePluginOptions (no deadline) before answering;
- clients are kept in a map keyed by RESOURCE NAME, entered *before* the dial: a second Register
  overwrites the entry without closing the old connection, and a failed one deletes whatever entry the
  name has; a dialled connection whose GetDevicePluginOptions failed is never closed;
- when a client's stream ends, its cleanup looks the client up BY NAME and disconnects that one — after
  a re-registration the new client (kubernetes#121994): its connection is closed (its stream ends), the
  resource goes unhealthy, and the old client's own connection stays open (``leaked``).

``behaviour="1.36"`` (PR #135437)
- the same server with clients keyed by socket path: a stream's end disconnects only the client of
  that path (the disconnect still marks the whole resource unhealthy: ``PluginDisconnected`` is keyed
  by resource name);
- a Register naming a path it still holds a client for is refused.  Upstream appends a duplicate entry
  instead (PR #139338: re-using a socket path is unsupported); refusing makes a plugin that does so
  fail loudly in our tests.

Faults a test can trigger: ``drop(resource)`` (the kubelet ends a stream on its own: its side
cancels, no reconnect), ``touch_socket()`` (chmod/chown/utime of kubelet.sock, same inode),
``recreate_socket()`` (a new kubelet.sock without a restart, as the newest kubelets do when their
serve fails), ``restart()``.  What it records — registrations, refusals, dial failures, each
ListAndWatch message with its receipt times — is bounded in memory.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from collections import deque
from concurrent import futures
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple, Union

if __name__ == "__main__":
    # gRPC's core logs connection chatter at INFO; must be set before grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402

from udev_device_plugin import api  # noqa: E402

log = logging.getLogger("standin")

BEHAVIOURS = ("1.20", "1.25", "1.36")
NEWEST = BEHAVIOURS[-1]
CLEANUPS = ("sockets", "all")
KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT = "kubelet_internal_checkpoint"
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0  # the kubelet's dial (grpc.WithBlock under a 10 s context)
PRESTART_TIMEOUT = 30.0  # the kubelet's only deadline on a plugin call
DEFAULT_WAIT = 30.0  # how long a test waits for an answer the kubelet would wait for forever
# Bounds: a long-running stand-in must not grow.
RECEIVED_KEPT = 10000  # ListAndWatch messages kept per resource
RECORDS_KEPT = 10000  # registrations, refusals, dial failures kept
LEAKED_KEPT = 1000  # connections the kubelet never closes; beyond this the oldest is closed after all
MAX_RESOURCES = 1000
REGISTRATION_WORKERS = 64  # Register handlers may block (a hung GetDevicePluginOptions); Go has no such limit

# A call that ends because the plugin failed, the call was cancelled or the channel closed under it.
_CALL_ERRORS = (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError, ValueError)

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_QUALIFIED_NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


class NoAnswer(TimeoutError):
    """The plugin did not answer a call within the test's own bound (the kubelet would still wait)."""


class LiveKubelet(RuntimeError):
    """Something answers on kubelet.sock in the directory: the stand-in refuses to take it over."""


class Received(NamedTuple):
    """One ListAndWatch message as the stand-in got it, for tests and benchmarks that time hotplug."""

    seq: int  # 1 for the resource's first message; equals ``messages[resource]`` after it
    monotonic: float  # time.monotonic() on receipt: when the message's last byte was read
    wall: float  # time.time() on receipt
    devices: Dict[str, Dict[str, Any]]  # ID -> {"id", "health", "numa_nodes"}


def is_extended_resource_name(name: str) -> bool:
    """The kubelet's ``v1helper.IsExtendedResourceName``: contains ``/``, not in a ``kubernetes.io/``
    namespace, and ``requests.<name>`` is a qualified name.  Written apart from the daemon's own check,
    so that a mistake there cannot hide here."""
    if "/" not in name or "kubernetes.io/" in name or name.startswith("requests."):
        return False
    parts = ("requests." + name).split("/")
    if len(parts) != 2:
        return False
    prefix, short = parts
    return (0 < len(prefix) <= 253 and _DNS1123_SUBDOMAIN.fullmatch(prefix) is not None
            and 0 < len(short) <= 63 and _QUALIFIED_NAME_PART.fullmatch(short) is not None)


def kubelet_answers(path: str) -> bool:
    """Whether something accepts connections on the UNIX socket ``path`` (a live kubelet)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False  # nothing there, or a stale socket file nobody listens on
    except OSError as exc:
        if exc.errno in (errno.ENOTSOCK, errno.ENOTDIR):
            return False
        raise LiveKubelet(f"{path}: cannot tell whether a kubelet answers there: {exc}") from None
    finally:
        probe.close()


_tmp_names = itertools.count(1)


def write_file_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: a new temporary file in the same directory, created with
    O_EXCL|O_NOFOLLOW (a planted symlink is never followed), renamed over the target."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.{next(_tmp_names)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)


def append_bounded(records: List[Any], item: Any, limit: int = RECORDS_KEPT) -> None:
    """Append to a plain list (tests compare these with lists), dropping the oldest beyond ``limit``."""
    records.append(item)
    if len(records) > limit:
        del records[:len(records) - limit]


def _cancel_ready(ready: grpc.Future) -> None:
    """Stop waiting for a channel to become ready (grpcio raises TypeError cancelling one that is done)."""
    if not ready.done():
        try:
            ready.cancel()
        except TypeError:
            pass


class _Closed(Exception):
    """The client was closed (the stand-in is stopping) before the call could start."""


def _why(exc: BaseException, dial_timeout: float) -> str:
    if isinstance(exc, grpc.FutureTimeoutError):
        return f"no connection within {dial_timeout:g} s"
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, (_Closed, grpc.FutureCancelledError)):
        return "the kubelet is stopping"
    return f"{type(exc).__name__}: {exc}"


class _Client:
    """The kubelet's connection to one registered plugin socket (its ``client``/``endpoint``)."""

    _serials = itertools.count(1)

    def __init__(self, kubelet: StandInKubelet, resource: str, endpoint: str) -> None:
        self.kubelet = kubelet
        self.resource = resource
        self.endpoint = endpoint
        self.path = os.path.join(kubelet.directory, endpoint)
        self.serial = next(self._serials)
        # One connection per client, as a Go ClientConn: no subchannel shared with another channel.
        self.channel = grpc.insecure_channel("unix:" + self.path, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = api.Stub(self.channel)
        self.options: Any = None
        self.connected = False  # its ListAndWatch stream is open
        self.closed = False
        self.ended = ""  # why its stream ended
        self.thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._ready: Optional[grpc.Future] = None
        self._stream: Any = None

    def __repr__(self) -> str:
        return f"<client #{self.serial} {self.resource} {self.endpoint}>"

    def dial(self, timeout: float) -> None:
        """Wait until the socket accepts a connection, at most ``timeout`` s (the kubelet's blocking dial)."""
        with self._lock:
            if self.closed:
                raise _Closed()
            ready = self._ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=timeout)
        finally:
            with self._lock:
                self._ready = None
            _cancel_ready(ready)

    def get_options(self) -> None:
        """GetDevicePluginOptions without a deadline, as the kubelet's PluginConnected calls it."""
        self.options = self.stub.GetDevicePluginOptions(api.Empty())

    def run(self) -> None:
        """Open ListAndWatch (no deadline) and read it in a thread of its own until it ends."""
        with self._lock:
            if self.closed:
                raise _Closed()
            # Read as bytes and parsed here: the time a message arrived is when its last byte was read,
            # not when this Python process is done building 10,000 objects of it (a Go kubelet's
            # parse takes a fraction of a CPython one's).
            self._stream = self.channel.unary_stream(api.LIST_AND_WATCH.path,
                                                     request_serializer=api.Empty.SerializeToString)(api.Empty())
            self.connected = True
            self.thread = threading.Thread(target=self._read, name=f"standin-{self.resource}#{self.serial}",
                                           daemon=True)
            self.thread.start()

    def _read(self) -> None:
        why = "the plugin ended the stream"
        try:
            for raw in self._stream:
                arrived = time.monotonic()
                self.kubelet._update(self, list(api.ListAndWatchResponse.FromString(raw).devices), arrived)
        except grpc.RpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - a bug here must still end the stream as the kubelet would
            log.exception("stand-in: %s: reading ListAndWatch failed", self.resource)
            why = f"stand-in error: {exc!r}"
        finally:
            with self.kubelet.cond:
                self.connected = False
                self.ended = why
            log.info("stand-in: %s: stream from %s ended (%s)", self.resource, self.endpoint, why)
            self.kubelet._stream_ended(self)

    def cancel_stream(self) -> None:
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def close(self) -> None:
        """Close the connection (ClientConn.Close): every call on it, the stream too, ends."""
        with self._lock:
            self.closed = True
            ready = self._ready
        if ready is not None:
            _cancel_ready(ready)
        self.channel.close()

    def finished(self) -> bool:
        return self.closed and (self.thread is None or not self.thread.is_alive())

    def join(self, timeout: float) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


# --- the registration handlers of each release --------------------------------------------------------

class _Kubelet120:
    """``ManagerImpl.Register``/``addEndpoint``/``runEndpoint`` of 1.20 (manager.go, endpoint.go)."""

    def __init__(self, kubelet: StandInKubelet) -> None:
        self.k = kubelet

    def register(self, request: Any) -> Optional[str]:
        k = self.k
        k._accepted(request)
        copy = api.RegisterRequest()
        copy.CopyFrom(request)
        # go m.addEndpoint(r): the plugin has its answer before the kubelet has even dialled.
        k._spawn(lambda: self._add_endpoint(copy), f"standin-dial-{request.resource_name}")
        return None

    def _add_endpoint(self, request: Any) -> None:
        k = self.k
        client = k._new_client(request.resource_name, request.endpoint)
        if client is None:
            return
        try:
            client.dial(k.dial_timeout)
        except (_Closed, *_CALL_ERRORS) as exc:
            client.close()
            k._dial_failed(client, _why(exc, k.dial_timeout))  # logged only: the plugin never hears
            return
        with k.cond:
            # registerEndpoint: the options are the request's own; the old endpoint is not stopped.
            client.options = request.options if request.HasField("options") else None
            k._plugin_connected(client)
            try:
                client.run()
            except (_Closed, ValueError):
                return
        k._write_state()

    def stream_ended(self, client: _Client) -> None:
        k = self.k
        client.close()  # e.stop()
        with k.cond:
            if k.clients.get(client.resource) is client:
                k._mark_unhealthy(client.resource)
                k.stopped_at[client.resource] = time.time()
            k.cond.notify_all()
        k._write_state()

    def stop(self) -> None:
        with self.k.cond:
            clients = list(self.k.clients.values())
        for client in clients:  # ManagerImpl.Stop: e.stop() for every endpoint
            client.close()


class _PluginServer:
    """The ``plugin/v1beta1`` registration server (PR #109016): keyed by resource name in 1.25-1.35
    (``by_path=False``), by resource name and socket path since 1.36 (PR #135437)."""

    def __init__(self, kubelet: StandInKubelet, by_path: bool) -> None:
        self.k = kubelet
        self.by_path = by_path
        self.clients: Dict[Union[str, Tuple[str, str]], _Client] = {}

    def _key(self, resource: str, path: str) -> Union[str, Tuple[str, str]]:
        return (resource, path) if self.by_path else resource

    def register(self, request: Any) -> Optional[str]:
        k = self.k
        name = request.resource_name
        path = os.path.join(k.directory, request.endpoint)
        key = self._key(name, path)
        with k.cond:
            if self.by_path and any(c.path == path for c in self.clients.values()):
                return f"a plugin is already registered on socket {path}"
            client = k._new_client(name, request.endpoint)
            if client is None:
                return "the kubelet is stopping"
            self.clients[key] = client  # registerClient, before Connect: overwrites, closes nothing
        dialled = False
        try:
            client.dial(k.dial_timeout)
            dialled = True
            client.get_options()  # PluginConnected: GetDevicePluginOptions, no deadline
        except (_Closed, *_CALL_ERRORS) as exc:
            with k.cond:
                self.clients.pop(key, None)  # deregisterClient: whatever entry the key has now
            if dialled:
                k._leak(client)  # Connect's conn is not closed when PluginConnected fails (kubernetes#124716)
            else:
                client.close()
            return f"failed to dial device plugin {path}: {_why(exc, k.dial_timeout)}"
        with k.cond:
            k._plugin_connected(client)
            try:
                client.run()  # go s.runClient(name, c)
            except (_Closed, ValueError):
                return "the kubelet is stopping"
            k._accepted(request)
        k._write_state()
        return None

    def stream_ended(self, client: _Client) -> None:
        """``runClient`` after ``c.Run()``: look the client up again and disconnect what is found."""
        k = self.k
        key = self._key(client.resource, client.path)
        with k.cond:
            found = self.clients.pop(key, None)  # getClient + deregisterClient
        if found is not None:
            found.close()  # c.Disconnect(): closes *that* client's connection (1.25: maybe a newer one's)
            with k.cond:
                k._plugin_disconnected(client.resource)
        if found is not client:
            k._leak(client)  # nobody closes the ended client's own connection
        k._write_state()

    def stop(self) -> None:
        k = self.k
        with k.cond:
            clients = list(self.clients.values())
            self.clients.clear()
        for client in clients:  # Stop: visitClients -> disconnectClient
            client.close()
            with k.cond:
                k._plugin_disconnected(client.resource)


class _PluginWatcher:
    """The kubelet's plugin watcher (pkg/kubelet/pluginmanager): sockets created in (or found at start
    in) its directory are dialled, asked GetInfo (1 s), registered, and told NotifyRegistrationStatus;
    a socket removed is deregistered.  Names starting with '.' are ignored.  One thread reads inotify;
    each registration runs in a thread of its own, as the reconciler's operations do."""

    def __init__(self, kubelet: StandInKubelet, directory: str) -> None:
        from udev_device_plugin import inotify as ino  # the stand-in's only other import of the project

        self.ino = ino
        self.kubelet = kubelet
        self.directory = directory
        self.inotify = ino.Inotify()
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="standin-plugin-watcher", daemon=True)
        self._lock = threading.Lock()
        self._channels: Set[grpc.Channel] = set()  # registrations under way: closed when the kubelet stops
        self._stopped = False

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        self.inotify.add_watch(self.directory, self.ino.IN_CREATE | self.ino.IN_DELETE | self.ino.IN_MOVED_TO
                               | self.ino.IN_MOVED_FROM)
        for name in sorted(os.listdir(self.directory)):  # traversePluginDir at start
            self._created(name)
        self.thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            channels = list(self._channels)
        for channel in channels:  # a dying kubelet's dials end with it
            channel.close()
        os.write(self._wake_w, b"x")
        self.thread.join(10)
        self.inotify.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        import select

        while True:
            ready, _, _ = select.select([self.inotify.fileno(), self._wake_r], [], [])
            if self._wake_r in ready:
                return
            for event in self.inotify.read():
                if event.mask & (self.ino.IN_CREATE | self.ino.IN_MOVED_TO):
                    self._created(event.name)
                elif event.mask & (self.ino.IN_DELETE | self.ino.IN_MOVED_FROM):
                    self.kubelet.deregister_watched(os.path.join(self.directory, event.name))

    def _created(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            return
        if name.startswith(".") or not is_socket:
            return
        self.kubelet._spawn(lambda: self._register(path), f"standin-watch-{name}")

    def _register(self, path: str) -> None:
        k = self.kubelet
        channel = grpc.insecure_channel("unix:" + path, options=[("grpc.use_local_subchannel_pool", 1)])
        record: Dict[str, Any] = {"socket": path, "resource": "", "error": "", "time": time.time()}
        with self._lock:
            if self._stopped:
                channel.close()
                return
            self._channels.add(channel)
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=k.dial_timeout)
                info = api.Stub(channel).GetInfo(api.InfoRequest(), timeout=1)
            except (*_CALL_ERRORS,) as exc:
                record["error"] = f"GetInfo failed: {_why(exc, k.dial_timeout)}"  # the reconciler retries
                return
            record["resource"] = info.name
            error = k.register_watched(path, info)
            record["error"] = error or ""
            try:
                api.Stub(channel).NotifyRegistrationStatus(
                    api.RegistrationStatus(plugin_registered=error is None, error=error or ""), timeout=5)
            except (*_CALL_ERRORS,) as exc:
                record["error"] = record["error"] or f"NotifyRegistrationStatus failed: {_why(exc, 5)}"
        finally:
            with self._lock:
                self._channels.discard(channel)
            channel.close()
            with k.cond:
                append_bounded(k.watcher_events, record)
                k.cond.notify_all()
            k._write_state()


class StandInKubelet:
    """A kubelet's device manager, as far as a device plugin can tell (see the module docstring)."""

    def __init__(self, directory: str, state_file: Optional[str] = None, behaviour: str = NEWEST,
                 cleanup: Optional[str] = None, dial_timeout: float = DIAL_TIMEOUT,
                 plugins_registry: Optional[str] = None) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r}: accepted: {', '.join(BEHAVIOURS)}")
        if cleanup is not None and cleanup not in CLEANUPS:
            raise ValueError(f"cleanup {cleanup!r}: accepted: {', '.join(CLEANUPS)}")
        self.directory = directory
        self.socket = os.path.join(directory, KUBELET_SOCKET)
        self.state_file = state_file
        self.behaviour = behaviour
        self.cleanup = cleanup or ("all" if behaviour == "1.20" else "sockets")
        self.dial_timeout = dial_timeout
        self.cond = threading.Condition(threading.RLock())
        self._handler: Union[_Kubelet120, _PluginServer] = (
            _Kubelet120(self) if behaviour == "1.20" else _PluginServer(self, by_path=behaviour != "1.25"))
        # The device manager's view, keyed by resource name: the endpoint it would call (its
        # ``endpoints`` map), when that endpoint was stopped, and the devices it last heard of.
        self.clients: Dict[str, _Client] = {}
        self.stopped_at: Dict[str, float] = {}
        self.devices: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self.messages: Dict[str, int] = {}
        self.received: Dict[str, Deque[Received]] = {}
        # Records, oldest first, each bounded.
        self.registrations: List[Dict[str, Any]] = []  # every Register answered OK
        self.refused: List[str] = []  # the error of every Register refused
        self.dial_failures: List[Dict[str, Any]] = []  # 1.20: dials that failed after Register said OK
        self.leaked: Deque[_Client] = deque()  # connections the kubelet never closes
        self._live: Set[_Client] = set()  # every client not yet closed and finished, for stop()
        self._threads: Set[threading.Thread] = set()
        self._stopping = True
        self._server: Optional[grpc.Server] = None
        self._executor: Optional[futures.ThreadPoolExecutor] = None
        self._write_lock = threading.Lock()
        self._state_error = ""
        self.started = 0.0
        # The plugin watcher (pluginmanager): sockets found in ``plugins_registry`` are registered.
        self.plugins_registry = plugins_registry
        self._watcher: Optional[_PluginWatcher] = None
        self.watched: Dict[str, str] = {}  # registration socket path -> resource name registered from it
        self.watcher_events: List[Dict[str, Any]] = []  # every GetInfo/Notify round: socket, resource, error

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> StandInKubelet:
        """Start as a kubelet does: clear the directory, serve a new kubelet.sock.  Raises LiveKubelet
        when something already answers on kubelet.sock there."""
        os.makedirs(self.directory, exist_ok=True)
        if kubelet_answers(self.socket):
            raise LiveKubelet(f"{self.socket}: something answers there (a running kubelet?); the stand-in "
                              "refuses to take over its directory, whose sockets it would delete")
        self._clean_directory()
        with self.cond:
            self._stopping = False
        self.serve_registration()
        if self.plugins_registry is not None:
            self._watcher = _PluginWatcher(self, self.plugins_registry)
            self._watcher.start()
        self.started = time.time()
        self._write_state()
        return self

    def _clean_directory(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            if name == CHECKPOINT:
                continue
            path = os.path.join(self.directory, name)
            try:
                mode = os.stat(path).st_mode  # follows symlinks, as the kubelet's os.Stat does
            except OSError:
                continue
            if stat.S_ISDIR(mode) or (self.cleanup == "sockets" and not stat.S_ISSOCK(mode)):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("stand-in: cannot remove %s: %s", path, exc)

    def serve_registration(self) -> None:
        """Serve the Registration service on kubelet.sock."""
        self._executor = futures.ThreadPoolExecutor(max_workers=REGISTRATION_WORKERS,
                                                    thread_name_prefix="standin-register")
        self._server = grpc.server(self._executor)
        self._server.add_generic_rpc_handlers([_Registration(self).handler()])
        self._server.add_insecure_port("unix:" + self.socket)
        self._server.start()

    def _stop_registration(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def stop(self) -> None:
        """Stop as a dying kubelet does: its connections close (the streams break), kubelet.sock goes."""
        with self.cond:
            self._stopping = True
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
            with self.cond:
                self.watched.clear()
        self._handler.stop()
        with self.cond:
            everything = list(self._live)
            self.leaked.clear()
        for client in everything:  # pending dials and calls, connections it leaked: a dead process has none
            client.close()
        self._stop_registration()
        for client in everything:
            client.join(5)
        with self.cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(self.dial_timeout + 5)
        with self.cond:
            self._live = {c for c in self._live if not c.finished()}
            self._threads = {t for t in self._threads if t.is_alive()}
            self.leaked.clear()
            self.clients.clear()
            self.cond.notify_all()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self._write_state()

    def restart(self) -> None:
        """Stop and start again: the devices it knew stay, unhealthy (allocatable 0), until their plugins
        register again."""
        self.stop()
        with self.cond:
            for resource in self.devices:
                self._mark_unhealthy(resource)
        self.start()

    def __enter__(self) -> StandInKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults a test can trigger ------------------------------------------------------------

    def drop(self, resource: str, endpoint: Optional[str] = None) -> _Client:
        """End a stream from the kubelet's side (its call is cancelled; it never reconnects): the
        current client's of ``resource``, or the one registered on ``endpoint``.  What follows is the
        behaviour's own teardown."""
        with self.cond:
            if endpoint is None:
                client = self.clients.get(resource)
            else:
                client = next((c for c in self._live if c.resource == resource and c.endpoint == endpoint
                               and c.connected), None)
            if client is None or not client.connected:
                raise KeyError(f"{resource}: no open ListAndWatch stream to drop"
                               + (f" on {endpoint}" if endpoint else ""))
        client.cancel_stream()
        return client

    def touch_socket(self, mode: Optional[int] = None, uid: Optional[int] = None, gid: Optional[int] = None,
                     times: bool = True) -> None:
        """Change kubelet.sock's attributes in place, as chmod, chown, restorecon or touch do (same inode)."""
        if mode is not None:
            os.chmod(self.socket, mode)
        if uid is not None or gid is not None:
            os.chown(self.socket, -1 if uid is None else uid, -1 if gid is None else gid)
        if times:
            os.utime(self.socket)

    def recreate_socket(self) -> None:
        """Delete and recreate kubelet.sock, leaving the plugins' connections and streams alone (the
        newest kubelets do this when their own gRPC serve fails: not a restart)."""
        self._stop_registration()
        try:
            os.unlink(self.socket)  # new grpcio removes it itself when the server stops
        except FileNotFoundError:
            pass
        self.serve_registration()

    # --- Registration -------------------------------------------------------------------------

    def register(self, request: Any) -> Optional[str]:
        """Handle one Register; return the error the kubelet would give, or None."""
        if request.version not in SUPPORTED_VERSIONS:
            return (f"requested API version {request.version!r} is not supported by kubelet. "
                    f"Supported versions are {list(SUPPORTED_VERSIONS)!r}")
        if not is_extended_resource_name(request.resource_name):
            return f"the ResourceName {request.resource_name!r} is invalid"
        with self.cond:
            if self._stopping:
                return "the kubelet is stopping"
            if request.resource_name not in self.devices and len(self.devices) >= MAX_RESOURCES:
                return f"the stand-in keeps at most {MAX_RESOURCES} resources"
        return self._handler.register(request)

    def register_watched(self, socket_path: str, info: Any) -> Optional[str]:
        """The plugin watcher's RegisterPlugin for a socket it found: validate the PluginInfo, then
        register its endpoint with the device manager (dialled at once, with its options, in every
        release: ``RegisterPlugin`` is synchronous even in 1.20).  Return the error, or None."""
        if info.type != api.PLUGIN_TYPE:
            return f"no handler registered for plugin type: {info.type}"
        if not any(v in SUPPORTED_VERSIONS for v in info.supported_versions):
            return f"manager version, v1beta1, is not among plugin supported versions {list(info.supported_versions)}"
        if not is_extended_resource_name(info.name):
            return f"invalid name of device plugin socket: {info.name}"
        endpoint = info.endpoint or socket_path
        request = api.RegisterRequest(version="v1beta1", endpoint=endpoint, resource_name=info.name)
        if self.behaviour != "1.20":
            error = self.register(request)
        else:
            client = self._new_client(info.name, endpoint)
            if client is None:
                return "the kubelet is stopping"
            try:
                client.dial(self.dial_timeout)
                client.get_options()
            except (_Closed, *_CALL_ERRORS) as exc:
                client.close()
                return f"failed to dial device plugin with socketPath {endpoint}: {_why(exc, self.dial_timeout)}"
            with self.cond:
                self._plugin_connected(client)
                try:
                    client.run()
                except (_Closed, ValueError):
                    return "the kubelet is stopping"
            self._accepted(request)
            error = None
        if error is None:
            with self.cond:
                self.watched[socket_path] = info.name
        return error

    def deregister_watched(self, socket_path: str) -> None:
        """The plugin watcher saw a registered socket go: DeRegisterPlugin(name) stops whatever endpoint
        the resource name has now (1.20 ``eI.e.stop()``; plugin/v1beta1 ``disconnectClient``)."""
        with self.cond:
            name = self.watched.pop(socket_path, None)
            client = self.clients.get(name) if name is not None else None
        if client is not None:
            log.info("stand-in: plugin watcher: %s removed: deregistering %s", socket_path, name)
            client.close()

    def _new_client(self, resource: str, endpoint: str) -> Optional[_Client]:
        with self.cond:
            if self._stopping:
                return None
            self._live = {c for c in self._live if not c.finished()}
            client = _Client(self, resource, endpoint)
            self._live.add(client)
            return client

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self.cond:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()

    def _accepted(self, request: Any) -> None:
        with self.cond:
            append_bounded(self.registrations, {"resource": request.resource_name, "endpoint": request.endpoint,
                                                 "time": time.time()})
            self.cond.notify_all()
        log.info("stand-in kubelet: %s registered on %s", request.resource_name, request.endpoint)

    def _refused(self, error: str) -> None:
        with self.cond:
            append_bounded(self.refused, error)
            self.cond.notify_all()

    def _dial_failed(self, client: _Client, why: str) -> None:
        log.error("stand-in kubelet: failed to dial device plugin %s on %s: %s", client.resource, client.endpoint,
                  why)
        with self.cond:
            append_bounded(self.dial_failures, {"resource": client.resource, "endpoint": client.endpoint,
                                                 "error": why, "time": time.time()})
            self.cond.notify_all()
        self._write_state()

    def _leak(self, client: _Client) -> None:
        """Keep ``client``'s connection open, as the kubelet does; bounded (the oldest is closed)."""
        if client.closed:
            return
        with self.cond:
            self.leaked.append(client)
            oldest = self.leaked.popleft() if len(self.leaked) > LEAKED_KEPT else None
        if oldest is not None:
            oldest.close()

    # --- the device manager (ManagerImpl), shared by every behaviour -------------------------------

    def _plugin_connected(self, client: _Client) -> None:
        """The resource's endpoint is now ``client`` (PluginConnected / registerEndpoint).  Under cond."""
        self.clients[client.resource] = client
        self.stopped_at.pop(client.resource, None)
        self.cond.notify_all()

    def _plugin_disconnected(self, resource: str) -> None:
        """PluginDisconnected(resourceName): whichever client went, the resource is unhealthy and its
        current endpoint stopped.  Under cond."""
        if resource in self.clients:
            self._mark_unhealthy(resource)
            self.stopped_at[resource] = time.time()
        self.cond.notify_all()

    def _mark_unhealthy(self, resource: str) -> None:
        for dev in self.devices.get(resource, {}).values():
            dev["health"] = "Unhealthy"

    def _update(self, client: _Client, devices: List[Any], arrived: Optional[float] = None) -> None:
        """One ListAndWatch message from ``client``: the full device list of its resource, which
        arrived at ``arrived`` (time.monotonic(); None: now)."""
        now, wall = time.monotonic(), time.time()
        if arrived is not None:
            wall -= now - arrived
            now = arrived
        with self.cond:
            view = {d.ID: {"id": d.ID, "health": d.health, "numa_nodes": [n.ID for n in d.topology.nodes]}
                    for d in devices}
            self.devices[client.resource] = view
            seq = self.messages[client.resource] = self.messages.get(client.resource, 0) + 1
            kept = self.received.setdefault(client.resource, deque(maxlen=RECEIVED_KEPT))
            kept.append(Received(seq, now, wall, {k: dict(v) for k, v in view.items()}))
            self.cond.notify_all()
        self._write_state()

    def _stream_ended(self, client: _Client) -> None:
        self._handler.stream_ended(client)

    # --- what a kubelet would call or show -----------------------------------------------------

    def client(self, resource: str) -> _Client:
        """The client the kubelet would call for ``resource`` (KeyError when it has none)."""
        with self.cond:
            return self.clients[resource]

    def call(self, resource: str, method: str, request: Any, timeout: Optional[float] = None,
             wait: Optional[float] = DEFAULT_WAIT) -> Any:
        """Call ``method`` on the resource's plugin with the kubelet's ``timeout`` (None: no deadline on
        the wire) and wait at most ``wait`` s for the answer (None: as long as the kubelet would).
        Raises the call's grpc.RpcError, or NoAnswer (the call is then cancelled)."""
        future = getattr(self.client(resource).stub, method).future(request, timeout=timeout)
        try:
            return future.result(timeout=wait)
        except grpc.FutureTimeoutError:
            future.cancel()
            raise NoAnswer(f"{resource}: {method} not answered within the test's {wait} s "
                           "(the kubelet sets no deadline and would still be waiting)") from None

    def allocate(self, resource: str, *requests: List[str], wait: Optional[float] = DEFAULT_WAIT) -> Any:
        req = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=ids)
                                                      for ids in requests])
        return self.call(resource, "Allocate", req, wait=wait)

    def preferred(self, resource: str, available: List[str], must_include: List[str], size: int,
                  wait: Optional[float] = DEFAULT_WAIT) -> List[str]:
        req = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size)])
        return list(self.call(resource, "GetPreferredAllocation", req, wait=wait).container_responses[0].deviceIDs)

    def prestart(self, resource: str, ids: List[str], wait: Optional[float] = DEFAULT_WAIT) -> None:
        self.call(resource, "PreStartContainer", api.PreStartContainerRequest(devices_ids=ids),
                  timeout=PRESTART_TIMEOUT, wait=wait)

    def options(self, resource: str, wait: Optional[float] = DEFAULT_WAIT) -> Any:
        return self.call(resource, "GetDevicePluginOptions", api.Empty(), wait=wait)

    def capacity(self, resource: str) -> int:
        with self.cond:
            return len(self.devices.get(resource, {}))

    def allocatable(self, resource: str) -> int:
        with self.cond:
            return sum(1 for d in self.devices.get(resource, {}).values() if d["health"] == "Healthy")

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def history(self, resource: str, after: int = 0) -> List[Received]:
        """The ListAndWatch messages of ``resource`` received after message number ``after``."""
        with self.cond:
            return [r for r in self.received.get(resource, ()) if r.seq > after]

    def connected(self, resource: str) -> bool:
        """The resource's current endpoint has an open ListAndWatch stream."""
        with self.cond:
            client = self.clients.get(resource)
            return client is not None and client.connected

    def stopped(self, resource: str) -> bool:
        """The kubelet marked the resource's current endpoint stopped (a disconnect since it connected)."""
        with self.cond:
            return resource in self.stopped_at

    def snapshot(self) -> Dict[str, Any]:
        def options(client: _Client) -> Dict[str, bool]:
            opts = client.options
            return {"pre_start_required": bool(opts and opts.pre_start_required),
                    "get_preferred_allocation_available": bool(opts and opts.get_preferred_allocation_available)}

        with self.cond:
            return {
                "pid": os.getpid(),
                "socket": self.socket,
                "behaviour": self.behaviour,
                "started": self.started,
                "registrations": list(self.registrations),
                "refused": list(self.refused),
                "dial_failures": list(self.dial_failures),
                "resources": {
                    name: {
                        "endpoint": client.endpoint,
                        "connected": client.connected,
                        "stopped": name in self.stopped_at,
                        "options": options(client),
                        "devices": sorted(self.devices.get(name, {}).values(), key=lambda d: d["id"]),
                    } for name, client in self.clients.items()
                },
            }

    def _write_state(self) -> None:
        if not self.state_file:
            return
        with self._write_lock:
            data = json.dumps(self.snapshot(), indent=1, sort_keys=True).encode()
            try:
                write_file_atomically(self.state_file, data)
                self._state_error = ""
            except OSError as exc:
                if str(exc) != self._state_error:  # once per distinct failure, not once per message
                    self._state_error = str(exc)
                    log.error("stand-in: cannot write the state file %s: %s", self.state_file, exc)


class _Registration:
    def __init__(self, kubelet: StandInKubelet) -> None:
        self.kubelet = kubelet

    def handler(self) -> grpc.GenericRpcHandler:
        return api.service_handler(api.REGISTRATION, {"Register": api.method_handler(api.REGISTER, self.Register)})

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        error = self.kubelet.register(request)
        if error:
            log.warning("stand-in kubelet refused %s: %s", request.resource_name, error)
            self.kubelet._refused(error)
            context.abort(grpc.StatusCode.UNKNOWN, error)
        return api.Empty()


# --- the command line -----------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.standin",
        description="A stand-in kubelet for tests: serves kubelet.sock in DIR and behaves as the chosen "
                    "kubelet release does. SIGHUP restarts it as a kubelet restart would; SIGUSR1 recreates "
                    "kubelet.sock without a restart; SIGTERM or SIGINT stops it.")
    parser.add_argument("--kubelet-dir", required=True, help="Directory to serve kubelet.sock in.")
    parser.add_argument("--state-file", help="Write the stand-in's view as JSON here on every change.")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default=NEWEST,
                        help="Which kubelet release to behave as (default: %(default)s).")
    parser.add_argument("--cleanup", choices=CLEANUPS, default=None,
                        help="What a start deletes in DIR: every UNIX socket, or every entry but directories "
                             "and the checkpoint (default: 'all' for 1.20, 'sockets' otherwise).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)

    # The signals are blocked in every thread and taken with sigwait: no handler runs inside the main
    # thread's waits (a handler setting an Event the main thread waits on can deadlock on its lock).
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)  # before any thread starts: they inherit the mask
    kubelet = StandInKubelet(args.kubelet_dir, args.state_file, args.behaviour, args.cleanup)
    try:
        kubelet.start()
    except (LiveKubelet, OSError) as exc:
        print(f"stand-in kubelet: {exc}", file=sys.stderr)
        return 1
    print(f"stand-in kubelet ({args.behaviour}) serving {kubelet.socket}", file=sys.stderr, flush=True)
    try:
        while True:
            signum = signal.sigwait(handled)
            if signum in (signal.SIGTERM, signal.SIGINT):
                return 0
            if signum == signal.SIGHUP:
                kubelet.restart()
                print("stand-in kubelet restarted", file=sys.stderr, flush=True)
            else:
                kubelet.recreate_socket()
                print("stand-in kubelet recreated kubelet.sock", file=sys.stderr, flush=True)
    finally:
        kubelet.stop()


if __name__ == "__main__":
    sys.exit(main())
