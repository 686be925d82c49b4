"""metrics.py: metrics_address and its config rules, the counters, the families' names, and the text,
written by our renderer and (where this stack has it) by prometheus_client, byte for byte the same."""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import re
import subprocess
from typing import Any, Dict, List, Optional

import grpc
import pytest

from udev_device_plugin import config, metrics
from udev_device_plugin.config import ConfigError
from udev_device_plugin.metrics import Histogram, MetricsAddress, ResourceStats, RpcCounter, View

SRC = "/etc/udev-device-plugin/udev-device-plugin.conf"
DROPIN = "/etc/udev-device-plugin/conf.d/metrics.conf"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_CLIENT = importlib.util.find_spec("prometheus_client") is not None
# Every renderer this stack has: ours always, prometheus_client where installed (the newest stack; the EL
# stacks pin none, as RHEL without EPEL's package has none; tests/stacks/report.py checks both facts).
RENDERERS = ["builtin"] + (["prometheus_client"] if HAVE_CLIENT else [])


def render(fams: List[metrics.Family], renderer: str) -> bytes:
    return metrics.render_text(fams) if renderer == "builtin" else metrics.render_prometheus_client(fams)


# --- metrics_address ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, port, loopback", [
    ("127.0.0.1:9943", "127.0.0.1", 9943, True),
    ("127.0.0.1:0", "127.0.0.1", 0, True),
    ("127.0.0.1:65535", "127.0.0.1", 65535, True),
    ("127.1.2.3:1", "127.1.2.3", 1, True),
    ("[::1]:9943", "::1", 9943, True),
    ("[0:0:0:0:0:0:0:1]:80", "::1", 80, True),
    ("0.0.0.0:9943", "0.0.0.0", 9943, False),
    ("[::]:9943", "::", 9943, False),
    ("192.0.2.7:9943", "192.0.2.7", 9943, False),
    ("[2001:db8::7]:9943", "2001:db8::7", 9943, False),
])
def test_address_parsed(text, host, port, loopback):
    address = metrics.parse_address(text, "f")
    assert address is not None
    assert (address.host, address.port, address.loopback, address.text, address.source) == (
        host, port, loopback, text, "f")
    assert str(address) == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@pytest.mark.parametrize("text", ["off", "OFF", "Off"])
def test_address_off(text):
    assert metrics.parse_address(text) is None


@pytest.mark.parametrize("text, problem", [
    ("localhost:9943", "is not an IP address (names are not resolved"),
    ("node1.example.com:9943", "is not an IP address"),
    ("127.0.0.1", "no port"),
    ("9943", "no port"),
    ("", "no port"),
    (":9943", "no address before the port"),
    ("::1:9943", "an IPv6 address goes in brackets"),
    ("[::1]", "no port"),
    ("[::1", "not [IPv6]:PORT"),
    ("[::1]:", "port '' is not a whole number from 0 to 65535"),
    ("[127.0.0.1]:9943", "brackets are for IPv6 addresses"),
    ("[fe80::1%eth0]:9943", "a zone index"),
    ("127.0.0.1:65536", "port '65536' is not a whole number from 0 to 65535"),
    ("127.0.0.1:-1", "port '-1'"),
    ("127.0.0.1:+80", "port '+80'"),
    ("127.0.0.1:80.0", "port '80.0'"),
    ("127.0.0.1:\u0663", "is not a whole number"),  # an Arabic-Indic digit: isdigit() alone would take it
    ("127.0.0.1:0009943", "is not a whole number"),
    ("127.0.0.1: 9943", "is not a whole number"),
    ("127.0.0.01:9943", "is not an IP address"),
    ("1.2.3:80", "is not an IP address"),
    ("http://127.0.0.1:9943", "an IPv6 address goes in brackets"),
])
def test_bad_address_says_what_is_accepted(text, problem):
    with pytest.raises(ValueError) as info:
        metrics.parse_address(text)
    assert problem in str(info.value)
    assert "accepted: off, or IP:PORT such as 127.0.0.1:9400 or [::1]:9400" in str(info.value)


