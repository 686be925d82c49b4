"""The daemon's codec for the kubelet's APIs: protobuf's wire format for the few messages it serves and sends.

Why not protobuf's runtime here: importing it and building the message classes (``api``) costs the
daemon ~20 ms of its start and ~2.5 MiB of its memory (datetime, pickle, text_format and the
descriptor pool come with it), for a dozen small messages of strings, bools, integers and
string maps.  The daemon (servicer, kubelet connector) uses this module; ``api`` keeps protobuf's
classes for ``inspect``, the stand-in kubelet and the tests, where they are the independent
reference this codec is checked against (tests/unit/test_wire.py: the schema equals the shipped
descriptors field for field, and bytes agree both ways on random messages, on every stack).

A message is an instance of a class made from its schema: fields are attributes with proto3's
defaults (``""``, ``0``, ``False``, ``[]``, ``{}``; a message field unset reads as an empty
message), ``SerializeToString()`` and ``FromString(data)`` as in protobuf.  Encoding writes fields
in number order and map entries sorted by key (what protobuf's deterministic mode writes).  Decoding
skips unknown fields, takes the last value of a repeated scalar field and merges a repeated message
field, accepts packed and unpacked repeated integers, and refuses anything else malformed with
:class:`DecodeError` (truncated data, a wrong wire type, a varint of more than ten bytes, invalid
UTF-8, groups).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover - grpc is imported where a handler is made (the codec needs none)
    import grpc

API_VERSION = "v1beta1"
PLUGIN_TYPE = "DevicePlugin"

# Field kinds, by protobuf's wire type: a varint (0), eight bytes (1) or length-delimited (2).
BOOL, INT32, INT64, DOUBLE, STRING, MESSAGE, MAP = "bool", "int32", "int64", "double", "string", "message", "map"
_WIRE_TYPE = {BOOL: 0, INT32: 0, INT64: 0, DOUBLE: 1, STRING: 2, MESSAGE: 2, MAP: 2}
_DEFAULT: Dict[str, Any] = {BOOL: False, INT32: 0, INT64: 0, DOUBLE: 0.0, STRING: ""}


class Field(NamedTuple):
    number: int
    name: str
    kind: str
    repeated: bool = False
    message: str = ""  # the message type of a MESSAGE field


def _f(number: int, name: str, kind: str, repeated: bool = False) -> Field:
    if kind.startswith("."):
        return Field(number, name, MESSAGE, repeated, kind[1:])
    return Field(number, name, kind, repeated or kind == MAP)


# Every message by its full name: k8s.io/kubelet's deviceplugin/v1beta1 and pluginregistration/v1
# api.proto, and our status.proto (the .proto files beside api/descriptors.py).  A map is
# map<string, string>.  ".Name" is a message of the same package.
_SCHEMA: Dict[str, Dict[str, Tuple[Field, ...]]] = {
    "v1beta1": {
        "DevicePluginOptions": (_f(1, "pre_start_required", BOOL), _f(2, "get_preferred_allocation_available", BOOL)),
        "RegisterRequest": (_f(1, "version", STRING), _f(2, "endpoint", STRING), _f(3, "resource_name", STRING),
                            _f(4, "options", ".DevicePluginOptions")),
        "Empty": (),
        "ListAndWatchResponse": (_f(1, "devices", ".Device", True),),
        "TopologyInfo": (_f(1, "nodes", ".NUMANode", True),),
        "NUMANode": (_f(1, "ID", INT64),),
        "Device": (_f(1, "ID", STRING), _f(2, "health", STRING), _f(3, "topology", ".TopologyInfo")),
        "PreStartContainerRequest": (_f(1, "devices_ids", STRING, True),),
        "PreStartContainerResponse": (),
        "PreferredAllocationRequest": (_f(1, "container_requests", ".ContainerPreferredAllocationRequest", True),),
        "ContainerPreferredAllocationRequest": (_f(1, "available_deviceIDs", STRING, True),
                                                _f(2, "must_include_deviceIDs", STRING, True),
                                                _f(3, "allocation_size", INT32)),
        "PreferredAllocationResponse": (_f(1, "container_responses", ".ContainerPreferredAllocationResponse", True),),
        "ContainerPreferredAllocationResponse": (_f(1, "deviceIDs", STRING, True),),
        "AllocateRequest": (_f(1, "container_requests", ".ContainerAllocateRequest", True),),
        "ContainerAllocateRequest": (_f(1, "devices_ids", STRING, True),),
        "CDIDevice": (_f(1, "name", STRING),),
        "AllocateResponse": (_f(1, "container_responses", ".ContainerAllocateResponse", True),),
        "ContainerAllocateResponse": (_f(1, "envs", MAP), _f(2, "mounts", ".Mount", True),
                                      _f(3, "devices", ".DeviceSpec", True), _f(4, "annotations", MAP),
                                      _f(5, "cdi_devices", ".CDIDevice", True)),
        "Mount": (_f(1, "container_path", STRING), _f(2, "host_path", STRING), _f(3, "read_only", BOOL)),
        "DeviceSpec": (_f(1, "container_path", STRING), _f(2, "host_path", STRING), _f(3, "permissions", STRING)),
    },
    "pluginregistration": {
        "PluginInfo": (_f(1, "type", STRING), _f(2, "name", STRING), _f(3, "endpoint", STRING),
                       _f(4, "supported_versions", STRING, True)),
        "RegistrationStatus": (_f(1, "plugin_registered", BOOL), _f(2, "error", STRING)),
        "RegistrationStatusResponse": (),
        "InfoRequest": (),
    },
    "udevdeviceplugin.v1": {
        "StatusRequest": (),
        "StatusResponse": (_f(1, "resource_name", STRING), _f(2, "registered", BOOL), _f(3, "last_error", STRING),
                           _f(4, "registrations", INT64), _f(5, "pid", INT32), _f(6, "version", STRING),
                           _f(7, "devices", ".DeviceStatus", True), _f(8, "state", STRING), _f(9, "since", DOUBLE),
                           _f(10, "stream_since", DOUBLE), _f(11, "endpoint", STRING),
                           _f(12, "streams_lost", INT64), _f(13, "registered_via", STRING),
                           _f(20, "replicas", INT32), _f(21, "replica_policy", STRING), _f(22, "cdi_kind", STRING),
                           _f(23, "cdi_spec", STRING), _f(24, "cdi_error", STRING)),
        "DeviceStatus": (_f(1, "id", STRING), _f(2, "health", STRING), _f(3, "reason", STRING),
                         _f(4, "devnodes", STRING, True), _f(5, "numa_nodes", INT64, True), _f(6, "syspath", STRING),
                         _f(20, "advertised_ids", STRING, True), _f(21, "cdi_devices", STRING, True)),
    },
}


class DecodeError(ValueError):
    """Bytes that are not a valid serialization of the message they were parsed as."""


_MASK64 = (1 << 64) - 1


def encode_varint(n: int) -> bytes:
    """``n`` as a protobuf varint; a negative number as its 64-bit two's complement (ten bytes)."""
    n &= _MASK64
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _signed(n: int, bits: int) -> int:
    n &= (1 << bits) - 1
    return n - (1 << bits) if n >> (bits - 1) else n


