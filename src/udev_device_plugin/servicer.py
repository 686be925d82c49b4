"""The DevicePlugin RPC handlers for one resource, and our own Status service (grpc.aio).

Nothing here knows about registration or udev: the handlers read the resource's current
devices from a :class:`ResourceState`, which the daemon updates after every scan, and
report the streams they serve through :class:`StreamHooks`.  Everything runs on the
daemon's one event loop, so there are no locks and no thread per stream: a stream the
kubelet holds open costs a suspended coroutine, never a worker a unary call would need.

Bounds: at most ``MAX_STREAMS`` ListAndWatch streams per socket (the kubelet opens one; a
local client opening hundreds gets RESOURCE_EXHAUSTED); requests are limited by grpc's
receive limit; IDs in errors and logs are quoted truncated; prestart commands run through
the bounded runner (commands.py), at most ``MAX_PRESTARTS`` at once per daemon.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple

import grpc

from . import allocation, commands, metrics, sharing, wire
from .config import ResourceConfig
from .model import CdiView, Device, ResourceDiff, quote_id

log = logging.getLogger(__name__)

MAX_STREAMS = 8
MAX_PRESTARTS = 16
# Serialized replies kept per resource (invalidated whenever the devices change).
REPLY_CACHE = 256
# Requests larger than this are answered but not cached.
_CACHE_REQUEST_MAX = 16 * 1024

_stream_ids = itertools.count(1)


class _Reply(NamedTuple):
    payload: bytes
    ids: Tuple[str, ...]


class ResourceState:
    """The current devices of one resource, read by every socket that serves it.

    ``current()`` gives the devices, ``advertised()`` the IDs the kubelet sees of them (each
    device's replicas, sharing.py), built once per version with the ListAndWatch payload;
    ``cdi`` is the resource's CDI spec as written (cdidir.py; None: no CDI).
    """

    def __init__(self, config: ResourceConfig) -> None:
        self.config = config
        self._devices: Dict[str, Device] = {}
        self._encoder = sharing.Encoder()
        self._advertised: Optional[sharing.Advertised] = None
        self._change: Optional[ResourceDiff] = None
        self._left_out: Tuple[str, ...] = ()
        self.cdi: Optional[CdiView] = None
        self._version = 0
        self._allocated: Dict[str, float] = {}
        self._subscribers: Set[asyncio.Event] = set()
        self._options_payload = options_for(config).SerializeToString()
        self._replies: OrderedDict[Tuple[str, bytes], _Reply] = OrderedDict()
        self.stats = metrics.ResourceStats()  # what /metrics shows of this resource (exporter.py)

    def reconfigure(self, config: ResourceConfig) -> None:
        """A reload changed how devices are selected or handed out, not the options: same sockets."""
        replicas = self.config.replicas
        self.config = config
        self._options_payload = options_for(config).SerializeToString()
        self._replies.clear()
        if config.replicas != replicas:
            self._changed()  # the same devices, other IDs

    def publish(self, devices: Mapping[str, Device], change: Optional[ResourceDiff] = None,
                known: bool = False) -> bool:
        """Make ``devices`` current; wake the ListAndWatch streams when the list changed.

        ``change``: how ``devices`` differ from the current ones (the inventory's diff), which lets
        the list be re-encoded for those devices only.  ``known``: that diff is exact (None: equal
        devices), so no comparison of every device is needed to tell."""
        if not isinstance(devices, dict):
            devices = dict(devices)
        if known:
            if not change:
                self._devices = devices  # equal devices in a new mapping: the same version
                return False
        # Unchanged devices are the same objects (discovery keeps them): dict equality skips them.
        elif devices is self._devices or devices == self._devices:
            return False
        # The encoder can apply the change only to the list it made last, of the version before.
        pending = change if self._advertised is not None else None
        self._devices = devices
        self._changed()
        self._change = pending
        return True

    def _changed(self) -> None:
        self._version += 1
        self._advertised = None
        self._change = None
        self._replies.clear()
        for event in self._subscribers:
            event.set()

    def current(self) -> Tuple[int, Mapping[str, Device]]:
        return self._version, self._devices

    def advertised(self) -> sharing.Advertised:
        """The IDs of the current version: the table Allocate looks them up in, and the list's bytes."""
        if self._advertised is None:
            self._advertised = self._encoder.advertise(self._devices, self.config.replicas, change=self._change)
            self._change = None
            left_out = self._advertised.left_out
            if left_out and len(left_out) != len(self._left_out):
                log.error("%s: %d devices x %d replicas would make a ListAndWatch message larger than the "
                          "kubelet accepts (4 MiB); %d device(s) not advertised (%s); lower replicas",
                          self.config.name, len(self._devices), self.config.replicas, len(left_out),
                          ", ".join(map(quote_id, left_out[:8])) + (" ..." if len(left_out) > 8 else ""))
            elif self._left_out and not left_out:
                log.info("%s: every device advertised again", self.config.name)
            self._left_out = left_out
        return self._advertised

    def list_payload(self) -> Tuple[int, bytes]:
        """The serialized ListAndWatchResponse of the current version, built once for every stream."""
        return self._version, self.advertised().payload

    def set_cdi(self, view: Optional[CdiView]) -> None:
        """What the resource's CDI spec holds now; Allocate answers name its devices."""
        if view != self.cdi:
            self.cdi = view
            self._replies.clear()

    def subscribe(self, event: asyncio.Event) -> None:
        self._subscribers.add(event)

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)

    @property
    def options_payload(self) -> bytes:
        return self._options_payload

    def cached(self, method: str, request: bytes) -> Optional[_Reply]:
        reply = self._replies.get((method, request))
        if reply is not None:
            self._replies.move_to_end((method, request))
        return reply

    def cache(self, method: str, request: bytes, reply: _Reply) -> None:
        if len(request) > _CACHE_REQUEST_MAX:
            return
        self._replies[(method, request)] = reply
        while len(self._replies) > REPLY_CACHE:
            self._replies.popitem(last=False)

    def mark_allocated(self, ids: Tuple[str, ...]) -> None:
        now = time.time()
        for i in ids:
            self._allocated[i] = now

    def allocated_at(self, device_id: str) -> float:
        return self._allocated.get(device_id, 0.0)

    def forget(self, device_id: str) -> None:
        self._allocated.pop(device_id, None)


def options_for(config: ResourceConfig) -> Any:
    return wire.DevicePluginOptions(pre_start_required=bool(config.prestart_command),
                                   get_preferred_allocation_available=True)


_CODES = {"unknown": grpc.StatusCode.INVALID_ARGUMENT, "unhealthy": grpc.StatusCode.FAILED_PRECONDITION,
          "conflict": grpc.StatusCode.FAILED_PRECONDITION, "cdi": grpc.StatusCode.FAILED_PRECONDITION}


class StreamHooks(NamedTuple):
    opened: Callable[[int], None]
    ended: Callable[[int, bool, str], None]  # stream, by_us, why


class PrestartLimit:
    """How many prestart commands may run at once, for the whole daemon."""

    def __init__(self, limit: int = MAX_PRESTARTS) -> None:
        self.semaphore = asyncio.Semaphore(limit)


class DevicePluginServicer:
    """Serves one resource on one socket; :meth:`end_streams` ends its streams (by us)."""

    def __init__(self, state: ResourceState, hooks: StreamHooks, runner: commands.Runner,
                 prestarts: PrestartLimit) -> None:
        self.state = state
        self.hooks = hooks
        self.runner = runner
        self.prestarts = prestarts
        self.closing = False
        self._streams: Dict[int, asyncio.Event] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        return wire.service_handler(wire.DEVICE_PLUGIN, {
            "GetDevicePluginOptions": wire.method_handler(wire.GET_DEVICE_PLUGIN_OPTIONS, self.GetDevicePluginOptions,
                                                         raw_request=True, raw_response=True),
            "ListAndWatch": wire.method_handler(wire.LIST_AND_WATCH, self.ListAndWatch, raw_request=True,
                                               raw_response=True),
            "GetPreferredAllocation": wire.method_handler(wire.GET_PREFERRED_ALLOCATION, self.GetPreferredAllocation,
                                                         raw_request=True, raw_response=True),
            "Allocate": wire.method_handler(wire.ALLOCATE, metrics.counted(self.state.stats.allocate, self.Allocate),
                                           raw_request=True, raw_response=True),
            "PreStartContainer": wire.method_handler(
                wire.PRE_START_CONTAINER, metrics.counted(self.state.stats.prestart, self.PreStartContainer)),
        })

    @property
    def streams(self) -> int:
        return len(self._streams)

    def end_streams(self) -> None:
        """End every stream of this socket, now and from now on (the socket is being retired or drained)."""
        self.closing = True
        for event in self._streams.values():
            event.set()

    # --- the RPCs --------------------------------------------------------------------------------

    async def GetDevicePluginOptions(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.state.options_payload

    async def ListAndWatch(self, request: bytes, context: grpc.aio.ServicerContext) -> Any:
        name = self.state.config.name
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{name}: this socket is being retired")
        if len(self._streams) >= MAX_STREAMS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{name}: {MAX_STREAMS} ListAndWatch streams are open on this socket already")
        stream = next(_stream_ids)
        wake = asyncio.Event()
        self._streams[stream] = wake
        self.state.subscribe(wake)
        why = ""
        self.hooks.opened(stream)
        log.debug("%s: ListAndWatch stream %d opened", name, stream)
        try:
            sent = -1
            while not self.closing:
                version, payload = self.state.list_payload()
                if version != sent:
                    sent = version
                    yield payload
                    continue  # the list may have changed while the message went out
                await wake.wait()
                wake.clear()
        except asyncio.CancelledError:
            why = "the client cancelled it or its connection was lost"
            raise
        finally:
            self.state.unsubscribe(wake)
            self._streams.pop(stream, None)
            log.debug("%s: ListAndWatch stream %d ended (%s)", name, stream, "by us" if self.closing else why)
            self.hooks.ended(stream, self.closing, why)

    async def GetPreferredAllocation(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply = self.state.cached("preferred", request)
        if reply is not None:
            return reply.payload
        try:
            parsed = wire.PreferredAllocationRequest.FromString(request)
        except wire.DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{self.state.config.name}: GetPreferredAllocation request does not parse: {exc}")
        advertised = self.state.advertised()
        policy = self.state.config.replica_policy
        response = wire.PreferredAllocationResponse(container_responses=[
            wire.ContainerPreferredAllocationResponse(deviceIDs=allocation.preferred(
                advertised.devices, creq.available_deviceIDs, creq.must_include_deviceIDs, creq.allocation_size,
                advertised.replica_of, advertised.replicas, policy))
            for creq in parsed.container_requests])
        payload = response.SerializeToString()
        self.state.cache("preferred", request, _Reply(payload, ()))
        return payload

    async def Allocate(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply = self.state.cached("allocate", request)
        if reply is None:
            config = self.state.config
            try:
                parsed = wire.AllocateRequest.FromString(request)
            except wire.DecodeError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{config.name}: Allocate request does not parse: {exc}")
            if not parsed.container_requests:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{config.name}: Allocate without container requests")
            devices = self.state.advertised().devices
            cdi = self.state.cdi
            response = wire.AllocateResponse()
            granted: List[str] = []
            for creq in parsed.container_requests:
                try:
                    alloc = allocation.allocate(config, devices, creq.devices_ids, cdi)
                except allocation.AllocationError as exc:
                    log.warning("Allocate refused: %s", exc)
                    await context.abort(_CODES[exc.kind], str(exc))
                response.container_responses.append(wire.ContainerAllocateResponse(
                    devices=[wire.DeviceSpec(container_path=node.container_path, host_path=node.host_path,
                                             permissions=node.permissions) for node in alloc.devices],
                    mounts=[wire.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
                            for m in alloc.mounts],
                    envs=alloc.envs, annotations=alloc.annotations,
                    cdi_devices=[wire.CDIDevice(name=name) for name in alloc.cdi_devices]))
                # The devices, not their replicas: removal events say when a device was last given out.
                granted.extend(dict.fromkeys(devices[i].id for i in creq.devices_ids))
            reply = _Reply(response.SerializeToString(), tuple(granted))
            self.state.cache("allocate", request, reply)
            # Not INFO: the kubelet logs every allocation itself, and this is the hot path.
            log.debug("%s: allocated %s", config.name, ", ".join(map(quote_id, granted)))
        self.state.mark_allocated(reply.ids)
        return reply.payload

    async def PreStartContainer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        config = self.state.config
        requested = list(request.devices_ids)
        advertised = self.state.advertised().devices
        unknown = [i for i in requested if i not in advertised]
        if unknown:
            message = f"{config.name}: PreStartContainer for unknown device ID(s) {', '.join(map(quote_id, unknown))}"
            log.warning("%s", message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        if not config.prestart_command:
            return wire.PreStartContainerResponse()
        # The command gets the devices, each once; the replica IDs the kubelet named are in UDP_REPLICA_IDS.
        devices = list({d.id: d for d in (advertised[i] for i in requested)}.values())
        ids = [d.id for d in devices]
        nodes = [n for d in devices for n in d.devnodes]
        env = {"UDP_RESOURCE": config.name, "UDP_DEVICE_IDS": ",".join(ids), "UDP_DEVNODES": ",".join(nodes)}
        if config.replicas > 1:
            env["UDP_REPLICA_IDS"] = ",".join(requested)
        async with self.prestarts.semaphore:
            result = await self.runner.run(tuple(config.prestart_command) + tuple(ids), env, config.prestart_timeout)
        if not result.ok:
            message = f"{config.name}: prestart_command for {', '.join(ids)}: {result.detail}"
            log.warning("%s", message)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if result.timed_out else grpc.StatusCode.INTERNAL
            await context.abort(code, message)
        log.info("%s: prestart_command succeeded for %s", config.name, ", ".join(ids))
        return wire.PreStartContainerResponse()


class StatusServicer:
    """Answers ``inspect``: the resource's registration as the daemon knows it, and its devices."""

    def __init__(self, state: ResourceState, registration: Callable[[], Dict[str, Any]], version: str) -> None:
        self.state = state
        self.registration = registration
        self.version = version

    def handler(self) -> grpc.GenericRpcHandler:
        return wire.service_handler(wire.STATUS, {"GetStatus": wire.method_handler(wire.GET_STATUS, self.GetStatus)})

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reg = self.registration()
        config = self.state.config
        _, devices = self.state.current()
        ids_of = self.state.advertised().ids_of
        cdi = self.state.cdi
        names = cdi.names if cdi is not None else {}

        def advertised(d: Device) -> Tuple[str, ...]:
            return ids_of.get(d.id, ())

        return wire.StatusResponse(
            resource_name=config.name, pid=os.getpid(), version=self.version,
            devices=[wire.DeviceStatus(id=d.id, health=d.health, reason=d.reason, devnodes=d.devnodes,
                                      numa_nodes=d.numa_nodes, syspath=d.sys_path, advertised_ids=advertised(d),
                                      cdi_devices=[names[i] for i in advertised(d) if i in names])
                     for d in devices.values()],
            replicas=config.replicas, replica_policy=config.replica_policy, cdi_kind=config.cdi_kind,
            cdi_spec=cdi.path if cdi is not None else "", cdi_error=cdi.problem if cdi is not None else "", **reg)
