"""What the end-to-end tests share: configs for this machine's real devices, a stand-in kubelet
that records what reaches it, and small readers of the daemon's /proc and sockets."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import grpc

from udev_device_plugin import api
from udev_device_plugin.kubelet import SOCKET_PREFIX

from ..conftest import DaemonProcess, wait_until
from ..standin import NEWEST, RECEIVED_KEPT, RECORDS_KEPT, StandInKubelet, append_bounded

MEM = "example.com/mem"
LOOP = "example.com/loop"

# The mem class devices every Linux machine has, and the loop devices 0-7 this machine has.
# loop[0-7] matches one character only, so loop devices another test creates (>= 100) stay out.
MEM_IDS = ["full", "null", "zero"]
LOOP_IDS = [f"loop{i}" for i in range(8)]

MEM_CONF = f"""\
[resource {MEM}]
subsystem = mem
kernel = null zero full
"""

LOOP_CONF = f"""\
[resource {LOOP}]
subsystem = block
kernel = loop[0-7]
"""

EXIT_CONFIG = 78


def config_path(daemon: DaemonProcess) -> str:
    return daemon.cmd[daemon.cmd.index("--config") + 1]


def rewrite_config(daemon: DaemonProcess, text: str) -> None:
    """Replace the daemon's config file atomically, as an editor or Ansible would."""
    path = config_path(daemon)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``python -m udev_device_plugin ARGS`` and capture its output."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "udev_device_plugin", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def our_sockets(kubelet_dir: str) -> List[str]:
    """Names of the plugin sockets in the directory (what a kubelet would see of ours)."""
    out = []
    for name in sorted(os.listdir(kubelet_dir)):
        try:
            if name.startswith(SOCKET_PREFIX) and stat.S_ISSOCK(os.lstat(os.path.join(kubelet_dir, name)).st_mode):
                out.append(name)
        except FileNotFoundError:
            continue
    return out


_SO_ACCEPTCON = 0x10000  # /proc/net/unix Flags: a listening socket


def fd_kinds(pid: int) -> Dict[str, int]:
    """The process's open descriptors by kind: how many listening UNIX sockets, accepted connections
    (named by the socket they came in on), unnamed UNIX sockets (socketpairs and client connections),
    other sockets (netlink), pipes, anonymous inodes by name (inotify, eventpoll) and files."""
    unix: Dict[str, Tuple[int, bool]] = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            unix[fields[6]] = (int(fields[3], 16), len(fields) > 7)
    kinds: Dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            entry = unix.get(target[len("socket:["):-1])
            if entry is None:
                kind = "other socket"
            elif entry[0] & _SO_ACCEPTCON:
                kind = "listening socket"
            else:
                kind = "accepted connection" if entry[1] else "unnamed socket"
        elif target.startswith("pipe:"):
            kind = "pipe"
        elif target.startswith("anon_inode:"):
            kind = target
        else:
            kind = "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# gRPC core's own threads (by their kernel names): its timer manager and executors start a second
# thread under load and retire it later, within their own small bounds.
GRPC_CORE_THREADS = ("grpc_global_tim", "default-executo", "resolver-execut", "grpc_")
GRPC_CORE_SLACK = 2


def threads_bounded(pid: int, baseline: Dict[str, int]) -> bool:
    """The daemon's threads against a baseline census: exactly as many of its own, gRPC core's within
    its slack.  (A thread per call, stream or command would show as growth of its own threads.)"""
    now = thread_census(pid)
    ours = {k: v for k, v in now.items() if not k.startswith(GRPC_CORE_THREADS)}
    base_ours = {k: v for k, v in baseline.items() if not k.startswith(GRPC_CORE_THREADS)}
    grpc_now = sum(v for k, v in now.items() if k.startswith(GRPC_CORE_THREADS))
    grpc_base = sum(v for k, v in baseline.items() if k.startswith(GRPC_CORE_THREADS))
    return ours == base_ours and grpc_now <= grpc_base + GRPC_CORE_SLACK


def thread_census(pid: int) -> Dict[str, int]:
    """The daemon's threads by kernel name (comm)."""
    out: Dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[name] = out.get(name, 0) + 1
    return out