def test_metrics_keys_parsed_into_plugin_config():
    plugin = config.parse([(SRC, "[plugin]\nmetrics_address = [::1]:9943\n")]).plugin
    assert plugin.metrics_address == MetricsAddress("::1", 9943)
    assert plugin.metrics_allow_remote is False
    plugin = config.parse([(SRC, "[plugin]\nmetrics_address = 0.0.0.0:1\nmetrics_allow_remote = yes\n")]).plugin
    assert (plugin.metrics_address, plugin.metrics_allow_remote) == (MetricsAddress("0.0.0.0", 1), True)
    # Where the address was written is not part of it: moving the key to a drop-in rebinds nothing.
    moved = config.parse([(SRC, ""), (DROPIN, "[plugin]\nmetrics_address = 127.0.0.1:9943\n")]).plugin
    assert moved == config.parse([(SRC, "[plugin]\nmetrics_address = 127.0.0.1:9943\n")]).plugin


def messages(files: List[tuple]) -> List[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(files)
    return info.value.messages


def test_bad_metrics_address_names_file_section_key_value():
    [message] = messages([(SRC, "[plugin]\nmetrics_address = localhost:9943\n")])
    assert message.startswith(f"{SRC}: [plugin] metrics_address = 'localhost:9943': 'localhost' is not an IP "
                              "address"), message
    assert "accepted: off, or IP:PORT" in message


@pytest.mark.parametrize("address", ["0.0.0.0:9943", "[::]:9943", "192.0.2.7:9943"])
def test_remote_address_refused_without_allow_remote(address):
    [message] = messages([(SRC, f"[plugin]\nmetrics_address = {address}\n")])
    assert message.startswith(f"{SRC}: [plugin] metrics_address = {address!r}: "), message
    assert "is not a loopback address" in message
    assert "accepted: 127.0.0.1:PORT or [::1]:PORT, or this address with metrics_allow_remote = yes" in message
    [message] = messages([(SRC, f"[plugin]\nmetrics_address = {address}\nmetrics_allow_remote = no\n")])
    assert "metrics_allow_remote = yes" in message


def test_remote_rule_holds_across_files():
    """A drop-in may set either key; the rule is judged on the merged [plugin], naming the address's file."""
    allowed = config.parse([(SRC, "[plugin]\nmetrics_allow_remote = yes\n"),
                            (DROPIN, "[plugin]\nmetrics_address = 0.0.0.0:9943\n")]).plugin
    assert allowed.metrics_address == MetricsAddress("0.0.0.0", 9943)
    [message] = messages([(SRC, "[plugin]\nmetrics_allow_remote = yes\n"),
                          (DROPIN, "[plugin]\nmetrics_address = 0.0.0.0:9943\nmetrics_allow_remote = no\n")])
    assert message.startswith(f"{DROPIN}: [plugin] metrics_address = '0.0.0.0:9943': "), message
    # A later file switching metrics off leaves nothing to judge.
    off = config.parse([(SRC, "[plugin]\nmetrics_address = 0.0.0.0:9943\n"),
                        (DROPIN, "[plugin]\nmetrics_address = off\n")]).plugin
    assert off.metrics_address is None


def test_bad_allow_remote_names_the_key():
    [message] = messages([(SRC, "[plugin]\nmetrics_allow_remote = sure\n")])
    assert message.startswith(f"{SRC}: [plugin] metrics_allow_remote = 'sure': accepted: yes or no"), message


def test_every_problem_reported_at_once():
    found = messages([(SRC, "[plugin]\nmetrics_address = 0.0.0.0:9943\nlog_level = loud\n")])
    assert len(found) == 2 and any("log_level" in m for m in found) and any("loopback" in m for m in found)


# --- counting ----------------------------------------------------------------------------------------

def test_histogram_buckets_are_inclusive_and_cumulative():
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (math.inf, 5)]
    assert h.count == 5 and h.sum == pytest.approx(8.65)


@pytest.mark.parametrize("ok, timed_out, abandoned, duration, result", [
    (True, False, False, 0.002, "success"),
    (False, False, False, 0.002, "failure"),
    (False, False, False, 0.0, "failure"),  # could not be started: no run time to record
    (False, True, False, 10.0, "timeout"),
    (False, True, True, 11.0, "abandoned"),
])
def test_health_results(ok, timed_out, abandoned, duration, result):
    stats = ResourceStats()
    stats.health_observed(ok, timed_out, abandoned, duration)
    assert stats.health_results == {k: int(k == result) for k in metrics.HEALTH_RESULTS}
    assert stats.health_duration.count == (1 if duration else 0)


