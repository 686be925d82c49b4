"""The wire contract: the API the daemon builds at import is the kubelet's DevicePlugin API v1beta1.

The expected tables are upstream's k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto (see
../shared/KUBELET.md), written out by hand: every message, field number, name, type, label and
presence, map entry and message type, and every service method with its request, response and
streaming flags.  They are compared with the descriptors of the classes ``udev_device_plugin.api``
builds (what the servers and clients really use) on whichever protobuf runtime and backend runs
this, and a few messages are encoded by hand to check the bytes each backend writes.  Runs on every
stack, and in the RPM's %check against the distribution's protobuf.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from udev_device_plugin import api
from udev_device_plugin.api.descriptors import FILES

# (number, name, type, repeated).  Types: scalar names, ".Message" for a message of the same
# package, "map<string,string>" for a map (a repeated entry message with key = 1, value = 2).
Field = Tuple[int, str, str, bool]

V1BETA1: Dict[str, List[Field]] = {
    "DevicePluginOptions": [(1, "pre_start_required", "bool", False),
                            (2, "get_preferred_allocation_available", "bool", False)],
    "RegisterRequest": [(1, "version", "string", False), (2, "endpoint", "string", False),
                        (3, "resource_name", "string", False), (4, "options", ".DevicePluginOptions", False)],
    "Empty": [],
    "ListAndWatchResponse": [(1, "devices", ".Device", True)],
    "TopologyInfo": [(1, "nodes", ".NUMANode", True)],
    "NUMANode": [(1, "ID", "int64", False)],
    "Device": [(1, "ID", "string", False), (2, "health", "string", False), (3, "topology", ".TopologyInfo", False)],
    "PreStartContainerRequest": [(1, "devices_ids", "string", True)],
    "PreStartContainerResponse": [],
    "PreferredAllocationRequest": [(1, "container_requests", ".ContainerPreferredAllocationRequest", True)],
    "ContainerPreferredAllocationRequest": [(1, "available_deviceIDs", "string", True),
                                            (2, "must_include_deviceIDs", "string", True),
                                            (3, "allocation_size", "int32", False)],
    "PreferredAllocationResponse": [(1, "container_responses", ".ContainerPreferredAllocationResponse", True)],
    "ContainerPreferredAllocationResponse": [(1, "deviceIDs", "string", True)],
    "AllocateRequest": [(1, "container_requests", ".ContainerAllocateRequest", True)],
    "ContainerAllocateRequest": [(1, "devices_ids", "string", True)],
    "CDIDevice": [(1, "name", "string", False)],
    "AllocateResponse": [(1, "container_responses", ".ContainerAllocateResponse", True)],
    "ContainerAllocateResponse": [(1, "envs", "map<string,string>", True), (2, "mounts", ".Mount", True),
                                  (3, "devices", ".DeviceSpec", True), (4, "annotations", "map<string,string>", True),
                                  (5, "cdi_devices", ".CDIDevice", True)],
    "Mount": [(1, "container_path", "string", False), (2, "host_path", "string", False),
              (3, "read_only", "bool", False)],
    "DeviceSpec": [(1, "container_path", "string", False), (2, "host_path", "string", False),
                   (3, "permissions", "string", False)],
}

# (service, method, request, response, server streaming).  No method streams its requests.
V1BETA1_METHODS = [
    ("Registration", "Register", "RegisterRequest", "Empty", False),
    ("DevicePlugin", "GetDevicePluginOptions", "Empty", "DevicePluginOptions", False),
    ("DevicePlugin", "ListAndWatch", "Empty", "ListAndWatchResponse", True),
    ("DevicePlugin", "GetPreferredAllocation", "PreferredAllocationRequest", "PreferredAllocationResponse", False),
    ("DevicePlugin", "Allocate", "AllocateRequest", "AllocateResponse", False),
    ("DevicePlugin", "PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse", False),
]

# Our own status service (udev-device-plugin inspect asks daemons of other releases): fields may
# be added, never renumbered or retyped, so these must all still be there as they are.
STATUS: Dict[str, List[Field]] = {
    "StatusRequest": [],
    "StatusResponse": [(1, "resource_name", "string", False), (2, "registered", "bool", False),
                       (3, "last_error", "string", False), (4, "registrations", "int64", False),
                       (5, "pid", "int32", False), (6, "version", "string", False),
                       (7, "devices", ".DeviceStatus", True)],
    "DeviceStatus": [(1, "id", "string", False), (2, "health", "string", False), (3, "reason", "string", False),
                     (4, "devnodes", "string", True), (5, "numa_nodes", "int64", True),
                     (6, "syspath", "string", False)],
}
STATUS_METHODS = [("Status", "GetStatus", "StatusRequest", "StatusResponse", False)]

# Upstream's k8s.io/kubelet/pkg/apis/pluginregistration/v1/api.proto (the plugin watcher's).
PLUGINREGISTRATION: Dict[str, List[Field]] = {
    "PluginInfo": [(1, "type", "string", False), (2, "name", "string", False), (3, "endpoint", "string", False),
                   (4, "supported_versions", "string", True)],
    "RegistrationStatus": [(1, "plugin_registered", "bool", False), (2, "error", "string", False)],
    "RegistrationStatusResponse": [],
    "InfoRequest": [],
}
PLUGINREGISTRATION_METHODS = [
    ("Registration", "GetInfo", "InfoRequest", "PluginInfo", False),
    ("Registration", "NotifyRegistrationStatus", "RegistrationStatus", "RegistrationStatusResponse", False),
]

SCALARS = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BOOL: "bool",
           FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_INT32: "int32",
           FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64",
           FieldDescriptor.TYPE_BYTES: "bytes", FieldDescriptor.TYPE_DOUBLE: "double",
           FieldDescriptor.TYPE_FLOAT: "float", FieldDescriptor.TYPE_ENUM: "enum",
           FieldDescriptor.TYPE_SINT64: "sint64", FieldDescriptor.TYPE_SINT32: "sint32"}


def is_repeated(field: Any) -> bool:
    # protobuf >= 5 has is_repeated; 7.x no longer has label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def type_of(field: Any, package: str) -> str:
    """The field's type as the tables write it; raises on anything the tables cannot express."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = field.message_type
        if message.GetOptions().map_entry:
            key, value = message.fields_by_number[1], message.fields_by_number[2]
            assert (key.name, value.name) == ("key", "value") and len(message.fields) == 2, message.full_name
            return f"map<{type_of(key, package)},{type_of(value, package)}>"
        assert message.full_name.startswith(package + "."), f"{field.full_name}: {message.full_name} is foreign"
        return message.full_name[len(package):]
    return SCALARS[field.type]