def _read_varint(data: bytes, pos: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than ten bytes")


def _read_length(data: bytes, pos: int, end: int) -> Tuple[int, int]:
    size, pos = _read_varint(data, pos, end)
    if size > end - pos:
        raise DecodeError("length-delimited field runs past the end of its message")
    return pos + size, pos


def _skip(data: bytes, pos: int, end: int, wire_type: int) -> int:
    if wire_type == 0:
        return _read_varint(data, pos, end)[1]
    if wire_type == 1 or wire_type == 5:
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise DecodeError("truncated fixed-width field")
        return pos
    if wire_type == 2:
        return _read_length(data, pos, end)[0]
    raise DecodeError(f"wire type {wire_type} (groups are not proto3)")


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"string field is not UTF-8: {exc.reason} at byte {exc.start}") from None


class Message:
    """A message of one schema; subclasses are made by :func:`_make` (one per message type)."""

    __slots__ = ()
    DESCRIPTOR_NAME = ""
    _fields: Tuple[Field, ...] = ()
    _by_number: Dict[int, Field] = {}

    def __init__(self, **values: Any) -> None:
        for f in self._fields:
            if f.name in values:
                value = values.pop(f.name)
                if f.kind == MAP:
                    value = dict(value)
                elif f.repeated:
                    value = list(value)
                setattr(self, f.name, value)
            elif f.kind == MAP:
                setattr(self, f.name, {})
            elif f.repeated:
                setattr(self, f.name, [])
            elif f.kind != MESSAGE:
                setattr(self, f.name, _DEFAULT[f.kind])
            # a message field stays unset until given (it reads as an empty message: __getattr__)
        if values:
            raise TypeError(f"{self.DESCRIPTOR_NAME} has no field {sorted(values)[0]!r}")

    def __getattr__(self, name: str) -> Any:
        for f in self._fields:
            if f.name == name and f.kind == MESSAGE:
                return _TYPES[f.message]()  # an unset message field reads as empty, and stays unset
        raise AttributeError(f"{self.DESCRIPTOR_NAME} has no field {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self._fields)

    __hash__ = None  # type: ignore[assignment]  # mutable, as protobuf's messages

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._fields if self._is_set(f))
        return f"{self.DESCRIPTOR_NAME}({shown})"

    def _is_set(self, f: Field) -> bool:
        if f.kind == MESSAGE and not f.repeated:
            try:
                object.__getattribute__(self, f.name)
            except AttributeError:
                return False
            return True
        return bool(getattr(self, f.name))

    # --- encoding ------------------------------------------------------------------------------

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name
        out: List[bytes] = []
        for f in self._fields:
            if f.kind == MESSAGE and not f.repeated:
                try:
                    value = object.__getattribute__(self, f.name)
                except AttributeError:
                    continue
            else:
                value = getattr(self, f.name)
            if f.kind == MAP:
                for key in sorted(value):
                    entry = _delimited(1, key.encode()) + _delimited(2, value[key].encode())
                    out.append(_delimited(f.number, entry))
            elif f.repeated and f.kind in (INT32, INT64):
                if value:
                    out.append(_delimited(f.number, b"".join(encode_varint(int(v)) for v in value)))
            elif f.repeated:
                out.extend(_encode_one(f, v) for v in value)
            elif f.kind == MESSAGE or value != _DEFAULT[f.kind]:
                out.append(_encode_one(f, value))
        return b"".join(out)

    # --- decoding ------------------------------------------------------------------------------

    @classmethod
    def FromString(cls, data: bytes) -> Message:  # noqa: N802 - protobuf's name
        message = cls()
        message._merge(bytes(data), 0, len(data))
        return message

    def _merge(self, data: bytes, pos: int, end: int) -> None:
        by_number = self._by_number
        while pos < end:
            key, pos = _read_varint(data, pos, end)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise DecodeError(f"{self.DESCRIPTOR_NAME}: field number 0")
            f = by_number.get(number)
            if f is None:
                pos = _skip(data, pos, end, wire_type)
                continue
            packed = f.repeated and wire_type == 2 and f.kind in (INT32, INT64)
            if wire_type != _WIRE_TYPE[f.kind] and not packed:
                raise DecodeError(f"{self.DESCRIPTOR_NAME}.{f.name}: wire type {wire_type}, expected "
                                  f"{_WIRE_TYPE[f.kind]}")
            if packed:
                stop, pos = _read_length(data, pos, end)
                values = getattr(self, f.name)
                while pos < stop:
                    n, pos = _read_varint(data, pos, stop)
                    values.append(_signed(n, 32 if f.kind == INT32 else 64))
                continue
            if wire_type == 0:
                n, pos = _read_varint(data, pos, end)
                value: Any = bool(n) if f.kind == BOOL else _signed(n, 32 if f.kind == INT32 else 64)
            elif wire_type == 1:
                if pos + 8 > end:
                    raise DecodeError(f"{self.DESCRIPTOR_NAME}.{f.name}: truncated double")
                value = struct.unpack_from("<d", data, pos)[0]
                pos += 8
            elif f.kind == STRING and f.repeated and key < 0x80:
                pos = _strings(data, pos, end, key, getattr(self, f.name))
                continue
            else:
                stop, pos = _read_length(data, pos, end)
                if f.kind == STRING:
                    value = _text(data[pos:stop])
                elif f.kind == MAP:
                    k, v = _map_entry(data, pos, stop)
                    getattr(self, f.name)[k] = v
                    pos = stop
                    continue
                elif f.repeated:
                    value = _TYPES[f.message]()
                    value._merge(data, pos, stop)
                else:
                    value = getattr(self, f.name)  # a second occurrence merges into the first
                    value._merge(data, pos, stop)  # (a first one into an empty message, set below)
                pos = stop
            if f.repeated:
                getattr(self, f.name).append(value)
            else:
                setattr(self, f.name, value)