def test_counted_rpcs_by_status_code(tmp_path):
    """A real grpc.aio server: success, abort, an exception, a caller whose deadline passes."""
    counter = RpcCounter()
    events: Dict[str, asyncio.Event] = {}

    async def handler(request: bytes, context: Any) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unhealthy")
        if request == b"raise":
            raise ValueError("a bug")
        if request == b"slow":
            try:
                await asyncio.sleep(30)
            finally:
                events["cancelled"].set()
        return b"ok"

    async def main() -> Dict[str, int]:
        events["cancelled"] = asyncio.Event()  # on the loop (Python 3.9 binds an Event to a loop at creation)
        server = grpc.aio.server()
        wrapped = metrics.counted(counter, handler)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.T", {"M": grpc.unary_unary_rpc_method_handler(wrapped)})])
        path = str(tmp_path / "s.sock")
        server.add_insecure_port("unix:" + path)
        await server.start()
        channel = grpc.aio.insecure_channel("unix:" + path)
        call = channel.unary_unary("/t.T/M")
        try:
            for _ in range(3):
                assert await call(b"x", timeout=10) == b"ok"
            codes = []
            for request in (b"abort", b"abort", b"raise"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(request, timeout=10)
                codes.append(info.value.code())
            assert codes == [grpc.StatusCode.FAILED_PRECONDITION] * 2 + [grpc.StatusCode.UNKNOWN]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"slow", timeout=0.2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(events["cancelled"].wait(), 10)
            for _ in range(1000):  # the wrapper counts right after the handler's finally
                if "CANCELLED" in counter.failed:
                    break
                await asyncio.sleep(0.001)
        finally:
            await channel.close()
            await server.stop(None)
        return counter.by_code()

    assert asyncio.run(main()) == {"OK": 3, "FAILED_PRECONDITION": 2, "UNKNOWN": 1, "CANCELLED": 1}
    assert metrics.counted(counter, handler).__name__ == "handler"


# --- families and text --------------------------------------------------------------------------------

def sample_view(refused: Optional[Dict[str, int]] = None) -> View:
    mem = ResourceStats()
    mem.allocate.ok = 41
    mem.allocate.failed = {"INVALID_ARGUMENT": 2, "FAILED_PRECONDITION": 1}
    mem.prestart.ok = 3
    mem.hotplug_latency.observe(2 ** -12)  # 0.000244140625: sums of powers of two are exact
    mem.hotplug_latency.observe(2 ** -8)
    for _ in range(5):
        mem.health_observed(True, False, False, 0.002)
    mem.health_observed(False, True, False, 10.0)
    fpga = ResourceStats()
    return View(
        version="1.2.3", python="3.9.18", grpcio="1.46.5",
        resources=[
            metrics.ResourceView("example.com/mem", mem, {"Healthy": 2, "Unhealthy": 1}, list_updates=4,
                                 streams=1, registration_state="registered", registrations=2, streams_lost=1,
                                 health_command=True, lagging=True),
            metrics.ResourceView("example.com/fpga", fpga, {}, list_updates=1, streams=0,
                                 registration_state="backoff"),
        ],
        registration_states=["waiting", "registering", "connecting", "registered", "draining", "backoff"],
        kubelet_restarts=3, health_started=6, health_late=4, health_stuck=1,
        refused=refused if refused is not None else {"timeout": 2},
        process=metrics.ProcessView(cpu_seconds=1.25, resident_bytes=52_428_800, virtual_bytes=600_000_000,
                                    open_fds=23, max_fds=1024, start_time=1_764_600_000.5))


# The names, types and order are an interface (dashboards and alerts): change them deliberately.
FAMILIES = """\
udev_device_plugin_build_info gauge
udev_device_plugin_devices gauge
udev_device_plugin_device_list_updates_total counter
udev_device_plugin_allocate_calls_total counter
udev_device_plugin_prestart_calls_total counter
udev_device_plugin_registration_state gauge
udev_device_plugin_registrations_total counter
udev_device_plugin_list_and_watch_streams gauge
udev_device_plugin_list_and_watch_streams_lost_total counter
udev_device_plugin_kubelet_restarts_total counter
udev_device_plugin_hotplug_latency_seconds histogram
udev_device_plugin_health_command_duration_seconds histogram
udev_device_plugin_health_commands_total counter
udev_device_plugin_health_checks_falling_behind gauge
udev_device_plugin_health_checks_started_total counter
udev_device_plugin_health_checks_late_total counter
udev_device_plugin_health_commands_stuck gauge
udev_device_plugin_metrics_requests_refused_total counter
process_cpu_seconds_total counter
process_resident_memory_bytes gauge
process_virtual_memory_bytes gauge
process_open_fds gauge
process_max_fds gauge
process_start_time_seconds gauge
"""

# Prometheus's naming conventions: snake_case, counters end in _total, base units (seconds, bytes).
NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


@pytest.mark.parametrize("renderer", RENDERERS)
def test_family_names_types_and_order(renderer):
    text = render(metrics.families(sample_view()), renderer).decode()
    typed = "".join(line[len("# TYPE "):] + "\n" for line in text.splitlines() if line.startswith("# TYPE "))
    assert typed == FAMILIES
    for line in FAMILIES.splitlines():
        name, kind = line.split()
        assert NAME.match(name) and (name.endswith("_total") == (kind == "counter")), name
        assert not re.search(r"_(ms|milliseconds|kb|mib|percent)(_|$)", name), name


# Expected lines, each exact (the text is sorted by label name within a sample, as generate_latest does).
EXPECTED_LINES = [
    'udev_device_plugin_build_info{grpcio="1.46.5",python="3.9.18",version="1.2.3"} 1.0',
    'udev_device_plugin_devices{health="Healthy",resource="example.com/fpga"} 0.0',
    'udev_device_plugin_devices{health="Healthy",resource="example.com/mem"} 2.0',
    'udev_device_plugin_devices{health="Unhealthy",resource="example.com/mem"} 1.0',
    'udev_device_plugin_allocate_calls_total{code="FAILED_PRECONDITION",resource="example.com/mem"} 1.0',
    'udev_device_plugin_allocate_calls_total{code="INVALID_ARGUMENT",resource="example.com/mem"} 2.0',
    'udev_device_plugin_allocate_calls_total{code="OK",resource="example.com/mem"} 41.0',
    'udev_device_plugin_allocate_calls_total{code="OK",resource="example.com/fpga"} 0.0',
    'udev_device_plugin_prestart_calls_total{code="OK",resource="example.com/mem"} 3.0',
    'udev_device_plugin_registration_state{resource="example.com/mem",state="registered"} 1.0',
    'udev_device_plugin_registration_state{resource="example.com/mem",state="backoff"} 0.0',
    'udev_device_plugin_registration_state{resource="example.com/fpga",state="backoff"} 1.0',
    'udev_device_plugin_registrations_total{resource="example.com/mem"} 2.0',
    'udev_device_plugin_list_and_watch_streams{resource="example.com/mem"} 1.0',
    'udev_device_plugin_list_and_watch_streams_lost_total{resource="example.com/mem"} 1.0',
    'udev_device_plugin_kubelet_restarts_total 3.0',
    'udev_device_plugin_hotplug_latency_seconds_bucket{le="0.0005",resource="example.com/mem"} 1.0',
    'udev_device_plugin_hotplug_latency_seconds_bucket{le="0.0025",resource="example.com/mem"} 1.0',
    'udev_device_plugin_hotplug_latency_seconds_bucket{le="0.005",resource="example.com/mem"} 2.0',
    'udev_device_plugin_hotplug_latency_seconds_bucket{le="10.0",resource="example.com/mem"} 2.0',
    'udev_device_plugin_hotplug_latency_seconds_bucket{le="+Inf",resource="example.com/mem"} 2.0',
    'udev_device_plugin_hotplug_latency_seconds_count{resource="example.com/mem"} 2.0',
    'udev_device_plugin_hotplug_latency_seconds_sum{resource="example.com/mem"} 0.004150390625',
    'udev_device_plugin_hotplug_latency_seconds_count{resource="example.com/fpga"} 0.0',
    'udev_device_plugin_health_command_duration_seconds_bucket{le="0.0025",resource="example.com/mem"} 5.0',
    'udev_device_plugin_health_command_duration_seconds_bucket{le="5.0",resource="example.com/mem"} 5.0',
    'udev_device_plugin_health_command_duration_seconds_bucket{le="10.0",resource="example.com/mem"} 6.0',
    'udev_device_plugin_health_command_duration_seconds_count{resource="example.com/mem"} 6.0',
    'udev_device_plugin_health_commands_total{resource="example.com/mem",result="success"} 5.0',
    'udev_device_plugin_health_commands_total{resource="example.com/mem",result="timeout"} 1.0',
    'udev_device_plugin_health_commands_total{resource="example.com/mem",result="abandoned"} 0.0',
    'udev_device_plugin_health_checks_falling_behind{resource="example.com/mem"} 1.0',
    'udev_device_plugin_health_checks_started_total 6.0',
    'udev_device_plugin_health_checks_late_total 4.0',
    'udev_device_plugin_health_commands_stuck 1.0',
    'udev_device_plugin_metrics_requests_refused_total{reason="timeout"} 2.0',
    'udev_device_plugin_metrics_requests_refused_total{reason="too_large"} 0.0',
    'process_cpu_seconds_total 1.25',
    'process_resident_memory_bytes 5.24288e+07',
    'process_virtual_memory_bytes 6e+08',
    'process_open_fds 23.0',
    'process_start_time_seconds 1.7646000005e+09',
]
# Series that must not be there: a resource without health_command has no health series; one that is
# not served has no registration series.
ABSENT = ['health_command_duration_seconds_count{resource="example.com/fpga"}',
          'health_commands_total{resource="example.com/fpga"',
          'health_checks_falling_behind{resource="example.com/fpga"}']


@pytest.mark.parametrize("renderer", RENDERERS)
def test_text_has_the_expected_samples(renderer):
    text = render(metrics.families(sample_view()), renderer).decode()
    lines = text.splitlines()
    for line in EXPECTED_LINES:
        assert line in lines, f"{line!r} missing from:\n{text}"
    for part in ABSENT:
        assert part not in text
    assert text.endswith("\n")
    # HELP then TYPE before each family's samples.
    assert lines[0].startswith("# HELP udev_device_plugin_build_info ") and lines[1].startswith("# TYPE ")


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
                    r'(NaN|[+-]Inf|[-+]?[0-9.]+(e[-+][0-9]+)?)$')