def fields_of(message: Any, package: str) -> List[Field]:
    return [(f.number, f.name, type_of(f, package), is_repeated(f)) for f in sorted(message.fields,
                                                                                   key=lambda f: f.number)]


def file_proto(name: str) -> Any:
    protos = {p.name: p for p in (descriptor_pb2.FileDescriptorProto.FromString(data) for data in FILES)}
    return protos[name]


def test_v1beta1_has_exactly_upstreams_messages() -> None:
    file = api.Empty.DESCRIPTOR.file
    assert file.package == "v1beta1" and api.API_VERSION == "v1beta1"
    assert sorted(file.message_types_by_name) == sorted(V1BETA1)
    proto = file_proto(file.name)
    # proto3: no field presence for scalars, and the (unused here) packed default for repeated numbers.
    assert proto.syntax == "proto3" and not proto.dependency and not proto.enum_type and not proto.extension


@pytest.mark.parametrize("name", sorted(V1BETA1))
def test_v1beta1_message_fields(name: str) -> None:
    message = getattr(api, name).DESCRIPTOR
    assert message.full_name == f"v1beta1.{name}"
    assert fields_of(message, "v1beta1") == V1BETA1[name]
    assert not message.oneofs, f"{name}: upstream has no oneof (nor proto3 optional)"
    assert not message.enum_types and not message.extensions
    nested = {n.name for n in message.nested_types}
    assert nested == {f"{f[1].capitalize()}Entry" for f in V1BETA1[name] if f[2].startswith("map<")}