def _strings(data: bytes, pos: int, end: int, key: int, values: List[str]) -> int:
    """A run of one repeated string field (a one-byte key): the kubelet's lists of 10,000 device IDs
    cost a loop of slices, not a pass through the general loop per ID.  Returns where the run ends."""
    append = values.append
    while True:
        size = data[pos] if pos < end else 0x80
        if size < 0x80:
            pos += 1
        else:
            size, pos = _read_varint(data, pos, end)
        stop = pos + size
        if stop > end:
            raise DecodeError("length-delimited field runs past the end of its message")
        append(_text(data[pos:stop]))
        pos = stop
        if pos >= end or data[pos] != key:
            return pos
        pos += 1


def _delimited(number: int, raw: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(raw)) + raw


def _encode_one(f: Field, value: Any) -> bytes:
    if f.kind == STRING:
        return _delimited(f.number, value.encode())
    if f.kind == MESSAGE:
        return _delimited(f.number, value.SerializeToString())
    if f.kind == DOUBLE:
        return encode_varint(f.number << 3 | 1) + struct.pack("<d", value)
    return encode_varint(f.number << 3) + encode_varint(int(value))


def _map_entry(data: bytes, pos: int, end: int) -> Tuple[str, str]:
    key = value = ""
    while pos < end:
        tag, pos = _read_varint(data, pos, end)
        if tag in (0x0A, 0x12):
            stop, pos = _read_length(data, pos, end)
            text = _text(data[pos:stop])
            pos = stop
            if tag == 0x0A:
                key = text
            else:
                value = text
        elif tag >> 3 in (1, 2) or tag >> 3 == 0:
            raise DecodeError(f"map entry field {tag >> 3}: wire type {tag & 7}, expected 2")
        else:
            pos = _skip(data, pos, end, tag & 7)
    return key, value


