"""The kubelet's DevicePlugin API v1beta1, its plugin watcher's pluginregistration API and our
Status service, built at import time.

Why not generated ``_pb2``/``_pb2_grpc`` modules: code from protoc >= 3.20 imports
``google.protobuf.internal.builder``, which RHEL 9's protobuf 3.14 and RHEL 10's 3.19
lack; code from older protoc does not load on protobuf 3.14 either, and new generated
code carries a runtime version check that refuses older runtimes.  The one entry point
that exists unchanged from protobuf 3.14 to 7.x, on the pure-Python, cpp and upb
backends, is ``message_factory.GetMessages`` over ``FileDescriptorProto`` objects, so
we ship the serialized descriptors (``descriptors.py``, written by ``make proto`` from
the .proto files beside it) and build the classes here, in a descriptor pool of our own
(no clash with another copy of the same .proto in the default pool).

The services are served and called through grpc's generic handlers and multi-callables
(``grpc.method_handlers_generic_handler``, ``channel.unary_unary``), which every grpcio
release since 1.0 has, instead of the generated ``_pb2_grpc`` glue.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import grpc
from google.protobuf import message_factory

from .descriptors import FILES

API_VERSION = "v1beta1"

def _build() -> Dict[str, Any]:
    """Every message class of FILES, by full name, in a descriptor pool of our own.

    protobuf >= 4.22 builds them straight from the serialized files (AddSerializedFile, then
    GetMessageClass): no need to load descriptor_pb2, whose module alone costs ~2.4 MiB of the
    daemon's memory on the upb backend.  Older runtimes (RHEL 9's 3.14, RHEL 10's 3.19) have no
    GetMessageClass and take GetMessages over parsed FileDescriptorProtos, the call that exists
    unchanged from 3.14 on.  Both give the same classes; tests/stacks checks their bytes agree.
    """
    if hasattr(message_factory, "GetMessageClass"):
        from google.protobuf import descriptor_pool

        pool = descriptor_pool.DescriptorPool()
        files = [pool.AddSerializedFile(data) for data in FILES]
        out: Dict[str, Any] = {}
        for file in files:
            for message in file.message_types_by_name.values():
                out[message.full_name] = message_factory.GetMessageClass(message)
        return out
    from google.protobuf import descriptor_pb2

    return dict(message_factory.GetMessages([descriptor_pb2.FileDescriptorProto.FromString(data) for data in FILES]))


_messages: Dict[str, Any] = _build()


def _message(name: str) -> Any:
    return _messages[name]


# --- v1beta1 (k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto) --------------------
DevicePluginOptions: Any = _message("v1beta1.DevicePluginOptions")
RegisterRequest: Any = _message("v1beta1.RegisterRequest")
Empty: Any = _message("v1beta1.Empty")
ListAndWatchResponse: Any = _message("v1beta1.ListAndWatchResponse")
TopologyInfo: Any = _message("v1beta1.TopologyInfo")
NUMANode: Any = _message("v1beta1.NUMANode")
Device: Any = _message("v1beta1.Device")
PreStartContainerRequest: Any = _message("v1beta1.PreStartContainerRequest")
PreStartContainerResponse: Any = _message("v1beta1.PreStartContainerResponse")
PreferredAllocationRequest: Any = _message("v1beta1.PreferredAllocationRequest")
ContainerPreferredAllocationRequest: Any = _message("v1beta1.ContainerPreferredAllocationRequest")
PreferredAllocationResponse: Any = _message("v1beta1.PreferredAllocationResponse")
ContainerPreferredAllocationResponse: Any = _message("v1beta1.ContainerPreferredAllocationResponse")
AllocateRequest: Any = _message("v1beta1.AllocateRequest")
ContainerAllocateRequest: Any = _message("v1beta1.ContainerAllocateRequest")
CDIDevice: Any = _message("v1beta1.CDIDevice")
AllocateResponse: Any = _message("v1beta1.AllocateResponse")
ContainerAllocateResponse: Any = _message("v1beta1.ContainerAllocateResponse")
Mount: Any = _message("v1beta1.Mount")
DeviceSpec: Any = _message("v1beta1.DeviceSpec")

# --- pluginregistration (k8s.io/kubelet/pkg/apis/pluginregistration/v1/api.proto) ---------
# What the kubelet's plugin watcher asks a socket it finds in plugins_registry.
PluginInfo: Any = _message("pluginregistration.PluginInfo")
RegistrationStatus: Any = _message("pluginregistration.RegistrationStatus")
RegistrationStatusResponse: Any = _message("pluginregistration.RegistrationStatusResponse")
InfoRequest: Any = _message("pluginregistration.InfoRequest")
PLUGIN_TYPE = "DevicePlugin"

# --- udevdeviceplugin.v1 (status.proto): what `inspect` asks our sockets -------------------
StatusRequest: Any = _message("udevdeviceplugin.v1.StatusRequest")
StatusResponse: Any = _message("udevdeviceplugin.v1.StatusResponse")
DeviceStatus: Any = _message("udevdeviceplugin.v1.DeviceStatus")


class Method(NamedTuple):
    """One RPC: its service, name, message classes and whether it streams its responses."""

    service: str
    name: str
    request: Any
    response: Any
    streaming: bool = False

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


REGISTRATION = "v1beta1.Registration"
DEVICE_PLUGIN = "v1beta1.DevicePlugin"
STATUS = "udevdeviceplugin.v1.Status"
PLUGIN_REGISTRATION = "pluginregistration.Registration"

REGISTER = Method(REGISTRATION, "Register", RegisterRequest, Empty)
GET_DEVICE_PLUGIN_OPTIONS = Method(DEVICE_PLUGIN, "GetDevicePluginOptions", Empty, DevicePluginOptions)
LIST_AND_WATCH = Method(DEVICE_PLUGIN, "ListAndWatch", Empty, ListAndWatchResponse, streaming=True)
GET_PREFERRED_ALLOCATION = Method(DEVICE_PLUGIN, "GetPreferredAllocation", PreferredAllocationRequest,
                                  PreferredAllocationResponse)
ALLOCATE = Method(DEVICE_PLUGIN, "Allocate", AllocateRequest, AllocateResponse)
PRE_START_CONTAINER = Method(DEVICE_PLUGIN, "PreStartContainer", PreStartContainerRequest,
                             PreStartContainerResponse)
GET_STATUS = Method(STATUS, "GetStatus", StatusRequest, StatusResponse)
GET_INFO = Method(PLUGIN_REGISTRATION, "GetInfo", InfoRequest, PluginInfo)
NOTIFY_REGISTRATION_STATUS = Method(PLUGIN_REGISTRATION, "NotifyRegistrationStatus", RegistrationStatus,
                                    RegistrationStatusResponse)

METHODS = (REGISTER, GET_DEVICE_PLUGIN_OPTIONS, LIST_AND_WATCH, GET_PREFERRED_ALLOCATION, ALLOCATE,
           PRE_START_CONTAINER, GET_STATUS, GET_INFO, NOTIFY_REGISTRATION_STATUS)


def method_handler(method: Method, behaviour: Callable[..., Any], raw_request: bool = False,
                   raw_response: bool = False) -> grpc.RpcMethodHandler:
    """The grpc handler serving ``method`` with ``behaviour(request, context)``.

    ``raw_request``/``raw_response``: the behaviour takes or returns serialized bytes (a cache
    of serialized replies answers without parsing or building messages).  Works for the
    threaded and the asyncio (grpc.aio) servers alike: a coroutine function or an async
    generator is served by grpc.aio.
    """
    deserializer = None if raw_request else method.request.FromString
    serializer = None if raw_response else method.response.SerializeToString
    if method.streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, request_deserializer=deserializer,
                                                    response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=deserializer,
                                               response_serializer=serializer)


def service_handler(service: str, handlers: Dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(service, handlers)


class Stub:
    """A client of every method on one channel: ``Stub(channel).Allocate(request, timeout=...)``.

    Works on a ``grpc.Channel`` and on a ``grpc.aio.Channel`` (whose calls are awaitable).
    """

    def __init__(self, channel: Any, methods: Optional[tuple] = None) -> None:
        for method in methods or METHODS:
            factory = channel.unary_stream if method.streaming else channel.unary_unary
            setattr(self, method.name, factory(method.path, request_serializer=method.request.SerializeToString,
                                               response_deserializer=method.response.FromString))

    def __getattr__(self, name: str) -> Any:  # for mypy: the methods are set in __init__
        raise AttributeError(name)
