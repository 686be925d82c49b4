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
release since 1.0 has, instead of the generated ``_pb2_grpc`` glue: the tables and glue of
``wire``, the daemon's own codec, with these classes.  The daemon itself does not import this
module (``wire`` says why); ``inspect``, the stand-in kubelet and the tests do, and the tests
check ``wire`` against it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from google.protobuf import message_factory

from .. import wire
from ..wire import (  # noqa: F401
    DEVICE_PLUGIN,
    PLUGIN_REGISTRATION,
    PLUGIN_TYPE,
    REGISTRATION,
    STATUS,
    Method,
    method_handler,
    service_handler,
)
from .descriptors import FILES

API_VERSION = wire.API_VERSION

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

# --- udevdeviceplugin.v1 (status.proto): what `inspect` asks our sockets -------------------
StatusRequest: Any = _message("udevdeviceplugin.v1.StatusRequest")
StatusResponse: Any = _message("udevdeviceplugin.v1.StatusResponse")
DeviceStatus: Any = _message("udevdeviceplugin.v1.DeviceStatus")


# The services, with these classes: the same tables and grpc glue as the daemon's codec.
METHODS = wire.methods(_message)
(REGISTER, GET_DEVICE_PLUGIN_OPTIONS, LIST_AND_WATCH, GET_PREFERRED_ALLOCATION, ALLOCATE, PRE_START_CONTAINER,
 GET_STATUS, GET_INFO, NOTIFY_REGISTRATION_STATUS) = METHODS


class Stub(wire.Stub):
    """A client of every method (or of ``methods``) on one channel, with protobuf's message classes."""

    def __init__(self, channel: Any, methods: Optional[Any] = None) -> None:
        super().__init__(channel, methods or METHODS)
