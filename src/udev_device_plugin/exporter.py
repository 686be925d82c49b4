"""``[plugin] metrics_address``: Prometheus text over HTTP, served on the daemon's event loop.

No thread and no HTTP library: a non-blocking listening socket and one small state machine per
connection, all loop readers, writers and timers, so a scraper can never stall the loop or take
the daemon down.  What a client gets:

- ``GET /metrics`` (and HEAD; a query string is ignored): the text exposition format 0.0.4,
  built from the daemon's state at that moment (metrics.py); 404 for any other path, 405 for
  any other method, 400 for what is not an HTTP/1.x request line.  Every answer closes the
  connection (``Connection: close``): a Prometheus scrape every 15 s needs no keep-alive, and
  an idle connection would hold a slot.
- Bounds: at most ``MAX_CONNECTIONS`` connections at once (one more is answered 503 and
  closed); the request head must arrive whole within ``REQUEST_TIMEOUT`` seconds of the
  connection and within ``MAX_REQUEST`` bytes (431 and closed otherwise: no body is read);
  the answer must be taken within ``RESPONSE_TIMEOUT`` seconds.  Each refusal is counted in
  ``udev_device_plugin_metrics_requests_refused_total``.  Nothing is read from the filesystem
  on a client's behalf.
- At most ``ACCEPT_RATE`` new connections a second (after a burst of ``ACCEPT_BURST``): more wait
  in the kernel's backlog, so a client connecting in a tight loop costs the loop little.
- The text is rendered at most once per ``RENDER_INTERVAL`` seconds (a second): what a scrape gets
  is at most that old, and a client that scrapes back to back costs the loop a connection's
  handling, not a render, per request.
- Every callback is guarded: an error in one connection closes that connection, logged, and
  never reaches the loop's exception handler (for which any exception is fatal).

A bind failure (the port is taken, or the unit's RestrictAddressFamilies= lacks AF_INET) does
not stop the daemon: devices matter more than their metrics.  It is logged as an ERROR naming
the key and retried with backoff (``RETRY_FIRST`` doubling to ``RETRY_MAX``), and STATUS= says
so until the address is served.  SIGHUP with another address closes the old one and serves the
new one; with ``off``, closes it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import __version__, metrics, registration
from .metrics import MetricsAddress

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from .config import PluginConfig
    from .daemon import Daemon

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 8
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
RESPONSE_TIMEOUT = 10.0
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
BACKLOG = 16
# Connections accepted per wake-up of the loop: a flood of connections interleaves with the rest.
ACCEPT_BATCH = 16
# Out of descriptors (EMFILE ...): stop accepting for this long rather than spin.
ACCEPT_PAUSE = 1.0
# New connections per second, after a burst of ACCEPT_BURST: past that the listening socket is left
# alone until the next is due, and clients wait in the kernel's backlog.  Any local user can reach a
# loopback port: one connecting as fast as it can costs the loop this many connections a second, not
# thousands, so the kubelet's calls keep their latency (make bench).  A scrape every 15 s needs none.
ACCEPT_RATE = 20.0
ACCEPT_BURST = 16
# A body is rendered at most once per this many seconds; requests in between get the same bytes.  A
# render costs the loop ~1 ms for a few resources, ~20-50 ms for a hundred (make bench): a client
# scraping back to back must not turn that into a busy loop.  Prometheus scrapes every 15 s or more.
RENDER_INTERVAL = 1.0
_RECV = 4096

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False, extra: Iterable[Tuple[str, str]] = ()) -> bytes:
    from email.utils import formatdate  # here: the daemon's start imports only what serving needs

    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", f"Date: {formatdate(usegmt=True)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def _head_end(buf: bytearray) -> Optional[int]:
    """Where the request head ends (after its blank line; bare LF tolerated), or None."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") for i in (buf.find(sep),) if i >= 0]
    return min(ends) if ends else None