def _make(full_name: str, fields: Tuple[Field, ...]) -> type:
    return type(full_name.rpartition(".")[2], (Message,), {
        "__slots__": tuple(f.name for f in fields), "DESCRIPTOR_NAME": full_name, "_fields": fields,
        "_by_number": {f.number: f for f in fields}, "__module__": __name__})


_TYPES: Dict[str, Any] = {}
for _package, _messages in _SCHEMA.items():
    for _name, _fields in _messages.items():
        _TYPES[f"{_package}.{_name}"] = _make(f"{_package}.{_name}",
                                               tuple(f._replace(message=f"{_package}.{f.message}") if f.message else f
                                                     for f in sorted(_fields)))
del _package, _messages, _name, _fields

SCHEMA = {name: cls._fields for name, cls in _TYPES.items()}  # every message's fields, by full name

DevicePluginOptions: Any = _TYPES["v1beta1.DevicePluginOptions"]
RegisterRequest: Any = _TYPES["v1beta1.RegisterRequest"]
Empty: Any = _TYPES["v1beta1.Empty"]
ListAndWatchResponse: Any = _TYPES["v1beta1.ListAndWatchResponse"]
TopologyInfo: Any = _TYPES["v1beta1.TopologyInfo"]
NUMANode: Any = _TYPES["v1beta1.NUMANode"]
Device: Any = _TYPES["v1beta1.Device"]
PreStartContainerRequest: Any = _TYPES["v1beta1.PreStartContainerRequest"]
PreStartContainerResponse: Any = _TYPES["v1beta1.PreStartContainerResponse"]
PreferredAllocationRequest: Any = _TYPES["v1beta1.PreferredAllocationRequest"]
ContainerPreferredAllocationRequest: Any = _TYPES["v1beta1.ContainerPreferredAllocationRequest"]
PreferredAllocationResponse: Any = _TYPES["v1beta1.PreferredAllocationResponse"]
ContainerPreferredAllocationResponse: Any = _TYPES["v1beta1.ContainerPreferredAllocationResponse"]
AllocateRequest: Any = _TYPES["v1beta1.AllocateRequest"]
ContainerAllocateRequest: Any = _TYPES["v1beta1.ContainerAllocateRequest"]
AllocateResponse: Any = _TYPES["v1beta1.AllocateResponse"]
ContainerAllocateResponse: Any = _TYPES["v1beta1.ContainerAllocateResponse"]
CDIDevice: Any = _TYPES["v1beta1.CDIDevice"]
Mount: Any = _TYPES["v1beta1.Mount"]
DeviceSpec: Any = _TYPES["v1beta1.DeviceSpec"]
PluginInfo: Any = _TYPES["pluginregistration.PluginInfo"]
RegistrationStatus: Any = _TYPES["pluginregistration.RegistrationStatus"]
RegistrationStatusResponse: Any = _TYPES["pluginregistration.RegistrationStatusResponse"]
InfoRequest: Any = _TYPES["pluginregistration.InfoRequest"]
StatusRequest: Any = _TYPES["udevdeviceplugin.v1.StatusRequest"]
StatusResponse: Any = _TYPES["udevdeviceplugin.v1.StatusResponse"]
DeviceStatus: Any = _TYPES["udevdeviceplugin.v1.DeviceStatus"]


