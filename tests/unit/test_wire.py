"""The daemon's codec (wire.py) against protobuf's runtime, the independent reference (api).

Its schema must equal the shipped descriptors field for field (which test_api checks against
upstream's api.proto); on random messages of every type its bytes must equal what protobuf writes in
deterministic mode and each must parse the other's; and on mangled bytes it may only answer or
raise DecodeError.  Runs on every stack: upb and pure-Python protobuf, 3.14 to the newest.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any, Dict

import pytest
from google.protobuf import descriptor_pb2

from udev_device_plugin import api, wire

_T = descriptor_pb2.FieldDescriptorProto
_KINDS = {_T.TYPE_BOOL: wire.BOOL, _T.TYPE_INT32: wire.INT32, _T.TYPE_INT64: wire.INT64, _T.TYPE_DOUBLE: wire.DOUBLE,
          _T.TYPE_STRING: wire.STRING}


def _pb(full_name: str) -> Any:
    cls = getattr(api, full_name.rpartition(".")[2])
    assert cls.DESCRIPTOR.full_name == full_name
    return cls


def test_schema_is_the_descriptors() -> None:
    """Field for field, what descriptors.py says (test_api checks that against upstream's api.proto)."""
    F = descriptor_pb2.FieldDescriptorProto
    expected: Dict[str, list] = {}
    for data in api.FILES:
        file = descriptor_pb2.FileDescriptorProto.FromString(data)
        for m in file.message_type:
            full_name = f"{file.package}.{m.name}"
            maps = {f"{full_name}.{n.name}" for n in m.nested_type if n.options.map_entry}
            for n in m.nested_type:
                if n.options.map_entry:
                    assert [(f.name, f.type) for f in n.field] == [("key", F.TYPE_STRING), ("value", F.TYPE_STRING)]
            fields = []
            for fd in sorted(m.field, key=lambda fd: fd.number):
                repeated = fd.label == F.LABEL_REPEATED
                if fd.type_name.lstrip(".") in maps:
                    fields.append(wire.Field(fd.number, fd.name, wire.MAP, True))
                elif fd.type == F.TYPE_MESSAGE:
                    fields.append(wire.Field(fd.number, fd.name, wire.MESSAGE, repeated, fd.type_name.lstrip(".")))
                else:
                    fields.append(wire.Field(fd.number, fd.name, _KINDS[fd.type], repeated))
            expected[full_name] = fields
    assert sorted(expected) == sorted(wire.SCHEMA)
    for full_name, fields in wire.SCHEMA.items():
        assert list(fields) == expected[full_name], full_name
        assert _pb(full_name).DESCRIPTOR.full_name == full_name


def test_methods_are_apis() -> None:
    assert [(m.path, m.streaming, m.request.DESCRIPTOR_NAME, m.response.DESCRIPTOR_NAME) for m in wire.METHODS] == [
        (m.path, m.streaming, m.request.DESCRIPTOR.full_name, m.response.DESCRIPTOR.full_name) for m in api.METHODS]
    assert wire.ALLOCATE.path == "/v1beta1.DevicePlugin/Allocate" and wire.LIST_AND_WATCH.streaming


# --- random messages, both ways ----------------------------------------------------------------------------

_ALPHABET = "ab/:-_.=é\u00ffß中\U0001F600 \t\n"


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.choice((0, 0, 1, 3, 12, 200))))


def _scalar(rng: random.Random, kind: str) -> Any:
    if kind == wire.BOOL:
        return rng.random() < 0.5
    if kind == wire.INT32:
        return rng.choice((0, 1, -1, 127, 128, 2**31 - 1, -2**31, rng.randrange(-2**31, 2**31)))
    if kind == wire.INT64:
        return rng.choice((0, 1, -1, 2**63 - 1, -2**63, 300, rng.randrange(-2**63, 2**63)))
    if kind == wire.DOUBLE:
        return rng.choice((0.0, -0.5, 1e300, float("inf"), -float("inf"), rng.uniform(-1e9, 1e9)))
    return _text(rng)


def _values(rng: random.Random, full_name: str, depth: int = 0) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for f in wire.SCHEMA[full_name]:
        if rng.random() < 0.3:
            continue
        if f.kind == wire.MAP:
            out[f.name] = {_text(rng): _text(rng) for _ in range(rng.randrange(4))}
        elif f.kind == wire.MESSAGE:
            count = rng.randrange(4) if f.repeated else 1
            if depth < 3:
                made = [_values(rng, f.message, depth + 1) for _ in range(count)]
                out[f.name] = made if f.repeated else made[0]
        elif f.repeated:
            out[f.name] = [_scalar(rng, f.kind) for _ in range(rng.randrange(5))]
        else:
            out[f.name] = _scalar(rng, f.kind)
    return out


