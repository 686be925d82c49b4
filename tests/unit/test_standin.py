"""tests/standin.py itself: the kubelet behaviours the daemon's tests rely on, proven against a small
fake plugin served by grpc on real UNIX sockets under tmp_path (not the daemon)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent import futures
from typing import Any, Dict, Iterator, List, Optional

import grpc
import pytest

from udev_device_plugin import api

from ..conftest import ROOT, wait_until
from ..standin import (
    BEHAVIOURS,
    CHECKPOINT,
    LiveKubelet,
    NoAnswer,
    StandInKubelet,
    append_bounded,
    is_extended_resource_name,
    write_file_atomically,
)

RES = "example.com/thing"


_END, _GONE = object(), object()


class FakePlugin:
    """A DevicePlugin server on ``directory/name``: sends its device list when a stream opens and on
    ``push()``, records how each stream ended and the deadline each call carried; ``hold=True`` makes
    GetDevicePluginOptions and Allocate wait until ``release()`` (or until their call is cancelled)."""

    def __init__(self, directory: str, name: str, devices: tuple = ("a", "b"), hold: bool = False) -> None:
        self.path = os.path.join(directory, name)
        self.name = name
        self.devices = list(devices)
        self.cond = threading.Condition()
        self.streams: List[queue.Queue] = []  # one per stream opened: what it sends next
        self.ends: List[str] = []  # per ended stream: "plugin" (ended here) or "kubelet" (cancelled there)
        self.deadlines: Dict[str, Optional[float]] = {}  # method -> context.time_remaining() seen
        self.held = hold
        self._holders: List[threading.Event] = []
        self._executor = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"fake-{name}")
        self.server = grpc.server(self._executor)
        self.server.add_generic_rpc_handlers([api.service_handler(api.DEVICE_PLUGIN, {
            "GetDevicePluginOptions": api.method_handler(api.GET_DEVICE_PLUGIN_OPTIONS, self.GetDevicePluginOptions),
            "ListAndWatch": api.method_handler(api.LIST_AND_WATCH, self.ListAndWatch),
            "Allocate": api.method_handler(api.ALLOCATE, self.Allocate),
            "PreStartContainer": api.method_handler(api.PRE_START_CONTAINER, self.PreStartContainer),
        })])
        self.server.add_insecure_port("unix:" + self.path)
        self.server.start()

    def _deadline(self, method: str, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        self.deadlines[method] = None if remaining is None or remaining > 1e9 else remaining  # grpcio: "infinite"

    def _hold(self, method: str, context: grpc.ServicerContext) -> None:
        self._deadline(method, context)
        wake = threading.Event()
        context.add_callback(wake.set)  # the call ended (cancelled by the client): stop waiting
        with self.cond:
            if not self.held:
                return
            self._holders.append(wake)
        assert wake.wait(60), f"{method} held for 60 s"

    def hold(self) -> None:
        with self.cond:
            self.held = True

    def release(self) -> None:
        with self.cond:
            self.held = False
            for wake in self._holders:
                wake.set()
            self._holders.clear()

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._hold("GetDevicePluginOptions", context)
        return api.DevicePluginOptions(get_preferred_allocation_available=True)

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._hold("Allocate", context)
        return api.AllocateResponse(container_responses=[api.ContainerAllocateResponse()])

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._deadline("PreStartContainer", context)
        return api.PreStartContainerResponse()

    def _message(self) -> Any:
        return api.ListAndWatchResponse(devices=[api.Device(ID=i, health="Healthy") for i in self.devices])

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        sends: queue.Queue = queue.Queue()
        context.add_callback(lambda: sends.put(_GONE))
        with self.cond:
            self.streams.append(sends)
            self.cond.notify_all()
        how = "kubelet"
        try:
            yield self._message()
            while True:
                item = sends.get(timeout=60)
                if item is _GONE:
                    break
                if item is _END:
                    how = "plugin"
                    break
                yield item
        finally:
            with self.cond:
                self.ends.append(how)
                self.cond.notify_all()

    def open_streams(self) -> int:
        with self.cond:
            return len(self.streams) - len(self.ends)

    def push(self) -> None:
        """Send the device list again on every stream."""
        with self.cond:
            for sends in self.streams:
                sends.put(self._message())

    def end_streams(self) -> None:
        """The plugin ends every stream it serves (its server going away does the same)."""
        with self.cond:
            for sends in self.streams:
                sends.put(_END)

    def stop(self) -> None:
        self.release()
        self.end_streams()
        self.server.stop(grace=None).wait(5)
        self._executor.shutdown(wait=True)


@pytest.fixture
def plugins(kubelet_dir) -> Iterator[Any]:
    started: List[FakePlugin] = []

    def start(name: str, **kwargs: Any) -> FakePlugin:
        plugin = FakePlugin(kubelet_dir, name, **kwargs)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        plugin.stop()


@pytest.fixture
def standin(kubelet_dir) -> Iterator[Any]:
    started: List[StandInKubelet] = []

    def start(behaviour: str, **kwargs: Any) -> StandInKubelet:
        k = StandInKubelet(kubelet_dir, behaviour=behaviour, **kwargs).start()
        started.append(k)
        return k

    yield start
    for k in started:
        k.stop()


def register(kubelet: StandInKubelet, endpoint: str, resource: str = RES, version: str = "v1beta1",
             timeout: float = 20, **options: bool) -> Optional[str]:
    """Register as a plugin does; return the error the kubelet answered, or None."""
    with grpc.insecure_channel("unix:" + kubelet.socket) as channel:
        request = api.RegisterRequest(version=version, endpoint=endpoint, resource_name=resource,
                                      options=api.DevicePluginOptions(**options))
        try:
            api.Stub(channel, (api.REGISTER,)).Register(request, timeout=timeout)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNKNOWN, exc
            return exc.details()
    return None


def live(kubelet: StandInKubelet, plugin: FakePlugin, resource: str = RES) -> bool:
    """The kubelet's endpoint for ``resource`` is ``plugin``, its stream open and its list in, healthy."""
    with kubelet.cond:
        client = kubelet.clients.get(resource)
        return (client is not None and client.endpoint == plugin.name and client.connected
                and kubelet.allocatable(resource) == len(plugin.devices))