@pytest.mark.parametrize("renderer", RENDERERS)
def test_every_line_is_valid_exposition_text(renderer):
    text = render(metrics.families(sample_view()), renderer).decode()
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_][a-z0-9_]* \S", line), line
        else:
            assert SAMPLE.match(line), line


def tricky_families() -> List[metrics.Family]:
    """Label values and help text that need escaping, values that need Go's float forms."""
    fam = metrics.Family("t_gauge", "gauge", 'help with \\ backslash\nand "quotes"', ("a", "b"), [])
    fam.samples.extend([
        (('back\\slash', 'new\nline'), 1),
        (('"quoted"', 'plain'), 0.5),
        (('big', 'x'), 1234567.0),
        (('bigger', 'x'), 12345678901234567890),
        (('small', 'x'), 1e-7),
        (('inf', 'x'), math.inf),
        (('nan', 'x'), math.nan),
        (('neg', 'x'), -2.5),
        (('utf8', '\u00e9\u4e2d'), 3),
    ])
    histogram = metrics.Family("t_seconds", "histogram", "h", ("z",), [])
    h = Histogram((0.001, 1.0, 1e7))
    h.observe(0.5)
    histogram.samples.append((("v",), (h.cumulative(), h.sum)))
    counter = metrics.Family("t_things_total", "counter", "c", (), [((), 7)])
    empty = metrics.Family("t_none_total", "counter", "no samples yet", ("resource",), [])
    return [fam, histogram, counter, empty]