def _build(classes: Any, full_name: str, values: Dict[str, Any]) -> Any:
    kwargs: Dict[str, Any] = {}
    for f in wire.SCHEMA[full_name]:
        if f.name not in values:
            continue
        value = values[f.name]
        if f.kind == wire.MESSAGE:
            value = ([_build(classes, f.message, v) for v in value] if f.repeated
                     else _build(classes, f.message, value))
        kwargs[f.name] = value
    return classes(full_name)(**kwargs)


def _tree(message: Any, full_name: str) -> Dict[str, Any]:
    """Every field's value, with proto3's defaults: what a reader of either kind of message sees."""
    out: Dict[str, Any] = {}
    for f in wire.SCHEMA[full_name]:
        value = getattr(message, f.name)
        if f.kind == wire.MAP:
            value = dict(value)
        elif f.kind == wire.MESSAGE:
            value = [_tree(v, f.message) for v in value] if f.repeated else _tree(value, f.message)
        elif f.repeated:
            value = list(value)
        out[f.name] = value
    return out


def _nan_free(values: Any) -> bool:
    return not any(isinstance(v, float) and math.isnan(v) for v in _leaves(values))


def _leaves(values: Any) -> Any:
    if isinstance(values, dict):
        for v in values.values():
            yield from _leaves(v)
    elif isinstance(values, list):
        for v in values:
            yield from _leaves(v)
    else:
        yield values


def _maps_in_order(values: Dict[str, Any], full_name: str) -> bool:
    """True when every map of ``values`` has at most one entry: the bytes cannot depend on map order."""
    for f in wire.SCHEMA[full_name]:
        value = values.get(f.name)
        if value is None:
            continue
        if f.kind == wire.MAP and len(value) > 1:
            return False
        if f.kind == wire.MESSAGE and not all(_maps_in_order(v, f.message)
                                              for v in (value if f.repeated else [value])):
            return False
    return True


@pytest.mark.parametrize("full_name", sorted(wire.SCHEMA))
def test_random_messages_agree_with_protobuf(full_name: str) -> None:
    rng = random.Random(full_name)
    for _ in range(60):
        values = _values(rng, full_name)
        ours = _build(wire._TYPES.__getitem__, full_name, values)
        theirs = _build(_pb, full_name, values)
        data = ours.SerializeToString()
        if _maps_in_order(values, full_name):  # protobuf's own map order is its runtime's (upb: a hash's)
            assert data == theirs.SerializeToString(deterministic=True), values
        else:
            assert len(data) == len(theirs.SerializeToString()), values
        assert _tree(_pb(full_name).FromString(data), full_name) == _tree(theirs, full_name)
        parsed = wire._TYPES[full_name].FromString(theirs.SerializeToString())
        assert _tree(parsed, full_name) == _tree(theirs, full_name)
        assert parsed == ours


@pytest.mark.parametrize("full_name", ["v1beta1.AllocateRequest", "v1beta1.PreferredAllocationRequest",
                                       "v1beta1.AllocateResponse", "udevdeviceplugin.v1.StatusResponse",
                                       "pluginregistration.RegistrationStatus", "v1beta1.RegisterRequest"])
def test_mangled_bytes_parse_or_raise_decode_error(full_name: str) -> None:
    """Truncated, flipped, spliced bytes: DecodeError or a message; where protobuf parses too, the same one."""
    rng = random.Random(full_name)
    parsed = refused = 0
    for _ in range(400):
        data = bytearray(_build(_pb, full_name, _values(rng, full_name)).SerializeToString(deterministic=True))
        for _ in range(rng.randrange(1, 4)):
            how = rng.randrange(3)
            if how == 0 and data:
                del data[rng.randrange(len(data)):]
            elif how == 1 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        try:
            ours = wire._TYPES[full_name].FromString(bytes(data))
        except wire.DecodeError:
            refused += 1
            continue
        parsed += 1
        try:
            theirs = _pb(full_name).FromString(bytes(data))
        except Exception:  # noqa: BLE001 - protobuf's errors differ between backends (see below)
            continue
        if _nan_free(_tree(theirs, full_name)):
            assert _tree(ours, full_name) == _tree(theirs, full_name)
    assert parsed and refused  # both branches were taken


# --- what the kubelet may send, byte by byte ----------------------------------------------------------------

def _key(number: int, wire_type: int) -> bytes:
    return wire.encode_varint(number << 3 | wire_type)


def _str(number: int, value: bytes) -> bytes:
    return _key(number, 2) + wire.encode_varint(len(value)) + value


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    data = (_str(1, b"a") + _key(98, 0) + wire.encode_varint(2**63) + _key(97, 1) + b"\0" * 8
            + _key(96, 5) + b"\0" * 4 + _str(95, b"\xff\xfe") + _str(1, b"b"))
    assert wire.ContainerAllocateRequest.FromString(data).devices_ids == ["a", "b"]