def wait_live(kubelet: StandInKubelet, plugin: FakePlugin, resource: str = RES) -> None:
    assert kubelet.wait_for(lambda: live(kubelet, plugin, resource), 10), kubelet.snapshot()
    wait_until(lambda: plugin.open_streams() == 1, 5, f"{plugin.name}'s stream to open")


# --- the #121994 window, release by release -------------------------------------------------------

@pytest.mark.parametrize("behaviour, new_survives, new_endpoint_stopped", [
    # 1.20: the old endpoint is not the current one: its end touches nothing.
    ("1.20", True, False),
    # 1.25-1.35: the old client's cleanup looks the client up by name and disconnects the new one.
    ("1.25", False, True),
    # 1.36: only the old path's client is disconnected, but PluginDisconnected (by resource name)
    # still makes the resource unhealthy and stops its endpoint.
    ("1.36", True, True),
])
def test_old_stream_ending_after_a_reregistration(standin, plugins, behaviour, new_survives, new_endpoint_stopped):
    kubelet = standin(behaviour)
    old = plugins("old.sock")
    assert register(kubelet, "old.sock") is None
    wait_live(kubelet, old)
    old_client = kubelet.client(RES)
    new = plugins("new.sock")
    assert register(kubelet, "new.sock") is None
    wait_live(kubelet, new)
    assert old.open_streams() == 1 and not old_client.closed, "a new registration closes nothing of the old one"

    old.end_streams()  # the plugin retires its old socket only after registering the new one
    wait_until(lambda: old.ends == ["plugin"], 5, "the old stream to end")
    assert old_client.thread is not None
    wait_until(lambda: not old_client.thread.is_alive(), 5, "the kubelet's teardown of the old client")
    if new_survives:
        # The old client's connection is closed; the new stream stays open.
        assert old_client.closed
        assert new.open_streams() == 1 and new.ends == [] and kubelet.connected(RES)
    else:
        # The kubelet closed the NEW connection: its stream ends, cancelled from the kubelet's side.
        wait_until(lambda: new.ends == ["kubelet"], 5, "the kubelet to cancel the new stream")
        assert kubelet.wait_for(lambda: not kubelet.connected(RES), 5)
        assert kubelet.client(RES).endpoint == "new.sock" and kubelet.client(RES).closed
        # ... and never closes the old client's own connection.
        assert [c.endpoint for c in kubelet.leaked] == ["old.sock"] and not kubelet.leaked[0].closed
    assert kubelet.stopped(RES) == new_endpoint_stopped
    healthy = 0 if new_endpoint_stopped else 2
    assert kubelet.allocatable(RES) == healthy and kubelet.capacity(RES) == 2
    assert len(kubelet.registrations) == 2