# --- the services: served through grpc's generic handlers, called through its multi-callables ----------

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

# (service, method, request, response, streams its responses): every RPC of the three APIs.
RPCS = (
    (REGISTRATION, "Register", "v1beta1.RegisterRequest", "v1beta1.Empty", False),
    (DEVICE_PLUGIN, "GetDevicePluginOptions", "v1beta1.Empty", "v1beta1.DevicePluginOptions", False),
    (DEVICE_PLUGIN, "ListAndWatch", "v1beta1.Empty", "v1beta1.ListAndWatchResponse", True),
    (DEVICE_PLUGIN, "GetPreferredAllocation", "v1beta1.PreferredAllocationRequest",
     "v1beta1.PreferredAllocationResponse", False),
    (DEVICE_PLUGIN, "Allocate", "v1beta1.AllocateRequest", "v1beta1.AllocateResponse", False),
    (DEVICE_PLUGIN, "PreStartContainer", "v1beta1.PreStartContainerRequest", "v1beta1.PreStartContainerResponse",
     False),
    (STATUS, "GetStatus", "udevdeviceplugin.v1.StatusRequest", "udevdeviceplugin.v1.StatusResponse", False),
    (PLUGIN_REGISTRATION, "GetInfo", "pluginregistration.InfoRequest", "pluginregistration.PluginInfo", False),
    (PLUGIN_REGISTRATION, "NotifyRegistrationStatus", "pluginregistration.RegistrationStatus",
     "pluginregistration.RegistrationStatusResponse", False),
)


def methods(classes: Callable[[str], Any]) -> Tuple[Method, ...]:
    """Every RPC, in RPCS' order, with the message classes ``classes(full name)`` gives (ours, or protobuf's)."""
    return tuple(Method(service, name, classes(request), classes(response), streaming)
                 for service, name, request, response, streaming in RPCS)


METHODS = methods(_TYPES.__getitem__)
(REGISTER, GET_DEVICE_PLUGIN_OPTIONS, LIST_AND_WATCH, GET_PREFERRED_ALLOCATION, ALLOCATE, PRE_START_CONTAINER,
 GET_STATUS, GET_INFO, NOTIFY_REGISTRATION_STATUS) = METHODS


def method_handler(method: Method, behaviour: Callable[..., Any], raw_request: bool = False,
                   raw_response: bool = False) -> grpc.RpcMethodHandler:
    """The grpc handler serving ``method`` with ``behaviour(request, context)``.

    ``raw_request``/``raw_response``: the behaviour takes or returns serialized bytes (a cache
    of serialized replies answers without parsing or building messages).  Works for the
    threaded and the asyncio (grpc.aio) servers alike: a coroutine function or an async
    generator is served by grpc.aio.
    """
    import grpc

    deserializer = None if raw_request else method.request.FromString
    serializer = None if raw_response else method.response.SerializeToString
    if method.streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, request_deserializer=deserializer,
                                                    response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=deserializer,
                                               response_serializer=serializer)


def service_handler(service: str, handlers: Dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    import grpc

    return grpc.method_handlers_generic_handler(service, handlers)


class Stub:
    """A client of every method (or of ``methods``) on one channel: ``Stub(channel).Allocate(request, timeout=...)``.

    Works on a ``grpc.Channel`` and on a ``grpc.aio.Channel`` (whose calls are awaitable).
    """

    def __init__(self, channel: Any, methods: Optional[Any] = None) -> None:
        for method in methods or METHODS:
            factory = channel.unary_stream if method.streaming else channel.unary_unary
            setattr(self, method.name, factory(method.path, request_serializer=method.request.SerializeToString,
                                               response_deserializer=method.response.FromString))

    def __getattr__(self, name: str) -> Any:  # for mypy: the methods are set in __init__
        raise AttributeError(name)
