"""/metrics scraped over HTTP from the running daemon: the values follow devices, health commands, Allocate,
PreStartContainer, kubelet restarts and dropped streams; scrapers that send nothing, too much or too
many connections are cut off while the kubelet's calls go on; SIGHUP moves the address; a port that is
taken is retried; a remote address needs metrics_allow_remote.  (Hotplug: tests/hotplug/test_metrics.py.)"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Dict, FrozenSet, List, Optional, Tuple

import grpc
import pytest

from udev_device_plugin import __version__

from ..conftest import DaemonProcess, Notifications, wait_until
from .helpers import EXIT_CONFIG, MEM, MEM_CONF, RecordingKubelet, cli, config_path, rewrite_config, wait_log

HAVE_CLIENT = importlib.util.find_spec("prometheus_client") is not None
METRICS = "[plugin]\nmetrics_address = {address}\n"
SERVING = re.compile(r"metrics: serving http://(\S+)/metrics")
# zero's prestart_command fails, full's health_command fails ($0: the first device ID / the device's ID).
MEM_CHECKED = MEM_CONF + """\
prestart_command = /bin/sh -c 'test "$0" != zero'
health_command = /bin/sh -c 'test "$0" != full'
health_interval = 0.5
health_timeout = 0.4
"""

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def url(daemon: DaemonProcess, count: int = 1) -> str:
    """The address the daemon logged it serves (the ``count``-th time), as a URL."""
    wait_log(daemon, "metrics: serving http://", count)
    return f"http://{SERVING.findall(daemon.log())[count - 1]}/metrics"


def get(target: str, timeout: float = 10) -> Tuple[int, Dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(target, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def scrape(target: str) -> Samples:
    status, headers, body = get(target)
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8", (status, body)
    samples: Samples = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def wait_value(target: str, name: str, expected: float, timeout: float = 10.0, **labels: str) -> Samples:
    """Scrape until ``name{labels}`` is ``expected``; the last scrape."""
    seen: Dict[str, Samples] = {}

    def check() -> bool:
        seen["last"] = scrape(target)
        return value(seen["last"], name, **labels) == expected

    try:
        wait_until(check, timeout, f"{name}{labels} == {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {value(seen['last'], name, **labels)}") from None
    return seen["last"]


def wait_all(target: str, expected: List[Tuple[str, Dict[str, str], float]], timeout: float = 10.0) -> Samples:
    """Scrape until every ``(name, labels, value)`` holds in one scrape (the daemon renders at most once a
    second, so a scrape right after an action may show the moment before it); that scrape."""
    seen: Dict[str, Samples] = {}

    def wrong() -> List[str]:
        return [f"{n}{labels} is {value(seen['last'], n, **labels)}, expected {v}" for n, labels, v in expected
                if value(seen["last"], n, **labels) != v]

    def check() -> bool:
        seen["last"] = scrape(target)
        return not wrong()

    try:
        wait_until(check, timeout, "the metrics expected")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {'; '.join(wrong())}") from None
    return seen["last"]


def shadowed_client(tmp_path) -> Dict[str, str]:
    """An environment in which ``import prometheus_client`` fails, as on a node without the package."""
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("prometheus_client hidden by the test")\n')
    return {"PYTHONPATH": os.pathsep.join([str(shadow.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}


# Every renderer this stack can use: the daemon's choice (prometheus_client where installed) and, where it
# is installed, ours with it hidden.  The unit tests prove the two write the same bytes.
RENDERERS = ["default"] + (["builtin"] if HAVE_CLIENT else [])


@pytest.mark.parametrize("renderer", RENDERERS)
def test_metrics_follow_devices_calls_health_and_the_kubelet(kubelet: RecordingKubelet, start_daemon, tmp_path,
                                                             renderer):
    env = shadowed_client(tmp_path) if renderer == "builtin" else None
    daemon = start_daemon(METRICS.format(address="127.0.0.1:0") + MEM_CHECKED, env=env)
    kubelet.wait_live(MEM)
    target = url(daemon)
    if renderer == "default" and HAVE_CLIENT:
        wait_log(daemon, "metrics: rendered by prometheus_client ")
    else:
        wait_log(daemon, "metrics: prometheus_client is not installed; the daemon writes the text format itself")

    # Devices by health (full's health_command fails), the registration, the build.
    samples = wait_all(target, [
        ("udev_device_plugin_devices", {"health": "Unhealthy", "resource": MEM}, 1),
        ("udev_device_plugin_devices", {"health": "Healthy", "resource": MEM}, 2),
        ("udev_device_plugin_registration_state", {"resource": MEM, "state": "registered"}, 1),
        ("udev_device_plugin_registration_state", {"resource": MEM, "state": "backoff"}, 0),
        ("udev_device_plugin_registrations_total", {"resource": MEM}, 1),
        ("udev_device_plugin_list_and_watch_streams", {"resource": MEM}, 1),
        ("udev_device_plugin_kubelet_restarts_total", {}, 0),
        ("udev_device_plugin_allocate_calls_total", {"code": "OK", "resource": MEM}, 0)])
    assert value(samples, "udev_device_plugin_build_info", version=__version__, python=os.sys.version.split()[0],
                 grpcio=grpc.__version__) == 1
    assert value(samples, "udev_device_plugin_device_list_updates_total", resource=MEM) >= 2
    assert 0 < value(samples, "process_open_fds") < 200
    assert time.time() - 600 < value(samples, "process_start_time_seconds") <= time.time()
    assert value(samples, "process_resident_memory_bytes") > 10 * 1024 * 1024

    # Health commands: successes (null, zero), failures (full), their durations.
    wait_until(lambda: (value(scrape(target), "udev_device_plugin_health_commands_total", resource=MEM,
                              result="failure") or 0) >= 2, what="two failed health_command runs")
    samples = scrape(target)
    runs = {r: value(samples, "udev_device_plugin_health_commands_total", resource=MEM, result=r)
            for r in ("success", "failure", "timeout", "abandoned")}
    assert runs["success"] >= 2 and runs["timeout"] == runs["abandoned"] == 0, runs
    count = value(samples, "udev_device_plugin_health_command_duration_seconds_count", resource=MEM)
    assert count == runs["success"] + runs["failure"]
    assert 0 < value(samples, "udev_device_plugin_health_command_duration_seconds_sum", resource=MEM) < count * 0.4
    assert value(samples, "udev_device_plugin_health_checks_falling_behind", resource=MEM) == 0
    assert value(samples, "udev_device_plugin_health_checks_started_total") >= count

    # Allocate: a success, an unknown ID, an unhealthy one.
    kubelet.allocate(MEM, ["null"])
    for ids, code in ((["nope"], grpc.StatusCode.INVALID_ARGUMENT), (["full"], grpc.StatusCode.FAILED_PRECONDITION)):
        with pytest.raises(grpc.RpcError) as info:
            kubelet.allocate(MEM, ids)
        assert info.value.code() == code
    # (grpc.aio sends an aborted call's status before the handler ends, where it is counted: the caller can
    # be a moment ahead of the count, besides the render's second.)
    wait_all(target, [("udev_device_plugin_allocate_calls_total", {"code": c, "resource": MEM}, 1)
                      for c in ("OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION")])

    # PreStartContainer: a success, a failing prestart_command, an unknown ID.
    kubelet.prestart(MEM, ["null"])
    for ids, code in ((["zero"], grpc.StatusCode.INTERNAL), (["nope"], grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as info:
            kubelet.prestart(MEM, ids)
        assert info.value.code() == code
    wait_all(target, [("udev_device_plugin_prestart_calls_total", {"code": c, "resource": MEM}, 1)
                      for c in ("OK", "INTERNAL", "INVALID_ARGUMENT")])

    # A kubelet restart: seen, and registered again.
    kubelet.restart()
    kubelet.wait_live(MEM, count=2)
    samples = wait_all(target, [("udev_device_plugin_registrations_total", {"resource": MEM}, 2),
                                ("udev_device_plugin_kubelet_restarts_total", {}, 1)])

    # The kubelet ends the stream: counted, and registered again on a fresh socket.  (The restart above
    # may have ended one too, depending on whether the stream or the socket went first.)
    lost = value(samples, "udev_device_plugin_list_and_watch_streams_lost_total", resource=MEM)
    assert lost in (0, 1)
    kubelet.drop(MEM)
    kubelet.wait_live(MEM, count=3)
    wait_all(target, [("udev_device_plugin_list_and_watch_streams_lost_total", {"resource": MEM}, lost + 1),
                      ("udev_device_plugin_registration_state", {"resource": MEM, "state": "registered"}, 1),
                      ("udev_device_plugin_registrations_total", {"resource": MEM}, 3),
                      ("udev_device_plugin_list_and_watch_streams", {"resource": MEM}, 1),
                      ("udev_device_plugin_metrics_requests_refused_total", {"reason": "timeout"}, 0)])


def test_misbehaving_scrapers_are_cut_off_and_the_kubelet_is_served(kubelet: RecordingKubelet, start_daemon):
    daemon = start_daemon(METRICS.format(address="127.0.0.1:0") + MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    target = url(daemon)
    host, port = target.split("/")[2].split(":")
    where = (host, int(port))

    # A scraper that sends megabytes of header: answered 431 and cut off at the bound, not read to the end.
    huge = socket.create_connection(where, timeout=10)
    sent = 0
    with pytest.raises(OSError):
        while sent < 256 * 1024 * 1024:
            huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 65536)
            sent += 65536
    huge.close()
    assert sent < 256 * 1024 * 1024

    # Eight that connect and send nothing hold every slot; a ninth is answered 503.  Meanwhile the kubelet's
    # calls are answered as ever.
    started = time.monotonic()
    idle = [socket.create_connection(where, timeout=10) for _ in range(8)]
    wait_until(lambda: get(target)[0] == 503, 10, "a ninth connection to be refused")
    for _ in range(50):
        kubelet.allocate(MEM, ["null"], wait=5)
    kubelet.prestart(MEM, ["zero"], wait=5)
    for sock in idle:  # each is closed by the daemon within its 5 s to send a request
        assert sock.recv(1) == b""
        sock.close()
    assert time.monotonic() - started >= 4.5
    samples = wait_all(target, [
        ("udev_device_plugin_metrics_requests_refused_total", {"reason": "timeout"}, 8),
        ("udev_device_plugin_metrics_requests_refused_total", {"reason": "too_large"}, 1),
        ("udev_device_plugin_allocate_calls_total", {"code": "OK", "resource": MEM}, 50),
        ("udev_device_plugin_prestart_calls_total", {"code": "OK", "resource": MEM}, 1)])
    assert value(samples, "udev_device_plugin_metrics_requests_refused_total", reason="too_many_connections") >= 1
    assert get(target.replace("/metrics", "/"))[0] == 404
    assert daemon.proc.poll() is None


def test_sighup_moves_and_stops_the_metrics(kubelet: RecordingKubelet, start_daemon):
    daemon = start_daemon(METRICS.format(address="127.0.0.1:0") + MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    first = url(daemon)
    assert value(scrape(first), "udev_device_plugin_devices", health="Healthy", resource=MEM) == 3

    rewrite_config(daemon, METRICS.format(address="[::1]:0") + MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    second = url(daemon, 2)
    assert second.startswith("http://[::1]:")
    assert value(scrape(second), "udev_device_plugin_devices", health="Healthy", resource=MEM) == 3
    with pytest.raises(urllib.error.URLError):
        get(first)

    # Another setting changes nothing of the metrics: the same socket keeps serving.
    rewrite_config(daemon, METRICS.format(address="[::1]:0") + "log_level = debug\n" + MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "configuration reloaded", 2)
    assert scrape(second) and daemon.log().count("metrics: serving http://") == 2

    rewrite_config(daemon, METRICS.format(address="off") + MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, f"metrics: no longer serving {second}")
    with pytest.raises(urllib.error.URLError):
        get(second)
    kubelet.wait_live(MEM, devices=3)
    assert len(kubelet.endpoints(MEM)) == 1, "the metrics settings must not re-register anything"


def test_port_taken_is_logged_and_retried_while_devices_are_served(kubelet: RecordingKubelet, start_daemon,
                                                                   notifications: Notifications):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        daemon = start_daemon(METRICS.format(address=f"127.0.0.1:{port}") + MEM_CONF,
                              env={"NOTIFY_SOCKET": notifications.path})
        wait_log(daemon, f"metrics_address ({config_path(daemon)}): cannot listen on 127.0.0.1:{port}: "
                 "Address already in use; retrying")
        kubelet.wait_live(MEM, devices=3)
        wait_until(lambda: any(f"; metrics: cannot listen on 127.0.0.1:{port}: Address already in use" in line
                               for line in notifications.lines() if line.startswith("STATUS=")),
                   what="STATUS= naming the metrics problem")
    finally:
        blocker.close()
    assert url(daemon) == f"http://127.0.0.1:{port}/metrics"  # within the next retries (1 s, 2 s, ...)
    assert value(scrape(f"http://127.0.0.1:{port}/metrics"), "udev_device_plugin_devices", health="Healthy",
                 resource=MEM) == 3

    def statuses() -> list:
        return [line for line in notifications.lines() if line.startswith("STATUS=")]

    wait_until(lambda: "metrics:" not in statuses()[-1], what="STATUS= without the metrics problem once served")


def test_remote_address_needs_allow_remote(kubelet: RecordingKubelet, start_daemon, tmp_path):
    daemon = start_daemon(METRICS.format(address="0.0.0.0:0") + MEM_CONF)
    assert daemon.proc.wait(30) == EXIT_CONFIG
    assert "[plugin] metrics_address = '0.0.0.0:0': 0.0.0.0 is not a loopback address" in daemon.log()
    checked = cli("check-config", "--config", config_path(daemon))
    assert checked.returncode == EXIT_CONFIG and "metrics_allow_remote = yes" in checked.stderr

    daemon = start_daemon(METRICS.format(address="0.0.0.0:0") + "metrics_allow_remote = yes\n" + MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    bound = url(daemon)
    assert bound.startswith("http://0.0.0.0:")
    assert value(scrape(bound.replace("0.0.0.0", "127.0.0.1")), "udev_device_plugin_devices", health="Healthy",
                 resource=MEM) == 3