def test_1_36_a_later_message_on_the_new_stream_restores_the_devices(standin, plugins):
    """After the old client's disconnect the new stream still delivers: its next list counts (the
    endpoint stays marked stopped); a Register on the path it holds is refused."""
    kubelet = standin("1.36")
    old, new = plugins("old.sock"), plugins("new.sock")
    assert register(kubelet, "old.sock") is None
    wait_live(kubelet, old)
    assert register(kubelet, "new.sock") is None
    wait_live(kubelet, new)
    old.end_streams()
    assert kubelet.wait_for(lambda: kubelet.allocatable(RES) == 0, 5)
    seq = kubelet.messages[RES]
    new.push()
    assert kubelet.wait_for(lambda: kubelet.messages[RES] == seq + 1, 5)
    assert kubelet.allocatable(RES) == 2 and kubelet.stopped(RES) and kubelet.connected(RES)
    assert register(kubelet, "new.sock") == f"a plugin is already registered on socket {new.path}"


# --- Register: when the kubelet dials, what it refuses -----------------------------------------------

def test_1_20_answers_register_before_dialling(standin, plugins, kubelet_dir):
    kubelet = standin("1.20", dial_timeout=10)
    # Nothing serves late.sock yet: the Register answer cannot have waited for a dial.
    assert register(kubelet, "late.sock", get_preferred_allocation_available=True) is None
    assert [r["endpoint"] for r in kubelet.registrations] == ["late.sock"] and RES not in kubelet.clients
    late = plugins("late.sock")  # the kubelet's dial (still retrying) now connects
    wait_live(kubelet, late)
    # 1.20 takes the options from the RegisterRequest and never asks the plugin.
    assert kubelet.client(RES).options.get_preferred_allocation_available
    assert "GetDevicePluginOptions" not in late.deadlines


def test_1_20_failed_dial_is_only_logged(standin):
    kubelet = standin("1.20", dial_timeout=0.3)
    assert register(kubelet, "nobody.sock") is None  # the plugin is told OK
    assert kubelet.wait_for(lambda: kubelet.dial_failures, 5)
    [failure] = kubelet.dial_failures
    assert failure["endpoint"] == "nobody.sock" and failure["resource"] == RES
    assert RES not in kubelet.clients and kubelet.refused == []


@pytest.mark.parametrize("behaviour", ["1.25", "1.36"])
def test_register_dials_synchronously_and_asks_for_options_without_deadline(standin, plugins, behaviour):
    kubelet = standin(behaviour, dial_timeout=0.3)
    error = register(kubelet, "nobody.sock")
    assert error is not None and error.startswith("failed to dial device plugin"), error
    assert kubelet.refused == [error] and kubelet.registrations == []

    slow = plugins("slow.sock", hold=True)
    answer: List[Optional[str]] = []
    caller = threading.Thread(target=lambda: answer.append(register(kubelet, "slow.sock")))
    caller.start()
    wait_until(lambda: "GetDevicePluginOptions" in slow.deadlines, 5, "GetDevicePluginOptions during Register")
    assert slow.deadlines["GetDevicePluginOptions"] is None, "the kubelet sets no deadline"
    assert answer == [] and kubelet.registrations == [], "Register waits for the options"
    slow.release()
    caller.join(10)
    assert answer == [None]
    wait_live(kubelet, slow)
    assert kubelet.client(RES).options.get_preferred_allocation_available


@pytest.mark.parametrize("behaviour, refused", [("1.20", False), ("1.25", False), ("1.36", True)])
def test_a_duplicate_registration_on_a_held_path(standin, plugins, behaviour, refused):
    kubelet = standin(behaviour)
    plugin = plugins("one.sock")
    assert register(kubelet, "one.sock") is None
    wait_live(kubelet, plugin)
    error = register(kubelet, "one.sock")
    if refused:
        assert error == f"a plugin is already registered on socket {plugin.path}"
        assert plugin.open_streams() == 1 and len(kubelet.registrations) == 1
    else:
        assert error is None
        wait_until(lambda: len(plugin.streams) == 2, 5, "a second stream on the same socket")


@pytest.mark.parametrize("request_fields, error", [
    ({"version": "v1alpha"}, "requested API version 'v1alpha' is not supported by kubelet. "
                             "Supported versions are ['v1beta1']"),
    ({"resource": "thing"}, "the ResourceName 'thing' is invalid"),
    ({"resource": "kubernetes.io/thing"}, "the ResourceName 'kubernetes.io/thing' is invalid"),
])
@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_register_validation(standin, behaviour, request_fields, error):
    kubelet = standin(behaviour)
    assert register(kubelet, "x.sock", **request_fields) == error
    assert kubelet.refused == [error] and kubelet.registrations == []


