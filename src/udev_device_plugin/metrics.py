"""What the daemon counts, and the Prometheus text it becomes when scraped.

Pure: no sockets, no loop (exporter.py serves the text over HTTP).  Three layers:

- **Counting**, on the hot paths, as plain integer increments on our own objects:
  :class:`ResourceStats` hangs off each resource's ResourceState (Allocate and PreStartContainer
  counts by gRPC code, health_command results and durations, hotplug latency), and
  :func:`counted` wraps an RPC handler so that a successful call costs one ``+= 1``.
- **Viewing**: :class:`View` is what a scrape sees, a plain value (exporter.py builds it from
  the daemon; the tests build it by hand), and :func:`families` turns it into metric families
  with Prometheus names: ``udev_device_plugin_`` prefix, ``_total`` counters, seconds and bytes.
- **Rendering**: :func:`render_text` writes the text exposition format 0.0.4 itself;
  :func:`render_prometheus_client` hands the same families to prometheus_client's
  ``generate_latest`` (a custom collector on a registry of its own).  Both give the same bytes
  (tests/unit/test_metrics.py compares them on every prometheus_client the suite has).

Also here, because config.py needs it and it is pure: :func:`parse_address` for
``[plugin] metrics_address`` and :func:`check_plugin` for the rule that a non-loopback
address needs ``metrics_allow_remote = yes``.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
from typing import Any, Awaitable, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .model import Frozen

PREFIX = "udev_device_plugin_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency from a udev event's arrival to the device list that includes it; the daemon needs
# about a millisecond, a burst is held off by 20 ms (daemon.HOTPLUG_HOLDOFF).
HOTPLUG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# health_command run times: a spawn costs ~1 ms, health_timeout is at most 3600 s.
HEALTH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HEALTH_RESULTS = ("success", "failure", "timeout", "abandoned")
HEALTH_STATES = ("Healthy", "Unhealthy")  # model.HEALTHY, model.UNHEALTHY: the kubelet's words
# Why the exporter refused or cut off an HTTP client (exporter.py).
REFUSALS = ("too_many_connections", "timeout", "too_large", "bad_request")


# --- counting --------------------------------------------------------------------------------

class Histogram:
    """Observations in fixed buckets (upper bounds, inclusive, as Prometheus's ``le``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> List[Tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (+Inf, count)."""
        out, total = [], 0
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            total += n
            out.append((bound, total))
        return out


class RpcCounter:
    """Calls of one RPC: ``ok`` answered, ``failed`` by gRPC status code name."""

    __slots__ = ("ok", "failed")

    def __init__(self) -> None:
        self.ok = 0
        self.failed: Dict[str, int] = {}

    def by_code(self) -> Dict[str, int]:
        out = {"OK": self.ok}
        out.update(self.failed)
        return out


class ResourceStats:
    """Everything counted for one resource; lives and dies with its ResourceState."""

    __slots__ = ("allocate", "prestart", "health_results", "health_duration", "hotplug_latency")

    def __init__(self) -> None:
        self.allocate = RpcCounter()
        self.prestart = RpcCounter()
        self.health_results = dict.fromkeys(HEALTH_RESULTS, 0)
        self.health_duration = Histogram(HEALTH_BUCKETS)
        self.hotplug_latency = Histogram(HOTPLUG_BUCKETS)

    def health_observed(self, ok: bool, timed_out: bool, abandoned: bool, duration: float) -> None:
        """One health_command run (commands.Result's fields); a command that never started has no duration."""
        result = "abandoned" if abandoned else "timeout" if timed_out else "success" if ok else "failure"
        self.health_results[result] += 1
        if duration > 0:
            self.health_duration.observe(duration)


def counted(counter: RpcCounter, handler: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    """``handler`` (a grpc.aio unary handler) counting its outcomes in ``counter``.

    A success costs one integer increment; a failure is counted by the status code the handler
    aborted with (``context.abort``), CANCELLED when the caller went away or its deadline passed
    (the handler is cancelled), UNKNOWN for an exception (what grpc answers then).  grpc.aio sends an
    abort's status before the handler ends, so a failure is counted a moment after its caller has it.
    """
    async def call(request: Any, context: Any) -> Any:
        try:
            reply = await handler(request, context)
        except BaseException as exc:
            code = failure_code(exc, context)
            counter.failed[code] = counter.failed.get(code, 0) + 1
            raise
        counter.ok += 1
        return reply

    call.__name__ = getattr(handler, "__name__", "call")
    call.__doc__ = handler.__doc__
    return call


_CODE_NAMES: Dict[int, str] = {}


def failure_code(exc: BaseException, context: Any) -> str:
    """The gRPC status code name a failed handler answered with."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    from grpc.aio import AbortError  # loaded already: we are in a gRPC handler

    if not isinstance(exc, AbortError):
        return "UNKNOWN"
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - grpcio without ServicerContext.code()
        return "UNKNOWN"
    name = getattr(code, "name", None)  # new grpcio: a grpc.StatusCode
    if isinstance(name, str):
        return name
    if isinstance(code, int) and code:  # grpcio 1.46-1.59: the code's number (0 when unset)
        if not _CODE_NAMES:
            import grpc

            _CODE_NAMES.update({c.value[0]: c.name for c in grpc.StatusCode})
        return _CODE_NAMES.get(code, "UNKNOWN")
    return "UNKNOWN"


# --- what a scrape sees ---------------------------------------------------------------------------

class ResourceView(NamedTuple):
    name: str
    stats: ResourceStats
    devices: Mapping[str, int]  # health -> device IDs advertised
    list_updates: int  # device lists published (each wakes the ListAndWatch streams)
    streams: int  # ListAndWatch streams open on our sockets
    registration_state: Optional[str] = None  # registration.State name, lower case; None: not served
    registrations: int = 0
    streams_lost: int = 0
    health_command: bool = False
    lagging: bool = False


class ProcessView(NamedTuple):
    cpu_seconds: float = 0.0
    resident_bytes: int = 0
    virtual_bytes: int = 0
    open_fds: int = 0
    max_fds: int = 0
    start_time: float = 0.0


class View(NamedTuple):
    version: str
    python: str
    grpcio: str
    resources: Sequence[ResourceView] = ()
    registration_states: Sequence[str] = ()
    kubelet_restarts: int = 0
    health_started: int = 0
    health_late: int = 0
    health_stuck: int = 0
    refused: Mapping[str, int] = {}  # never changed: a NamedTuple's default is shared
    process: Optional[ProcessView] = None


# --- metric families ------------------------------------------------------------------------------

class Family(NamedTuple):
    """One metric family: ``samples`` maps label values (in ``labels`` order) to a value, or, for a
    histogram, to its :meth:`Histogram.cumulative` buckets and sum."""

    name: str  # as exposed: counters end in _total
    kind: str  # counter, gauge or histogram
    help: str
    labels: Tuple[str, ...]
    samples: List[Tuple[Tuple[str, ...], Any]]


def _family(name: str, kind: str, help_text: str, labels: Tuple[str, ...] = ()) -> Family:
    return Family(PREFIX + name, kind, help_text, labels, [])


def families(view: View) -> List[Family]:
    """The metric families of ``view``, in a fixed order; resources by name."""
    res = sorted(view.resources, key=lambda r: r.name)
    out: List[Family] = []

    build = _family("build_info", "gauge", "The daemon's version and what it runs on (always 1).",
                    ("grpcio", "python", "version"))
    build.samples.append(((view.grpcio, view.python, view.version), 1))
    out.append(build)

    devices = _family("devices", "gauge", "Device IDs advertised to the kubelet, by health.", ("health", "resource"))
    for r in res:
        for health in sorted(set(HEALTH_STATES) | set(r.devices)):
            devices.samples.append(((health, r.name), r.devices.get(health, 0)))
    out.append(devices)

    updates = _family("device_list_updates_total", "counter",
                      "Device lists published to the ListAndWatch streams (each one differs from the last).",
                      ("resource",))
    updates.samples.extend(((r.name,), r.list_updates) for r in res)
    out.append(updates)

    for attr, name, what in (("allocate", "allocate_calls_total", "Allocate"),
                             ("prestart", "prestart_calls_total", "PreStartContainer")):
        fam = _family(name, "counter", f"{what} calls answered, by gRPC status code (OK: succeeded).",
                      ("code", "resource"))
        for r in res:
            counts = getattr(r.stats, attr).by_code()
            fam.samples.extend(((code, r.name), counts[code]) for code in sorted(counts))
        out.append(fam)

    registered = [r for r in res if r.registration_state is not None]
    state = _family("registration_state", "gauge",
                    "The registration with the kubelet: 1 for the state it is in, 0 for the others.",
                    ("resource", "state"))
    for r in registered:
        for s in sorted(view.registration_states):
            state.samples.append(((r.name, s), 1 if s == r.registration_state else 0))
    out.append(state)

    regs = _family("registrations_total", "counter", "Register calls the kubelet accepted.", ("resource",))
    regs.samples.extend(((r.name,), r.registrations) for r in registered)
    out.append(regs)

    streams = _family("list_and_watch_streams", "gauge", "ListAndWatch streams open on our sockets.", ("resource",))
    streams.samples.extend(((r.name,), r.streams) for r in res)
    out.append(streams)

    lost = _family("list_and_watch_streams_lost_total", "counter",
                   "ListAndWatch streams of the registration that the kubelet ended.", ("resource",))
    lost.samples.extend(((r.name,), r.streams_lost) for r in registered)
    out.append(lost)

    restarts = _family("kubelet_restarts_total", "counter", "kubelet.sock creations seen (kubelet starts).")
    restarts.samples.append(((), view.kubelet_restarts))
    out.append(restarts)

    hotplug = _family("hotplug_latency_seconds", "histogram",
                      "From reading a hotplug event (udev's, or a device node created or removed) to publishing "
                      "the device list that includes it.", ("resource",))
    hotplug.samples.extend(((r.name,), _histogram(r.stats.hotplug_latency)) for r in res)
    out.append(hotplug)

    checked = [r for r in res if r.health_command]
    duration = _family("health_command_duration_seconds", "histogram", "health_command run times.", ("resource",))
    duration.samples.extend(((r.name,), _histogram(r.stats.health_duration)) for r in checked)
    out.append(duration)

    results = _family("health_commands_total", "counter",
                      "health_command runs by result: success, failure (non-zero exit, a signal, too much "
                      "output, not started), timeout (killed at health_timeout), abandoned (still running "
                      "after SIGKILL).", ("resource", "result"))
    for r in checked:
        results.samples.extend(((r.name, k), r.stats.health_results[k]) for k in sorted(r.stats.health_results))
    out.append(results)

    behind = _family("health_checks_falling_behind", "gauge",
                     "1 while a resource's health checks start late (more health_workers needed), else 0.",
                     ("resource",))
    behind.samples.extend(((r.name,), 1 if r.lagging else 0) for r in checked)
    out.append(behind)

    for name, help_text, value in (
            ("health_checks_started_total", "Health checks started.", view.health_started),
            ("health_checks_late_total", "Health checks started more than a tenth of their interval late.",
             view.health_late)):
        fam = _family(name, "counter", help_text)
        fam.samples.append(((), value))
        out.append(fam)

    stuck = _family("health_commands_stuck", "gauge",
                    "Commands abandoned in uninterruptible sleep that have not exited yet.")
    stuck.samples.append(((), view.health_stuck))
    out.append(stuck)

    refused = _family("metrics_requests_refused_total", "counter",
                      "HTTP clients of this endpoint refused or cut off, by reason.", ("reason",))
    refused.samples.extend(((k,), view.refused.get(k, 0)) for k in sorted(set(REFUSALS) | set(view.refused)))
    out.append(refused)

    if view.process is not None:
        p = view.process
        process: Tuple[Tuple[str, str, str, float], ...] = (
                ("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.",
                 p.cpu_seconds),
                ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", p.resident_bytes),
                ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", p.virtual_bytes),
                ("process_open_fds", "gauge", "Open file descriptors.", p.open_fds),
                ("process_max_fds", "gauge", "The limit on open file descriptors.", p.max_fds),
                ("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch, in "
                 "seconds.", p.start_time))
        # The names every exporter uses for its own process.
        out.extend(Family(name, kind, help_text, (), [((), value)]) for name, kind, help_text, value in process)
    return out


def _histogram(h: Histogram) -> Tuple[List[Tuple[float, int]], float]:
    return h.cumulative(), h.sum


# --- rendering ----------------------------------------------------------------------------------

def go_float(value: float) -> str:
    """A sample value as Prometheus's Go code writes one: ``3.0``, ``0.001``, ``1.7e+09``, ``+Inf``."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    text = repr(d)
    dot = text.find(".")
    if d > 0 and dot > 6:  # Go switches to exponents above a million; Python much later
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(pairs: Sequence[Tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(pairs)) + "}"


def render_text(fams: Sequence[Family]) -> bytes:
    """The text exposition format 0.0.4, as prometheus_client's generate_latest writes it."""
    out: List[str] = []
    for fam in fams:
        out.append(f"# HELP {fam.name} {_escape_help(fam.help)}\n# TYPE {fam.name} {fam.kind}\n")
        for values, value in fam.samples:
            pairs = list(zip(fam.labels, values))
            if fam.kind != "histogram":
                out.append(f"{fam.name}{_labels(pairs)} {go_float(value)}\n")
                continue
            buckets, total = value
            for bound, count in buckets:
                out.append(f"{fam.name}_bucket{_labels(pairs + [('le', go_float(bound))])} {go_float(count)}\n")
            out.append(f"{fam.name}_count{_labels(pairs)} {go_float(buckets[-1][1])}\n")
            out.append(f"{fam.name}_sum{_labels(pairs)} {go_float(total)}\n")
    return "".join(out).encode("utf-8")


class _Collector:
    """A prometheus_client custom collector over families built elsewhere (one scrape's)."""

    def __init__(self) -> None:
        self.fams: Sequence[Family] = ()

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for fam in self.fams:
            if fam.kind == "histogram":
                histogram = HistogramMetricFamily(fam.name, fam.help, labels=fam.labels)
                for values, (buckets, total) in fam.samples:
                    histogram.add_metric(list(values), [(go_float(b), c) for b, c in buckets], total)
                yield histogram
                continue
            kind = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            metric = kind(fam.name, fam.help, labels=fam.labels)
            for values, value in fam.samples:
                metric.add_metric(list(values), value)
            yield metric


class PrometheusClient:
    """prometheus_client's generate_latest over our families (raises ImportError without it)."""

    def __init__(self) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry

        self.version = getattr(prometheus_client, "__version__", "") or _installed_version("prometheus_client")
        self._generate = prometheus_client.generate_latest
        self._collector = _Collector()
        # A registry of our own: the default one carries process and platform collectors we do not want twice.
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._collector)

    def render(self, fams: Sequence[Family]) -> bytes:
        self._collector.fams = fams
        try:
            return bytes(self._generate(self._registry))
        finally:
            self._collector.fams = ()


def render_prometheus_client(fams: Sequence[Family]) -> bytes:
    return PrometheusClient().render(fams)


def _installed_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- [plugin] metrics_address ---------------------------------------------------------------------

class MetricsAddress(Frozen):
    """Where to serve /metrics: an IP address (never a name) and a port (0: the kernel picks one).
    Equal by host and port."""

    __slots__ = ("host", "port", "text", "source")

    host: str  # the address in its canonical form, without brackets
    port: int
    text: str  # as written in the file
    source: str  # the file

    def __init__(self, host: str, port: int, text: str = "", source: str = "") -> None:
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "source", source)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, MetricsAddress)
        return (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"MetricsAddress(host={self.host!r}, port={self.port!r}, text={self.text!r}, source={self.source!r})"

    @property
    def ipv6(self) -> bool:
        return ":" in self.host

    @property
    def loopback(self) -> bool:
        import ipaddress  # here: the daemon's start imports only what serving needs

        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.ipv6 else f"{self.host}:{self.port}"


_BRACKETED = re.compile(r"^\[([^\]]*)\]:([^:]*)$")
_ACCEPTED = "accepted: off, or IP:PORT such as 127.0.0.1:9400 or [::1]:9400"


def parse_address(text: str, source: str = "") -> Optional[MetricsAddress]:
    """``metrics_address``'s value: None for ``off``; raise ValueError saying what is wrong."""
    if text.lower() == "off":
        return None
    match = _BRACKETED.match(text)
    if match:
        host, port_text = match.groups()
    elif text.startswith("["):
        raise ValueError(f"{'no port' if text.endswith(']') else 'not [IPv6]:PORT'}; {_ACCEPTED}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not host:
            raise ValueError(f"no address before the port; {_ACCEPTED} (0.0.0.0:PORT for every IPv4 address, "
                             "with metrics_allow_remote = yes)")
    elif ":" in text:
        raise ValueError(f"an IPv6 address goes in brackets, as in [::1]:9400; {_ACCEPTED}")
    else:
        raise ValueError(f"no port; {_ACCEPTED}")
    if "%" in host:
        raise ValueError(f"a zone index (%...) is not supported; {_ACCEPTED}")
    import ipaddress  # here: only a config with metrics_address needs it

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (names are not resolved: localhost could be either "
                         f"family); {_ACCEPTED}") from None
    if match and ip.version != 6:
        raise ValueError(f"brackets are for IPv6 addresses; {_ACCEPTED}")
    if not match and ip.version != 4:  # pragma: no cover - an IPv6 address has more than one colon
        raise ValueError(_ACCEPTED)
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5 or int(port_text) > 65535:
        raise ValueError(f"port {port_text!r} is not a whole number from 0 to 65535 (0: any free port, for "
                         f"tests); {_ACCEPTED}")
    return MetricsAddress(str(ip), int(port_text), text, source)


def parse_setting(c: Any, section: str, key: str, value: str, into: Dict[str, object]) -> None:
    """config.py's ``[plugin] metrics_address``: the parsed address into ``into``, or an error in ``c``."""
    try:
        into[key] = parse_address(value, c.source)
    except ValueError as exc:
        c.error(section, key, value, str(exc))


def check_plugin(plugin: Mapping[str, object]) -> List[str]:
    """Across every file's [plugin] (a drop-in may set either key): remote needs metrics_allow_remote."""
    address = plugin.get("metrics_address")
    if not isinstance(address, MetricsAddress) or address.loopback or plugin.get("metrics_allow_remote"):
        return []
    return [f"{address.source}: [plugin] metrics_address = {address.text!r}: {address.host} is not a loopback "
            "address, so the metrics would be open to the network; accepted: 127.0.0.1:PORT or [::1]:PORT, or "
            "this address with metrics_allow_remote = yes in [plugin]"]