def test_escaping_and_float_forms():
    text = metrics.render_text(tricky_families()).decode()
    assert '# HELP t_gauge help with \\\\ backslash\\nand "quotes"\n' in text
    for line in ['t_gauge{a="back\\\\slash",b="new\\nline"} 1.0', 't_gauge{a="\\"quoted\\"",b="plain"} 0.5',
                 't_gauge{a="big",b="x"} 1.234567e+06', 't_gauge{a="bigger",b="x"} 1.2345678901234567e+19',
                 't_gauge{a="small",b="x"} 1e-07', 't_gauge{a="inf",b="x"} +Inf', 't_gauge{a="nan",b="x"} NaN',
                 't_gauge{a="neg",b="x"} -2.5', 't_gauge{a="utf8",b="\u00e9\u4e2d"} 3.0',
                 't_seconds_bucket{le="1e+07",z="v"} 1.0', 't_seconds_bucket{le="+Inf",z="v"} 1.0',
                 't_things_total 7.0']:
        assert line in text.splitlines(), f"{line!r} missing from:\n{text}"


GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_golden.txt")


def golden_families() -> List[metrics.Family]:
    return metrics.families(sample_view()) + tricky_families()


@pytest.mark.parametrize("renderer", RENDERERS)
def test_text_is_what_prometheus_client_writes(renderer):
    """metrics_golden.txt is prometheus_client's generate_latest of these families (0.26.0; 0.21.0 and
    0.21.1, EPEL 9's and 10's, write the same).  Ours must match it on every stack, and where this stack
    has prometheus_client, so must it (python -m tests.unit.test_metrics rewrites the file with it)."""
    with open(GOLDEN, "rb") as f:
        assert render(golden_families(), renderer) == f.read()