@pytest.mark.parametrize("name, valid", [
    ("example.com/fpga", True), ("a.b/c_d-e.f", True), ("example.com/" + "x" * 63, True),
    ("fpga", False), ("kubernetes.io/fpga", False), ("gpu.kubernetes.io/x", False), ("requests.x/y", False),
    ("Example.com/fpga", False), ("example.com/a/b", False), ("example.com/", False), ("/fpga", False),
    ("example.com/" + "x" * 64, False), ("example.com/-x", False), ("example.com/x_", False),
    ("-example.com/x", False), ("exa mple.com/x", False),
])
def test_extended_resource_names(name, valid):
    assert is_extended_resource_name(name) is valid


# --- calls without deadlines, faults --------------------------------------------------------------

@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_calls_carry_no_deadline_and_the_test_bounds_its_wait(standin, plugins, behaviour):
    kubelet = standin(behaviour)
    plugin = plugins("p.sock")
    assert register(kubelet, "p.sock") is None
    wait_live(kubelet, plugin)
    plugin.hold()
    with pytest.raises(NoAnswer, match="Allocate not answered within the test's 0.2 s"):
        kubelet.allocate(RES, ["a"], wait=0.2)
    assert plugin.deadlines["Allocate"] is None
    plugin.release()
    assert len(kubelet.allocate(RES, ["a"]).container_responses) == 1
    kubelet.prestart(RES, ["a"])
    deadline = plugin.deadlines["PreStartContainer"]
    assert deadline is not None and 20 < deadline < 31, "PreStartContainer: the kubelet's 30 s (rounded up on the wire)"


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_drop_ends_the_stream_from_the_kubelet_side_without_reconnect(standin, plugins, behaviour):
    kubelet = standin(behaviour)
    plugin = plugins("p.sock")
    assert register(kubelet, "p.sock") is None
    wait_live(kubelet, plugin)
    kubelet.drop(RES)
    wait_until(lambda: plugin.ends == ["kubelet"], 5, "the plugin to see its stream cancelled")
    assert kubelet.wait_for(lambda: not kubelet.connected(RES) and kubelet.allocatable(RES) == 0, 5)
    assert kubelet.stopped(RES) and kubelet.capacity(RES) == 2
    assert len(plugin.streams) == 1, "the kubelet never reconnects"
    with pytest.raises(KeyError, match="no open ListAndWatch stream"):
        kubelet.drop(RES)


def test_socket_faults(standin, plugins, tmp_path):
    kubelet = standin("1.36")
    plugin = plugins("p.sock")
    assert register(kubelet, "p.sock") is None
    wait_live(kubelet, plugin)
    before = os.lstat(kubelet.socket)
    kubelet.touch_socket(mode=0o600, uid=os.getuid(), gid=os.getgid())
    after = os.lstat(kubelet.socket)
    assert after.st_ino == before.st_ino and stat.S_IMODE(after.st_mode) == 0o600
    assert after.st_ctime_ns >= before.st_ctime_ns

    os.link(kubelet.socket, tmp_path / "old-kubelet.sock")  # keeps the old inode from being reused
    kubelet.recreate_socket()
    assert os.lstat(kubelet.socket).st_ino != before.st_ino
    assert live(kubelet, plugin) and plugin.open_streams() == 1, "a new kubelet.sock is not a restart"
    other = plugins("other.sock")
    assert register(kubelet, "other.sock", resource="example.com/other") is None  # the new one serves
    wait_live(kubelet, other, "example.com/other")


# --- start, restart, the directory -------------------------------------------------------------------

