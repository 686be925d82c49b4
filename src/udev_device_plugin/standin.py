"""A stand-in kubelet: the Registration side of the device plugin API, behaving as the kubelet does.

Used by ``udev-device-plugin demo`` and ``kubelet-stand-in`` (to try the daemon on a
machine without Kubernetes), and by the tests and the benchmark.  What it copies from the
kubelet's device manager (KUBELET.md):

- on start it removes every UNIX socket in its directory, then serves ``kubelet.sock``;
- Register checks the version and the extended resource name, refuses a second
  registration on a socket path it is still connected to, dials the plugin's socket
  synchronously and calls GetDevicePluginOptions before answering;
- it then reads ListAndWatch; a stream that ends makes every device of the resource
  unhealthy until the plugin registers again (there is no reconnect);
- capacity is every device, allocatable the healthy ones.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections import deque
from concurrent import futures
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional

import grpc

from . import api
from .config import KUBELET_SOCKET, validate_resource_name

log = logging.getLogger(__name__)

DIAL_TIMEOUT = 10.0
# ListAndWatch messages kept per resource in ``received`` (a long-running stand-in must not grow).
RECEIVED_KEPT = 10000


class Received(NamedTuple):
    """One ListAndWatch message as the stand-in got it, for tests and benchmarks that time hotplug."""

    seq: int  # 1 for the resource's first message; equals ``messages[resource]`` after it
    monotonic: float  # time.monotonic() on receipt
    wall: float  # time.time() on receipt
    devices: Dict[str, Dict[str, Any]]  # ID -> {"id", "health", "numa_nodes"}


class _Client:
    """The stand-in's connection to one registered plugin socket."""

    def __init__(self, kubelet: StandInKubelet, resource: str, endpoint: str) -> None:
        self.kubelet = kubelet
        self.resource = resource
        self.endpoint = endpoint
        self.path = os.path.join(kubelet.directory, endpoint)
        self.channel = grpc.insecure_channel("unix:" + self.path)
        self.stub = api.Stub(self.channel)
        self.options: Any = None
        self.connected = False
        self.stream: Any = None
        self.thread: Optional[threading.Thread] = None

    def connect(self) -> None:
        """Dial and ask for the options, synchronously, as the kubelet's Register handler does."""
        grpc.channel_ready_future(self.channel).result(timeout=DIAL_TIMEOUT)
        self.options = self.stub.GetDevicePluginOptions(api.Empty(), timeout=DIAL_TIMEOUT)

    def watch(self) -> None:
        """Start reading ListAndWatch in the background."""
        self.stream = self.stub.ListAndWatch(api.Empty())
        self.connected = True
        self.thread = threading.Thread(target=self._watch, name=f"standin-{self.resource}", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            for response in self.stream:
                self.kubelet._update(self, list(response.devices))
        except grpc.RpcError as exc:
            log.debug("stand-in: %s stream ended: %s", self.resource, exc.code())
        finally:
            self.connected = False
            self.kubelet._disconnected(self)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
        self.channel.close()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=5)


