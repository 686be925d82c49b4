"""The DevicePlugin RPC handlers for one resource, and our own Status service.

Nothing here knows about sockets, registration or udev: the servicer reads the
resource's current devices from a :class:`ResourceState`, which the daemon
updates after every scan.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple

import grpc

from . import allocation, api, commands
from .config import ResourceConfig
from .model import Device

log = logging.getLogger(__name__)


class ResourceState:
    """The current devices of one resource, shared between the daemon and the RPC threads."""

    def __init__(self, config: ResourceConfig) -> None:
        self.config = config
        self.cond = threading.Condition()
        self._devices: Mapping[str, Device] = {}
        self._version = 0
        self._allocated: Dict[str, float] = {}

    def publish(self, devices: Mapping[str, Device]) -> bool:
        """Make ``devices`` current; wake the ListAndWatch streams when the list changed."""
        with self.cond:
            if dict(devices) == dict(self._devices):
                return False
            self._devices = devices
            self._version += 1
            self.cond.notify_all()
            return True

    def current(self) -> Tuple[int, Mapping[str, Device]]:
        with self.cond:
            return self._version, self._devices

    def mark_allocated(self, ids: Tuple[str, ...]) -> None:
        now = time.time()
        with self.cond:
            for i in ids:
                self._allocated[i] = now

    def allocated_at(self, device_id: str) -> float:
        with self.cond:
            return self._allocated.get(device_id, 0.0)


def options_for(config: ResourceConfig) -> Any:
    return api.DevicePluginOptions(pre_start_required=bool(config.prestart_command),
                                   get_preferred_allocation_available=True)


def device_message(dev: Device) -> Any:
    msg = api.Device(ID=dev.id, health=dev.health)
    if dev.numa_nodes:
        msg.topology.nodes.extend(api.NUMANode(ID=n) for n in dev.numa_nodes)
    return msg


_CODES = {"unknown": grpc.StatusCode.INVALID_ARGUMENT, "unhealthy": grpc.StatusCode.FAILED_PRECONDITION,
          "conflict": grpc.StatusCode.FAILED_PRECONDITION}


class DevicePluginServicer:
    """Serves one resource on one socket; :meth:`close` ends its streams."""

    def __init__(self, state: ResourceState) -> None:
        self.state = state
        self._closed = False

    def close(self) -> None:
        with self.state.cond:
            self._closed = True
            self.state.cond.notify_all()

    def handler(self) -> grpc.GenericRpcHandler:
        return api.service_handler(api.DEVICE_PLUGIN, {
            m.name: api.method_handler(m, getattr(self, m.name))
            for m in (api.GET_DEVICE_PLUGIN_OPTIONS, api.LIST_AND_WATCH, api.GET_PREFERRED_ALLOCATION,
                      api.ALLOCATE, api.PRE_START_CONTAINER)})

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return options_for(self.state.config)

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        cond = self.state.cond

        def wake() -> None:
            with cond:
                cond.notify_all()

        # Called when the kubelet goes away or the server stops: end the stream at once.
        context.add_callback(wake)
        sent = [-1]  # the version last sent
        name = self.state.config.name
        log.debug("%s: ListAndWatch opened", name)

        def due() -> bool:
            return self._closed or not context.is_active() or self.state.current()[0] != sent[0]

        while True:
            with cond:
                cond.wait_for(due)
                if self._closed or not context.is_active():
                    log.debug("%s: ListAndWatch closed", name)
                    return
                sent[0], devices = self.state.current()
            yield api.ListAndWatchResponse(devices=[device_message(d) for d in devices.values()])

    def GetPreferredAllocation(self, request: Any, context: grpc.ServicerContext) -> Any:
        _, devices = self.state.current()
        response = api.PreferredAllocationResponse()
        for creq in request.container_requests:
            chosen = allocation.preferred(devices, list(creq.available_deviceIDs), list(creq.must_include_deviceIDs),
                                          creq.allocation_size)
            response.container_responses.add(deviceIDs=chosen)
        return response

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        config = self.state.config
        _, devices = self.state.current()
        if not request.container_requests:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{config.name}: Allocate without container requests")
        response = api.AllocateResponse()
        granted = []
        for creq in request.container_requests:
            try:
                alloc = allocation.allocate(config, devices, list(creq.devices_ids))
            except allocation.AllocationError as exc:
                log.warning("Allocate refused: %s", exc)
                context.abort(_CODES[exc.kind], str(exc))
            out = response.container_responses.add()
            for node in alloc.devices:
                out.devices.add(container_path=node.container_path, host_path=node.host_path,
                                permissions=node.permissions)
            for m in alloc.mounts:
                out.mounts.add(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
            out.envs.update(dict(alloc.envs))
            out.annotations.update(dict(alloc.annotations))
            granted.extend(creq.devices_ids)
        self.state.mark_allocated(tuple(granted))
        # Not INFO: the kubelet logs every allocation itself, and this is the hot path.
        log.debug("%s: allocated %s", config.name, ", ".join(granted))
        return response

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        config = self.state.config
        ids = list(request.devices_ids)
        _, devices = self.state.current()
        unknown = [i for i in ids if i not in devices]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{config.name}: unknown device ID(s) {', '.join(map(repr, unknown))}")
        if not config.prestart_command:
            return api.PreStartContainerResponse()
        nodes = [n for i in ids for n in devices[i].devnodes]
        result = commands.run(tuple(config.prestart_command) + tuple(ids), {
            "UDP_RESOURCE": config.name,
            "UDP_DEVICE_IDS": ",".join(ids),
            "UDP_DEVNODES": ",".join(nodes),
        }, config.prestart_timeout)
        if not result.ok:
            message = f"{config.name}: prestart_command for {', '.join(ids)}: {result.detail}"
            log.warning("%s", message)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if result.timed_out else grpc.StatusCode.INTERNAL
            context.abort(code, message)
        log.info("%s: prestart_command succeeded for %s", config.name, ", ".join(ids))
        return api.PreStartContainerResponse()


class StatusServicer:
    """Answers ``inspect``: is this socket registered with the kubelet, and what does it serve."""

    def __init__(self, state: ResourceState, registration: Callable[[], Tuple[bool, str, int]], version: str) -> None:
        self.state = state
        self.registration = registration
        self.version = version

    def handler(self) -> grpc.GenericRpcHandler:
        return api.service_handler(api.STATUS, {"GetStatus": api.method_handler(api.GET_STATUS, self.GetStatus)})

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        registered, last_error, count = self.registration()
        _, devices = self.state.current()
        return api.StatusResponse(
            resource_name=self.state.config.name, registered=registered, last_error=last_error,
            registrations=count, pid=os.getpid(), version=self.version,
            devices=[api.DeviceStatus(id=d.id, health=d.health, reason=d.reason, devnodes=d.devnodes,
                                             numa_nodes=d.numa_nodes, syspath=d.sys_path)
                     for d in devices.values()])