def make_socket(path: str, listen: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    if listen:
        s.listen(1)
    return s


@pytest.mark.parametrize("cleanup, removed", [
    ("sockets", {"stale.sock", "link-to-socket", "kubelet.sock"}),
    ("all", {"stale.sock", "link-to-socket", "kubelet.sock", "notes.txt", "link-to-file"}),
])
def test_start_clears_the_directory_as_a_kubelet_does(kubelet_dir, tmp_path, cleanup, removed):
    outside = tmp_path / "outside.sock"
    for s in (make_socket(os.path.join(kubelet_dir, "stale.sock")), make_socket(str(outside)),
              make_socket(os.path.join(kubelet_dir, "kubelet.sock"))):
        s.close()  # stale: nobody listens
    os.symlink(outside, os.path.join(kubelet_dir, "link-to-socket"))
    (tmp_path / "dp" / "notes.txt").write_text("x")
    os.symlink(tmp_path / "dp" / "notes.txt", os.path.join(kubelet_dir, "link-to-file"))
    (tmp_path / "dp" / CHECKPOINT).write_text("{}")
    (tmp_path / "dp" / "subdir").mkdir()
    before = set(os.listdir(kubelet_dir))
    k = StandInKubelet(kubelet_dir, cleanup=cleanup).start()
    try:
        assert set(os.listdir(kubelet_dir)) == (before - removed) | {"kubelet.sock"}
        assert outside.exists(), "a symlink is removed, never what it points to"
    finally:
        k.stop()


def test_a_live_kubelet_directory_is_refused(kubelet_dir):
    live_sock = make_socket(os.path.join(kubelet_dir, "kubelet.sock"), listen=True)
    other = make_socket(os.path.join(kubelet_dir, "vendor.sock"), listen=True)
    try:
        with pytest.raises(LiveKubelet, match="something answers there"):
            StandInKubelet(kubelet_dir).start()
        assert sorted(os.listdir(kubelet_dir)) == ["kubelet.sock", "vendor.sock"], "nothing deleted"
    finally:
        live_sock.close()
        other.close()


def test_restart_keeps_the_devices_unhealthy_until_the_plugin_registers_again(standin, plugins):
    kubelet = standin("1.25")
    plugin = plugins("p.sock")
    assert register(kubelet, "p.sock") is None
    wait_live(kubelet, plugin)
    kubelet.restart()
    wait_until(lambda: plugin.ends == ["kubelet"], 5, "the restart to break the stream")
    assert kubelet.capacity(RES) == 2 and kubelet.allocatable(RES) == 0 and not kubelet.connected(RES)
    assert not os.path.exists(plugin.path), "a restart deletes the plugin's socket"


# --- the state file, bounds --------------------------------------------------------------------------

def test_state_file_write_never_follows_a_symlink(tmp_path, kubelet_dir):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    state = tmp_path / "state.json"
    os.symlink(target, state)
    k = StandInKubelet(kubelet_dir, state_file=str(state)).start()
    try:
        assert not state.is_symlink() and json.loads(state.read_text())["socket"] == k.socket
        assert target.read_text() == "keep"
    finally:
        k.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp", "elsewhere", "state.json"], "no temp file left"


def test_write_file_atomically_refuses_a_planted_temp_name(tmp_path, monkeypatch):
    import tests.standin as standin_module

    monkeypatch.setattr(standin_module, "_tmp_names", iter([7]))
    target = tmp_path / "state.json"
    os.symlink(tmp_path / "victim", tmp_path / f".state.json.{os.getpid()}.7.tmp")
    with pytest.raises(FileExistsError):
        write_file_atomically(str(target), b"{}")
    assert not (tmp_path / "victim").exists() and not target.exists()


def test_records_are_bounded():
    records: List[int] = []
    for i in range(25):
        append_bounded(records, i, limit=10)
    assert records == list(range(15, 25))


# --- the command line ---------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "standin.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_serves_writes_state_restarts_on_sighup(kubelet_dir, tmp_path, plugins):
    state = tmp_path / "state.json"
    proc = run_cli("--kubelet-dir", kubelet_dir, "--state-file", str(state), "--behaviour", "1.25")
    try:
        wait_until(state.exists, 20, "the stand-in's state file")
        view = json.loads(state.read_text())
        assert view["pid"] == proc.pid and view["behaviour"] == "1.25"
        plugin = plugins("p.sock")
        with grpc.insecure_channel("unix:" + os.path.join(kubelet_dir, "kubelet.sock")) as channel:
            api.Stub(channel, (api.REGISTER,)).Register(
                api.RegisterRequest(version="v1beta1", endpoint="p.sock", resource_name=RES), timeout=10)

        def resource() -> Dict[str, Any]:
            return dict(json.loads(state.read_text())["resources"].get(RES, {}))

        wait_until(lambda: resource().get("connected") and len(resource()["devices"]) == 2, 10, "the stream")
        started = json.loads(state.read_text())["started"]
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: json.loads(state.read_text())["started"] != started, 10, "the restart")
        wait_until(lambda: plugin.ends == ["kubelet"], 5, "the restart to break the stream")
        assert not os.path.exists(plugin.path)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out


def test_cli_refuses_a_live_kubelet(kubelet_dir):
    live_sock = make_socket(os.path.join(kubelet_dir, "kubelet.sock"), listen=True)
    try:
        proc = run_cli("--kubelet-dir", kubelet_dir)
        out, _ = proc.communicate(timeout=20)
    finally:
        live_sock.close()
    assert proc.returncode == 1
    assert "something answers there" in out and "refuses to take over its directory" in out
    assert os.listdir(kubelet_dir) == ["kubelet.sock"]