def main_thread_switches(pid: int) -> int:
    """Context switches of the daemon's main thread: it only wakes for work, a timer or a signal."""
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def make_stale_socket(path: str) -> None:
    """A socket file nobody listens on, as a daemon killed with SIGKILL leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
    finally:
        s.close()


class RecordingKubelet(StandInKubelet):
    """The stand-in kubelet, also keeping every RegisterRequest as sent and every ListAndWatch message
    per endpoint (both bounded); it can refuse the first ``refuse`` Register calls as a kubelet that is
    not ready does."""

    def __init__(self, directory: str, refuse: int = 0, refusal: str = "the stand-in refuses this Register",
                 behaviour: str = NEWEST) -> None:
        super().__init__(directory, behaviour=behaviour)
        self.requests: List[Any] = []
        self.lists: Dict[str, List[Dict[str, str]]] = {}  # endpoint -> each message as {ID: health}
        self.refuse = refuse
        self.refusal = refusal

    def register(self, request: Any) -> Optional[str]:
        copy = api.RegisterRequest()
        copy.CopyFrom(request)
        with self.cond:
            append_bounded(self.requests, copy)
            refuse = self.refuse > 0
            if refuse:
                self.refuse -= 1
        if refuse:
            return self.refusal
        return super().register(request)

    def _update(self, client: Any, devices: List[Any], arrived: Optional[float] = None) -> None:
        # One critical section (the condition's lock is reentrant), so a waiter never sees the message
        # recorded here but not yet in the stand-in's own view.
        with self.cond:
            if client.endpoint not in self.lists and len(self.lists) >= RECORDS_KEPT:
                del self.lists[next(iter(self.lists))]  # the oldest endpoint's
            append_bounded(self.lists.setdefault(client.endpoint, []), {d.ID: d.health for d in devices},
                            RECEIVED_KEPT)
            super()._update(client, devices, arrived)

    # --- views for the tests ---------------------------------------------------------

    def endpoints(self, resource: str) -> List[str]:
        """Endpoints of the accepted registrations of ``resource``, in order."""
        with self.cond:
            return [r["endpoint"] for r in self.registrations if r["resource"] == resource]

    def live(self, resource: str, count: int = 1, devices: Optional[int] = None) -> bool:
        """At least ``count`` registrations accepted, the newest one's stream open and its first list in
        (with ``devices`` devices, all healthy, when given)."""
        with self.cond:
            endpoints = [r["endpoint"] for r in self.registrations if r["resource"] == resource]
            if len(endpoints) < count or not self.connected(resource):
                return False
            if self.clients[resource].endpoint != endpoints[-1] or not self.lists.get(endpoints[-1]):
                return False
            if devices is None:
                return True
            current = self.devices.get(resource, {})
            return len(current) == devices and all(d["health"] == "Healthy" for d in current.values())

    def wait_live(self, resource: str, count: int = 1, devices: Optional[int] = None,
                  timeout: float = 10.0) -> None:
        if not self.wait_for(lambda: self.live(resource, count, devices), timeout):
            with self.cond:
                seen = [(r["resource"], r["endpoint"]) for r in self.registrations]
            raise AssertionError(f"{resource}: no live registration #{count} within {timeout} s; "
                                 f"registrations: {seen}; refused: {self.refused}")

    def health(self, resource: str) -> Dict[str, str]:
        with self.cond:
            return {i: d["health"] for i, d in self.devices.get(resource, {}).items()}


class PluginClient:
    """A gRPC client on one of our plugin sockets, as the kubelet or `inspect` dials it."""

    def __init__(self, path: str) -> None:
        self.channel = grpc.insecure_channel("unix:" + path)
        self.stub = api.Stub(self.channel)

    def __enter__(self) -> PluginClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def raw(self, method: str, payload: bytes, timeout: float = 10) -> bytes:
        """Call ``/v1beta1.DevicePlugin/<method>`` with bytes that need not be a valid message."""
        call = self.channel.unary_unary(f"/v1beta1.DevicePlugin/{method}", request_serializer=None,
                                        response_deserializer=None)
        return call(payload, timeout=timeout)


def rpc_error(fn: Any, *args: Any, **kwargs: Any) -> Tuple[grpc.StatusCode, str]:
    """Call ``fn``; return the code and details of the gRPC error it must raise."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError(f"{getattr(fn, '__name__', fn)} succeeded where an error was expected")


def wait_log(daemon: DaemonProcess, text: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``text`` occurs ``count`` times in the daemon's log."""
    try:
        wait_until(lambda: daemon.log().count(text) >= count, timeout, f"{text!r} x{count} in the daemon log")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{daemon.log()}") from None