class StandInKubelet:
    def __init__(self, directory: str, state_file: Optional[str] = None) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, KUBELET_SOCKET)
        self.state_file = state_file
        self.cond = threading.Condition()
        # Register handlers and stream watchers write the state file from their own
        # threads; one writer at a time, or two share the tmp name and one replace fails.
        self._write_lock = threading.Lock()
        self.registrations: List[Dict[str, Any]] = []
        self.clients: Dict[str, _Client] = {}
        self.devices: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self.messages: Dict[str, int] = {}
        self.received: Dict[str, Deque[Received]] = {}
        self.refused: List[str] = []
        self._server: Optional[grpc.Server] = None
        self._executor: Optional[futures.ThreadPoolExecutor] = None
        self.started = 0.0

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> StandInKubelet:
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self.serve_registration()
        self.started = time.time()
        self._write_state()
        return self

    def serve_registration(self) -> None:
        """Serve the Registration service on kubelet.sock."""
        self._executor = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="standin")
        self._server = grpc.server(self._executor)
        self._server.add_generic_rpc_handlers([_Registration(self).handler()])
        self._server.add_insecure_port("unix:" + self.socket)
        self._server.start()

    def stop(self) -> None:
        """Stop as a dying kubelet does: its streams break, kubelet.sock goes away."""
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self.cond:
            clients = list(self.clients.values())
            self.clients.clear()
        for client in clients:
            client.close()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def restart(self) -> None:
        self.stop()
        with self.cond:
            for devices in self.devices.values():
                for dev in devices.values():
                    dev["health"] = "Unhealthy"
        self.start()

    def __enter__(self) -> StandInKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- Registration ---------------------------------------------------------

    def register(self, request: Any) -> Optional[str]:
        """Handle one Register; return the error the kubelet would give, or None."""
        if request.version != "v1beta1":
            return f"unsupported API version {request.version!r}"
        problem = validate_resource_name(request.resource_name)
        if problem:
            return f"invalid resource name {request.resource_name!r}: {problem}"
        if not request.endpoint or "/" in request.endpoint:
            return f"invalid endpoint {request.endpoint!r}"
        with self.cond:
            for client in self.clients.values():
                if client.endpoint == request.endpoint and client.connected:
                    return f"a plugin is already registered on {request.endpoint}"
        client = _Client(self, request.resource_name, request.endpoint)
        try:
            client.connect()
        except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
            client.close()
            return f"cannot connect to {request.endpoint}: {exc}"
        with self.cond:
            old = self.clients.get(request.resource_name)
            self.clients[request.resource_name] = client
            client.watch()
            self.registrations.append({"resource": request.resource_name, "endpoint": request.endpoint,
                                       "time": time.time()})
            self.cond.notify_all()
        if old is not None:
            old.close()
        self._write_state()
        return None

    def _update(self, client: _Client, devices: List[Any]) -> None:
        now, wall = time.monotonic(), time.time()
        with self.cond:
            if self.clients.get(client.resource) is not client:
                return
            view = {d.ID: {"id": d.ID, "health": d.health, "numa_nodes": [n.ID for n in d.topology.nodes]}
                    for d in devices}
            self.devices[client.resource] = view
            seq = self.messages[client.resource] = self.messages.get(client.resource, 0) + 1
            kept = self.received.setdefault(client.resource, deque(maxlen=RECEIVED_KEPT))
            kept.append(Received(seq, now, wall, {k: dict(v) for k, v in view.items()}))
            self.cond.notify_all()
        self._write_state()

    def _disconnected(self, client: _Client) -> None:
        with self.cond:
            if self.clients.get(client.resource) is client:
                for dev in self.devices.get(client.resource, {}).values():
                    dev["health"] = "Unhealthy"
            self.cond.notify_all()
        self._write_state()

    # --- what a kubelet would call or show ----------------------------------------

    def client(self, resource: str) -> _Client:
        with self.cond:
            return self.clients[resource]

    def allocate(self, resource: str, *requests: List[str]) -> Any:
        req = api.AllocateRequest(container_requests=[api.ContainerAllocateRequest(devices_ids=ids)
                                                      for ids in requests])
        return self.client(resource).stub.Allocate(req, timeout=30)

    def preferred(self, resource: str, available: List[str], must_include: List[str],
                  size: int) -> List[str]:
        req = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
            available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size)])
        return list(self.client(resource).stub.GetPreferredAllocation(req, timeout=30)
                    .container_responses[0].deviceIDs)

    def prestart(self, resource: str, ids: List[str]) -> None:
        self.client(resource).stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=ids), timeout=30)

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
        client = self.clients.get(resource)
        return client is not None and client.connected

    def snapshot(self) -> Dict[str, Any]:
        with self.cond:
            return {
                "pid": os.getpid(),
                "socket": self.socket,
                "started": self.started,
                "registrations": list(self.registrations),
                "resources": {
                    name: {
                        "endpoint": client.endpoint,
                        "connected": client.connected,
                        "options": {
                            "pre_start_required": bool(client.options and client.options.pre_start_required),
                            "get_preferred_allocation_available": bool(
                                client.options and client.options.get_preferred_allocation_available),
                        },
                        "devices": sorted(self.devices.get(name, {}).values(), key=lambda d: d["id"]),
                    } for name, client in self.clients.items()
                },
            }

    def _write_state(self) -> None:
        if not self.state_file:
            return
        with self._write_lock:
            tmp = f"{self.state_file}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.snapshot(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.state_file)


class _Registration:
    def __init__(self, kubelet: StandInKubelet) -> None:
        self.kubelet = kubelet

    def handler(self) -> grpc.GenericRpcHandler:
        return api.service_handler(api.REGISTRATION, {"Register": api.method_handler(api.REGISTER, self.Register)})

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        error = self.kubelet.register(request)
        if error:
            log.warning("stand-in kubelet refused %s: %s", request.resource_name, error)
            with self.kubelet.cond:
                self.kubelet.refused.append(error)
                self.kubelet.cond.notify_all()
            context.abort(grpc.StatusCode.UNKNOWN, error)
        log.info("stand-in kubelet: %s registered on %s", request.resource_name, request.endpoint)
        return api.Empty()
