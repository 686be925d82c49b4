"""Messages on the wire between stacks: run with one stack's python from the source tree.

    python tests/stacks/wire.py dump    # JSON on stdout: this stack, and every message's bytes
    python tests/stacks/wire.py check   # JSON from another stack's dump on stdin; exit 1 on a mismatch

Every message of the API (v1beta1 and our Status service) is filled the same way on every stack:
each field set, from its descriptor, to a value that is not the default (repeated fields and maps
with two entries, negative and 64-bit numbers, non-ASCII text, nested messages).  ``check`` parses
the other stack's bytes with this stack's classes and compares them with the message it builds
itself, and compares the bytes it would write for that message (deterministic serialization).
"""

from __future__ import annotations

import base64
import json
import platform
import sys
from typing import Any, Dict, List

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import api_implementation

from udev_device_plugin import api

MAX_DEPTH = 5


def is_repeated(field: Any) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5; 7.x has no label
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def scalar(field: Any, index: int) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.full_name}#{index}-é✓"
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind == FieldDescriptor.TYPE_INT64:
        return -(2 ** 40 + field.number) if index == 0 else 2 ** 62 + field.number
    if kind == FieldDescriptor.TYPE_INT32:
        return -(2 ** 20 + field.number) if index == 0 else 2 ** 30 + field.number
    if kind == FieldDescriptor.TYPE_DOUBLE:  # exactly representable: a Unix time with a fraction
        return 1796130678.25 + field.number if index == 0 else -0.5 - field.number
    raise TypeError(f"{field.full_name}: no sample value for field type {kind}; extend tests/stacks/wire.py")


def fill(message: Any, depth: int = 0) -> Any:
    """``message`` with every field set (recursively), the same on every stack."""
    if depth > MAX_DEPTH:
        raise RecursionError(f"{message.DESCRIPTOR.full_name}: messages nest deeper than {MAX_DEPTH}")
    for field in message.DESCRIPTOR.fields:
        target = getattr(message, field.name)
        entry = field.message_type if field.type == FieldDescriptor.TYPE_MESSAGE else None
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_number[1], entry.fields_by_number[2]
            for index in (0, 1):
                key = scalar(key_field, index)
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    fill(target[key], depth + 1)
                else:
                    target[key] = scalar(value_field, index)
        elif entry is not None and is_repeated(field):
            for _ in (0, 1):
                fill(target.add(), depth + 1)
        elif entry is not None:
            fill(target, depth + 1)
            if not entry.fields:  # an empty message still has to be present
                target.SetInParent()
        elif is_repeated(field):
            target.extend([scalar(field, 0), scalar(field, 1)])
        else:
            setattr(message, field.name, scalar(field, 0))
    return message


def classes() -> Dict[str, Any]:
    """Every message class of the API by full name, map entries left out."""
    out: Dict[str, Any] = {}
    for name in dir(api):
        value = getattr(api, name)
        descriptor = getattr(value, "DESCRIPTOR", None)
        if isinstance(value, type) and descriptor is not None and hasattr(descriptor, "fields"):
            out[descriptor.full_name] = value
    return out


def stack() -> Dict[str, str]:
    import google.protobuf
    import grpc

    return {"python": platform.python_version(), "protobuf": google.protobuf.__version__,
            "backend": api_implementation.Type(), "grpcio": grpc.__version__}


def dump() -> Dict[str, Any]:
    messages = {name: base64.b64encode(fill(cls()).SerializeToString(deterministic=True)).decode()
                for name, cls in sorted(classes().items())}
    return {"stack": stack(), "messages": messages}


def check(other: Dict[str, Any]) -> List[str]:
    """What differs between ``other``'s bytes and this stack's messages (empty: nothing)."""
    mine = classes()
    problems = []
    if sorted(other["messages"]) != sorted(mine):
        problems.append(f"message sets differ: theirs {sorted(other['messages'])}, ours {sorted(mine)}")
    for name in sorted(set(other["messages"]) & set(mine)):
        data = base64.b64decode(other["messages"][name])
        expected = fill(mine[name]())
        try:
            parsed = mine[name].FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
            problems.append(f"{name}: cannot parse their {len(data)} bytes: {exc!r}")
            continue
        if parsed != expected:
            problems.append(f"{name}: parsed {parsed!r}, expected {expected!r}")
        ours = expected.SerializeToString(deterministic=True)
        if ours != data:
            problems.append(f"{name}: we write {ours!r}, they wrote {data!r}")
    return problems


def main(argv: List[str]) -> int:
    if argv == ["dump"]:
        json.dump(dump(), sys.stdout)
        return 0
    if argv == ["check"]:
        result = {"stack": stack(), "problems": check(json.load(sys.stdin))}
        json.dump(result, sys.stdout)
        return 1 if result["problems"] else 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