def listen_socket(address: MetricsAddress) -> socket.socket:
    """A non-blocking listening TCP socket on ``address``; raises OSError."""
    family = socket.AF_INET6 if address.ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # [::]:PORT is IPv6 only
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class MetricsServer:
    """Serves ``render()`` at /metrics on one address at a time (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, render: Callable[[], bytes],
                 on_change: Callable[[], None] = lambda: None, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT, response_timeout: float = RESPONSE_TIMEOUT,
                 retry_first: float = RETRY_FIRST, retry_max: float = RETRY_MAX,
                 render_interval: float = RENDER_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 accept_rate: float = ACCEPT_RATE, accept_burst: int = ACCEPT_BURST) -> None:
        self.loop = loop
        self.accept_rate = accept_rate
        self.accept_burst = accept_burst
        self._tokens = float(accept_burst)
        self._tokens_at = clock()
        self.render_interval = render_interval
        self.clock = clock
        self._body: Optional[bytes] = None
        self._rendered_at = 0.0
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.response_timeout = response_timeout
        self.retry_first = retry_first
        self.retry_max = retry_max
        self.render = render
        self.on_change = on_change
        self.address: Optional[MetricsAddress] = None
        self.bound = ""  # the address served, with the real port, while listening
        self.problem = ""  # why the address is not served (empty while it is)
        self.refused: Dict[str, int] = dict.fromkeys(metrics.REFUSALS, 0)
        self.connections: Set[_Connection] = set()
        self._sock: Optional[socket.socket] = None
        self._retry: Optional[asyncio.TimerHandle] = None
        self._resume: Optional[asyncio.TimerHandle] = None
        self._backoff = retry_first

    # --- the address ---------------------------------------------------------------------------

    def listen(self, address: MetricsAddress) -> None:
        """Serve ``address``: kept when served already, tried again at once when it is being retried
        (a reload after the port was freed), else the old address is closed first."""
        if address == self.address and self._sock is not None:
            return
        self._stop_listening()
        self.address = address
        self._backoff = self.retry_first
        self.problem = ""
        self._bind()

    def _bind(self) -> None:
        self._retry = None
        address = self.address
        assert address is not None
        try:
            sock = listen_socket(address)
        except OSError as exc:
            problem = f"cannot listen on {address}: {exc.strerror or exc}"
            if exc.errno == errno.EAFNOSUPPORT:
                problem += (" (under systemd: RestrictAddressFamilies= must allow "
                            f"{'AF_INET6' if address.ipv6 else 'AF_INET'}; see udev-device-plugin(8), METRICS)")
            delay, self._backoff = self._backoff, min(self._backoff * 2, self.retry_max)
            if problem != self.problem:
                log.error("metrics_address (%s): %s; retrying with backoff up to every %g s, devices are served "
                          "meanwhile", address.source or "[plugin]", problem, self.retry_max)
            else:
                log.debug("metrics_address: %s; retrying in %g s", problem, delay)
            self.problem = problem
            self._retry = self.loop.call_later(delay, self._guarded, self._bind)
            self.on_change()
            return
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.bound = str(MetricsAddress(host, port))
        self.loop.add_reader(sock.fileno(), self._guarded, self._accept)
        log.info("metrics: serving http://%s/metrics", self.bound)
        if self.problem:
            self.problem = ""
            self.on_change()

    def _stop_listening(self) -> None:
        for handle in (self._retry, self._resume):
            if handle is not None:
                handle.cancel()
        self._retry = self._resume = None
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            log.info("metrics: no longer serving http://%s/metrics", self.bound)
        self.bound = ""

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._stop_listening()
        self.address = None
        self.problem = ""
        for conn in list(self.connections):
            conn.close()

    # --- connections ------------------------------------------------------------------------------

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - nothing here may reach the loop's (fatal) handler
            log.error("metrics: internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)

    def _wait_for_token(self) -> float:
        """0 when a connection may be accepted now (and takes its token), else how long until one may."""
        now = self.clock()
        self._tokens = min(float(self.accept_burst), self._tokens + (now - self._tokens_at) * self.accept_rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.accept_rate

    def _pause_accepting(self, seconds: float) -> None:
        assert self._sock is not None
        self.loop.remove_reader(self._sock.fileno())
        self._resume = self.loop.call_later(seconds, self._guarded, self._resume_accepting)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._sock is None:
                return
            wait = self._wait_for_token()
            if wait > 0:
                self._pause_accepting(wait)
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                self._tokens += 1.0  # nobody was waiting: the token is not spent
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning("metrics: cannot accept connections: %s; pausing for %g s", exc.strerror,
                                ACCEPT_PAUSE)
                    self._pause_accepting(ACCEPT_PAUSE)
                return  # ECONNABORTED and the like: that client is gone
            if len(self.connections) >= self.max_connections:
                self.refused["too_many_connections"] += 1
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(response(503, b"too many connections\n"))
                conn.close()
                continue
            _Connection(self, conn)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._guarded, self._accept)

    def answer(self, head: bytes) -> bytes:
        """The whole response to a request head."""
        line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
            self.refused["bad_request"] += 1
            return response(400, b"not an HTTP/1.x request\n")
        method, target, _ = parts
        if target.split("?", 1)[0] != "/metrics":
            return response(404, b"not found: the metrics are at /metrics\n", head_only=method == "HEAD")
        if method not in ("GET", "HEAD"):
            return response(405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
        now = self.clock()
        if self._body is None or now - self._rendered_at >= self.render_interval:
            try:
                self._body = self.render()
            except Exception as exc:  # noqa: BLE001 - a bug in a metric must not end the daemon
                log.error("metrics: cannot render the metrics: %s: %s", type(exc).__name__, exc, exc_info=exc)
                self._body = None
                return response(500, b"internal error; see the daemon's log\n")
            self._rendered_at = now
        return response(200, self._body, metrics.CONTENT_TYPE, head_only=method == "HEAD")


class _Connection:
    """One client: read its request head, write the answer, close; bounded in bytes and time."""

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.closed = False
        self.timer: Optional[asyncio.TimerHandle] = None
        server.connections.add(self)
        try:
            sock.setblocking(False)
            self.timer = self.loop.call_later(server.request_timeout, self._guard, self._timed_out)
            self.loop.add_reader(self.fd, self._guard, self._readable)
        except BaseException:
            self.close()
            raise

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one client's trouble stays with its connection
            log.error("metrics: internal error serving a client: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.close()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()  # gone before its request was complete
            return
        self.buf += data
        end = _head_end(self.buf)
        if end is None or end > MAX_REQUEST:
            if len(self.buf) > MAX_REQUEST:
                self.server.refused["too_large"] += 1
                self._send(response(431, f"the request head exceeds {MAX_REQUEST} bytes\n".encode()))
            return
        self._send(self.server.answer(bytes(self.buf[:end])))

    def _send(self, payload: bytes) -> None:
        """Write ``payload``, then close; what the kernel does not take at once goes out as the client reads."""
        self.loop.remove_reader(self.fd)
        self.buf = bytearray()
        self.out = memoryview(payload)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.server.response_timeout, self._guard, self._timed_out)
        self._writable(first=True)

    def _writable(self, first: bool = False) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                if first:
                    self.loop.add_writer(self.fd, self._guard, self._writable)
                return
            except OSError:
                self.close()
                return
            self.out = self.out[sent:]
        self.close()

    def _timed_out(self) -> None:
        self.timer = None
        self.server.refused["timeout"] += 1
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_writer(self.fd)
        self.sock.close()
        self.out = memoryview(b"")
        self.server.connections.discard(self)


# --- the daemon's metrics -------------------------------------------------------------------------

class Metrics:
    """What daemon.py calls: the exporter's life (start, SIGHUP, stop) and the counts only it sees
    (udev arrivals, health_command results).  Everything else is read from the daemon at a scrape."""

    def __init__(self, daemon: Daemon, on_change: Callable[[], None] = lambda: None) -> None:
        self.daemon = daemon
        self.on_change = on_change
        self.server: Optional[MetricsServer] = None
        self._client: Optional[metrics.PrometheusClient] = None
        self._client_tried = False
        self._pending: Dict[str, float] = {}  # resource -> when its oldest unpublished udev event was read
        self._connector: Any = None
        self._restarts_before = 0  # kubelet restarts counted by connectors since replaced (reload)
        self._process_start = process_start_time()
        import grpc

        self._grpcio = grpc.__version__

    # --- life -------------------------------------------------------------------------------------

    def start(self) -> None:
        self.configure(self.daemon.cfg.plugin)

    def configure(self, plugin: PluginConfig) -> None:
        """Start, move or stop the exporter to match ``plugin`` (at start and after each reload)."""
        address = plugin.metrics_address
        if address is None:
            if self.server is not None:
                self.server.close()
                self.server = None
                self.on_change()
            return
        if self.server is None:
            self._choose_renderer()
            assert self.daemon.loop is not None
            self.server = MetricsServer(self.daemon.loop, self.render, self.on_change, clock=self.daemon.clock)
        self.server.listen(address)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def status(self) -> str:
        """For STATUS=: why the metrics address is not served, or nothing."""
        if self.server is None or not self.server.problem:
            return ""
        return f"; metrics: {self.server.problem}"

    # --- counting ---------------------------------------------------------------------------------

    def hotplug_arrived(self, when: float, names: Iterable[str]) -> None:
        """Hotplug events that touch ``names`` were read at ``when`` (daemon clock): udev's, or inotify's on
        the directories of our device nodes (a node's removal is seen there first, often published before
        its udev event arrives)."""
        for name in names:
            self._pending.setdefault(name, when)

    def hotplug_applied(self, published: Iterable[str]) -> None:
        """The gathered hotplug changes were applied; ``published``: the resources whose list changed."""
        if not self._pending:
            return
        now = self.daemon.clock()
        for name in published:
            arrived = self._pending.get(name)
            state = self.daemon.states.get(name)
            if arrived is not None and state is not None:
                state.stats.hotplug_latency.observe(max(0.0, now - arrived))
        self._pending.clear()

    def health_result(self, name: str, result: Any) -> None:
        """One health_command run of ``name`` ended (a commands.Result)."""
        state = self.daemon.states.get(name)
        if state is not None:
            state.stats.health_observed(result.ok, result.timed_out, result.abandoned, result.duration)

    # --- a scrape ----------------------------------------------------------------------------------

    def _choose_renderer(self) -> None:
        if self._client_tried:
            return
        self._client_tried = True
        try:
            self._client = metrics.PrometheusClient()
        except ImportError:
            log.info("metrics: prometheus_client is not installed; the daemon writes the text format itself")
        except Exception as exc:  # noqa: BLE001 - a broken installation: ours does the same job
            log.warning("metrics: prometheus_client does not load (%s: %s); the daemon writes the text format "
                        "itself", type(exc).__name__, exc)
        else:
            log.info("metrics: rendered by prometheus_client %s", self._client.version)

    @property
    def renderer(self) -> str:
        return f"prometheus_client {self._client.version}" if self._client is not None else "builtin"

    def render(self) -> bytes:
        fams = metrics.families(self.view())
        if self._client is not None:
            try:
                return self._client.render(fams)
            except Exception as exc:  # noqa: BLE001 - fall back to ours for good, once
                log.error("metrics: prometheus_client failed (%s: %s); the daemon writes the text format itself "
                          "from now on", type(exc).__name__, exc, exc_info=exc)
                self._client = None
        return metrics.render_text(fams)

    def view(self) -> metrics.View:
        d = self.daemon
        connector = d.connector
        if connector is not self._connector:
            if self._connector is not None:
                self._restarts_before += getattr(self._connector, "kubelet_restarts", 0)
            self._connector = connector
        plugins = connector.plugins if connector is not None else {}
        lagging = d.scheduler.lagging()
        resources: List[metrics.ResourceView] = []
        for name, state in d.states.items():
            version, devices = state.current()
            plugin = plugins.get(name)
            reg = plugin.reg if plugin is not None else None
            resources.append(metrics.ResourceView(
                name=name, stats=state.stats, devices=Counter(dev.health for dev in devices.values()),
                list_updates=version,
                streams=sum(ep.servicer.streams for ep in plugin.endpoints.values()) if plugin is not None else 0,
                registration_state=reg.state.name.lower() if reg is not None else None,
                registrations=reg.registrations if reg is not None else 0,
                streams_lost=reg.streams_lost if reg is not None else 0,
                health_command=bool(state.config.health_command), lagging=name in lagging))
        restarts = self._restarts_before + getattr(connector, "kubelet_restarts", 0)
        return metrics.View(
            version=__version__, python=_python_version(), grpcio=self._grpcio, resources=resources,
            registration_states=[s.name.lower() for s in registration.State], kubelet_restarts=restarts,
            health_started=d.scheduler.runs_total, health_late=d.scheduler.late_total,
            health_stuck=len(d.runner.abandoned) if d.runner is not None else 0,
            refused=dict(self.server.refused) if self.server is not None else {},
            process=process_view(self._process_start))


# --- the process ---------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = resource.getpagesize()


def _python_version() -> str:
    import platform  # here: the daemon's start imports only what serving needs

    return platform.python_version()


def _stat_fields() -> List[str]:
    with open("/proc/self/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    return data[data.rindex(")") + 2:].split()  # fields from the third (state) on: comm may hold spaces


def process_start_time() -> float:
    """The process's start, in seconds since the epoch (0.0 where /proc cannot tell)."""
    try:
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return btime + int(_stat_fields()[19]) / _TICKS
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def process_view(start_time: float) -> Optional[metrics.ProcessView]:
    try:
        fields = _stat_fields()
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return None
    return metrics.ProcessView(
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _TICKS, virtual_bytes=int(fields[20]),
        resident_bytes=int(fields[21]) * _PAGE, open_fds=fds,
        max_fds=resource.getrlimit(resource.RLIMIT_NOFILE)[0], start_time=start_time)