@pytest.mark.parametrize("name", sorted(V1BETA1))
def test_v1beta1_presence_is_proto3s(name: str) -> None:
    for field in getattr(api, name).DESCRIPTOR.fields:
        assert field.containing_oneof is None, field.full_name
        if hasattr(field, "has_presence"):  # protobuf >= 4.22
            assert field.has_presence == (field.type == FieldDescriptor.TYPE_MESSAGE and not is_repeated(field)), \
                field.full_name


@pytest.mark.parametrize("name", sorted(STATUS))
def test_status_fields_are_kept(name: str) -> None:
    message = getattr(api, name).DESCRIPTOR
    assert message.full_name == f"udevdeviceplugin.v1.{name}"
    have = {f[0]: f for f in fields_of(message, "udevdeviceplugin.v1")}
    for field in STATUS[name]:
        assert have.get(field[0]) == field, f"{name} field {field[0]} must stay {field}, is {have.get(field[0])}"


@pytest.mark.parametrize("package,methods", [("v1beta1", V1BETA1_METHODS), ("udevdeviceplugin.v1", STATUS_METHODS)])
def test_services_in_the_descriptors(package: str, methods: list) -> None:
    proto = file_proto("deviceplugin.proto" if package == "v1beta1" else "status.proto")
    assert proto.package == package
    found = [(s.name, m.name, m.input_type, m.output_type, m.server_streaming, m.client_streaming)
             for s in proto.service for m in s.method]
    assert found == [(service, method, f".{package}.{request}", f".{package}.{response}", streams, False)
                     for service, method, request, response, streams in methods]
    file = getattr(api, methods[0][2]).DESCRIPTOR.file
    assert sorted(file.services_by_name) == sorted({m[0] for m in methods})
    for service, method, request, response, _ in methods:
        built = file.services_by_name[service].methods_by_name[method]
        assert (built.input_type.full_name, built.output_type.full_name) == (f"{package}.{request}",
                                                                             f"{package}.{response}")


@pytest.mark.parametrize("service,method,request_type,response_type,streams", V1BETA1_METHODS + STATUS_METHODS)
def test_served_and_called_methods(service: str, method: str, request_type: str, response_type: str,
                                   streams: bool) -> None:
    """api.METHODS is what the servers register and Stub calls: the path is the gRPC wire name."""
    package = "v1beta1" if service != "Status" else "udevdeviceplugin.v1"
    [m] = [m for m in api.METHODS if (m.service, m.name) == (f"{package}.{service}", method)]
    assert m.path == f"/{package}.{service}/{method}"
    assert (m.request.DESCRIPTOR.full_name, m.response.DESCRIPTOR.full_name, m.streaming) == \
        (f"{package}.{request_type}", f"{package}.{response_type}", streams)


def test_every_served_method_is_in_the_contract() -> None:
    assert len(api.METHODS) == len(V1BETA1_METHODS) + len(STATUS_METHODS) + len(PLUGINREGISTRATION_METHODS)


def test_pluginregistration_has_exactly_upstreams_messages_and_methods() -> None:
    file = api.PluginInfo.DESCRIPTOR.file
    assert file.package == "pluginregistration"
    assert sorted(file.message_types_by_name) == sorted(PLUGINREGISTRATION)
    for name, fields in PLUGINREGISTRATION.items():
        assert fields_of(getattr(api, name).DESCRIPTOR, "pluginregistration") == fields, name
    proto = file_proto("pluginregistration.proto")
    found = [(s.name, m.name, m.input_type, m.output_type, m.server_streaming, m.client_streaming)
             for s in proto.service for m in s.method]
    assert found == [(service, method, f".pluginregistration.{request}", f".pluginregistration.{response}",
                      streams, False) for service, method, request, response, streams in PLUGINREGISTRATION_METHODS]
    for service, method, request, response, streams in PLUGINREGISTRATION_METHODS:
        [m] = [m for m in api.METHODS if (m.service, m.name) == (f"pluginregistration.{service}", method)]
        assert m.path == f"/pluginregistration.{service}/{method}" and m.streaming is streams
        assert (m.request.DESCRIPTOR.name, m.response.DESCRIPTOR.name) == (request, response)
    info = api.PluginInfo(type="DevicePlugin", name="example.com/fpga", endpoint="/p/x.sock",
                          supported_versions=["v1beta1"])
    assert info.SerializeToString() == (text(1, "DevicePlugin") + text(2, "example.com/fpga") + text(3, "/p/x.sock")
                                        + text(4, "v1beta1"))