@pytest.mark.parametrize("renderer", RENDERERS)
def test_text_parses_back(renderer):
    """prometheus_client's own parser reads our text (where it is installed); a strict reading of the
    format's sample lines agrees with the values everywhere."""
    text = metrics.render_text(metrics.families(sample_view())).decode()
    if renderer == "prometheus_client":
        from prometheus_client.parser import text_string_to_metric_families

        parsed = {f.name: f for f in text_string_to_metric_families(text)}
        assert parsed["udev_device_plugin_allocate_calls"].type == "counter"
        assert parsed["udev_device_plugin_hotplug_latency_seconds"].type == "histogram"
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parsed.values() for s in f.samples}
    else:
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, labels, value = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line).groups()  # type: ignore
            pairs = tuple(sorted(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels or "")))
            values[(name, pairs)] = float(value)
    assert values[("udev_device_plugin_devices", (("health", "Unhealthy"), ("resource", "example.com/mem")))] == 1
    assert values[("process_start_time_seconds", ())] == 1_764_600_000.5
    assert values[("udev_device_plugin_hotplug_latency_seconds_sum", (("resource", "example.com/mem"),))] == \
        0.004150390625


@pytest.mark.parametrize("value", [0, 1, 3, 0.5, 1e-9, 999999.0, 1000000.0, 1234567.0, 2.5e9, 1e16, 1e22,
                                   12345678901234567890, -3.0, math.inf, -math.inf])
def test_go_float_is_generate_latests(value):
    expected = {0: "0.0", 1: "1.0", 3: "3.0", 0.5: "0.5", 1e-9: "1e-09", 999999.0: "999999.0",
                1000000.0: "1e+06", 1234567.0: "1.234567e+06", 2.5e9: "2.5e+09", 1e16: "1e+16", 1e22: "1e+22",
                12345678901234567890: "1.2345678901234567e+19", -3.0: "-3.0", math.inf: "+Inf",
                -math.inf: "-Inf"}
    assert metrics.go_float(value) == expected[value]
    if HAVE_CLIENT:
        from prometheus_client.utils import floatToGoString

        assert metrics.go_float(value) == floatToGoString(value)


# --- packaging of the optional dependency ----------------------------------------------------------------

def test_metrics_extra_and_rpm_recommends_share_the_floor():
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"))
    assert parser["options.extras_require"]["metrics"].split() == ["prometheus_client>=0.21"]
    proc = subprocess.run(["rpmspec", "-q", "--define", "pkg_version 0.1.0", "--qf",
                           "[%{RECOMMENDNAME} %{RECOMMENDFLAGS:depflags} %{RECOMMENDVERSION}\\n]",
                           os.path.join(ROOT, "packaging", "rpm", "udev-device-plugin.spec")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0].split() == ["python3-prometheus_client", ">=", "0.21"]


if __name__ == "__main__":  # rewrite metrics_golden.txt with prometheus_client, after checking a change
    with open(GOLDEN, "wb") as out:
        out.write(metrics.render_prometheus_client(golden_families()))


def test_an_address_is_an_immutable_value_equal_by_host_and_port():
    a = MetricsAddress("127.0.0.1", 9943, "127.0.0.1:9943", "/etc/a.conf")
    b = MetricsAddress("127.0.0.1", 9943, " 127.0.0.1:9943", "/etc/b.conf")
    assert a == b and hash(a) == hash(b) and a != MetricsAddress("127.0.0.1", 9944) and a != "127.0.0.1:9943"
    assert str(a) == "127.0.0.1:9943" and str(MetricsAddress("::1", 1)) == "[::1]:1"
    with pytest.raises(AttributeError):
        a.port = 1  # type: ignore[misc]