def test_packed_and_unpacked_integers_and_signedness() -> None:
    packed = _str(5, wire.encode_varint(1) + wire.encode_varint(-1) + wire.encode_varint(2**40))
    unpacked = _key(5, 0) + wire.encode_varint(7)
    assert wire.DeviceStatus.FromString(packed + unpacked).numa_nodes == [1, -1, 2**40, 7]
    # An int32 is written as a 64-bit varint when negative; a wider value is cut to 32 bits (protobuf does).
    size = _key(3, 0) + wire.encode_varint(-5)
    assert wire.ContainerPreferredAllocationRequest.FromString(size).allocation_size == -5
    assert wire.ContainerPreferredAllocationRequest.FromString(_key(3, 0) + wire.encode_varint(2**32 + 3)
                                                               ).allocation_size == 3
    assert len(wire.encode_varint(-1)) == 10 and wire.encode_varint(300) == b"\xac\x02"


def test_last_scalar_wins_and_messages_merge() -> None:
    data = (_str(1, b"v1alpha") + _str(1, b"v1beta1") + _str(4, _key(1, 0) + b"\x01")
            + _str(4, _key(2, 0) + b"\x01"))
    request = wire.RegisterRequest.FromString(data)
    assert request.version == "v1beta1"
    assert request.options.pre_start_required and request.options.get_preferred_allocation_available
    assert _pb("v1beta1.RegisterRequest").FromString(data).options.pre_start_required


def test_map_entries_last_key_wins_and_missing_parts_are_empty() -> None:
    entry = _str(1, _str(1, b"K") + _str(2, b"1")) + _str(1, _str(1, b"K") + _str(2, b"2")) + _str(1, _str(2, b"v"))
    assert wire.ContainerAllocateResponse.FromString(entry).envs == {"K": "2", "": "v"}


@pytest.mark.parametrize("data, says", [
    (_key(1, 2) + b"\x05ab", "runs past the end"),
    (_key(1, 2) + b"\xff" * 11, "longer than ten bytes"),
    (_key(1, 2), "truncated varint"),
    (_key(1, 0) + b"\x01", "ContainerAllocateRequest.devices_ids: wire type 0, expected 2"),
    (_str(1, b"\xff"), "not UTF-8"),
    (b"\x00\x01", "field number 0"),
    (_key(9, 3), "groups"),
    (_key(9, 1) + b"\0\0", "truncated fixed-width"),
])
def test_malformed_requests_raise_decode_error(data: bytes, says: str) -> None:
    with pytest.raises(wire.DecodeError, match=says):
        wire.ContainerAllocateRequest.FromString(data)


def test_double_and_bool_encoding() -> None:
    status = wire.StatusResponse(registered=True, since=1.5)
    assert status.SerializeToString() == _key(2, 0) + b"\x01" + _key(9, 1) + struct.pack("<d", 1.5)
    assert wire.StatusResponse.FromString(status.SerializeToString()) == status


def test_message_objects() -> None:
    request = wire.RegisterRequest(version="v1beta1")
    assert request.options == wire.DevicePluginOptions() and not request.options.pre_start_required
    assert wire.RegisterRequest().SerializeToString() == b""
    assert wire.RegisterRequest(options=wire.DevicePluginOptions()).SerializeToString() == _str(4, b"")
    assert request.SerializeToString() == _str(1, b"v1beta1")  # reading the unset options did not set it
    assert repr(request) == "v1beta1.RegisterRequest(version='v1beta1')"
    with pytest.raises(TypeError, match="no field 'verison'"):
        wire.RegisterRequest(verison="v1beta1")
    with pytest.raises(AttributeError, match="no field 'nope'"):
        request.nope  # noqa: B018
    assert wire.RegisterRequest(version="a") != wire.RegisterRequest(version="b")


def test_long_runs_of_ids_parse_as_protobufs():
    """The kubelet's GetPreferredAllocation lists every available ID: a run of one field, read by its own loop."""
    ids = [f"loop{n}::{k}" for n in range(100) for k in range(100)]
    ids[5000] = "x" * 300  # a length of two bytes within the run
    request = _pb("v1beta1.ContainerPreferredAllocationRequest")(
        available_deviceIDs=ids, must_include_deviceIDs=["a", "b"], allocation_size=3)
    data = request.SerializeToString()
    parsed = wire.ContainerPreferredAllocationRequest.FromString(data)
    assert parsed.available_deviceIDs == ids and parsed.must_include_deviceIDs == ["a", "b"]
    # Runs interrupted by another field, and a run cut short.
    mixed = _str(1, b"a") + _str(2, b"m") + _str(1, b"b") + _str(1, b"c")
    assert wire.ContainerPreferredAllocationRequest.FromString(mixed).available_deviceIDs == ["a", "b", "c"]
    with pytest.raises(wire.DecodeError, match="runs past the end"):
        wire.ContainerPreferredAllocationRequest.FromString(_str(1, b"a") + _key(1, 2) + b"\x05ab")
    with pytest.raises(wire.DecodeError, match="truncated varint"):
        wire.ContainerPreferredAllocationRequest.FromString(_str(1, b"a") + _key(1, 2))