# --- bytes, encoded by hand from the protobuf encoding spec -----------------------------------

def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes, two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def text(number: int, value: str) -> bytes:
    return chunk(number, value.encode())


def chunk(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def number(number_: int, value: int) -> bytes:
    return tag(number_, 0) + varint(value)


def test_bytes_of_allocate_response() -> None:
    message = api.AllocateResponse(container_responses=[api.ContainerAllocateResponse(
        envs={"B": "2", "A": "é"}, mounts=[api.Mount(container_path="/c", host_path="/h", read_only=True)],
        devices=[api.DeviceSpec(container_path="/dev/x", host_path="/dev/y", permissions="rw")],
        annotations={"k": "v"}, cdi_devices=[api.CDIDevice(name="vendor.com/class=a")])])
    inner = (chunk(1, text(1, "A") + text(2, "é")) + chunk(1, text(1, "B") + text(2, "2"))
             + chunk(2, text(1, "/c") + text(2, "/h") + number(3, 1))
             + chunk(3, text(1, "/dev/x") + text(2, "/dev/y") + text(3, "rw"))
             + chunk(4, text(1, "k") + text(2, "v")) + chunk(5, text(1, "vendor.com/class=a")))
    expected = chunk(1, inner)
    assert message.SerializeToString(deterministic=True) == expected
    assert api.AllocateResponse.FromString(expected) == message


def test_bytes_of_list_and_watch_response_and_register() -> None:
    devices = api.ListAndWatchResponse(devices=[
        api.Device(ID="0000:3b:00.0", health="Healthy", topology=api.TopologyInfo(nodes=[api.NUMANode(ID=1)])),
        api.Device(ID="x", health="Unhealthy", topology=api.TopologyInfo(nodes=[api.NUMANode(ID=-1)]))])
    expected = (chunk(1, text(1, "0000:3b:00.0") + text(2, "Healthy") + chunk(3, chunk(1, number(1, 1))))
                + chunk(1, text(1, "x") + text(2, "Unhealthy") + chunk(3, chunk(1, number(1, -1)))))
    assert devices.SerializeToString() == expected
    assert len(varint(-1)) == 10
    register = api.RegisterRequest(version="v1beta1", endpoint="udp-1.sock", resource_name="example.com/fpga",
                                   options=api.DevicePluginOptions(get_preferred_allocation_available=True))
    assert register.SerializeToString() == (text(1, "v1beta1") + text(2, "udp-1.sock") + text(3, "example.com/fpga")
                                            + chunk(4, number(2, 1)))


def test_bytes_of_preferred_allocation_and_prestart() -> None:
    request = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
        available_deviceIDs=["a", "b"], must_include_deviceIDs=["b"], allocation_size=2)])
    assert request.SerializeToString() == chunk(1, text(1, "a") + text(1, "b") + text(2, "b") + number(3, 2))
    answer = api.PreferredAllocationResponse(container_responses=[
        api.ContainerPreferredAllocationResponse(deviceIDs=["b", "a"])])
    assert answer.SerializeToString() == chunk(1, text(1, "b") + text(1, "a"))
    assert api.PreStartContainerRequest(devices_ids=["a"]).SerializeToString() == text(1, "a")
    assert api.ContainerAllocateRequest(devices_ids=["a"]).SerializeToString() == text(1, "a")


def test_unknown_fields_from_a_newer_kubelet_are_accepted() -> None:
    """A later upstream field (number 99 here) must not break parsing of what we know."""
    data = text(1, "v1beta1") + text(99, "from the future") + number(98, 7)
    assert api.RegisterRequest.FromString(data).version == "v1beta1"
