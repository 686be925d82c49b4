"""Bytes serialized on one stack parse on every other, to the same messages, and each writes the
same bytes (EL9 <-> newest, EL10 <-> newest, EL9 <-> EL10, upb <-> pure Python)."""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import pytest

from .conftest import STACKS, Stack

WIRE = os.path.join("tests", "stacks", "wire.py")
_dumps: Dict[str, Dict[str, Any]] = {}


def dump(stack: Stack) -> Dict[str, Any]:
    if stack.name not in _dumps:
        proc = stack.run([WIRE, "dump"])
        assert proc.returncode == 0, f"{stack.name}: wire.py dump failed:\n{proc.stderr}"
        _dumps[stack.name] = json.loads(proc.stdout)
    return _dumps[stack.name]


@pytest.mark.parametrize("source,destination", [(s, d) for s in STACKS for d in STACKS if s != d],
                         ids=lambda s: s.name)
def test_bytes_cross_stacks(source: Stack, destination: Stack) -> None:
    sent = dump(source)
    assert len(sent["messages"]) >= 20, sorted(sent["messages"])
    proc = destination.run([WIRE, "check"], stdin=json.dumps(sent))
    assert proc.stdout, f"{destination.name}: wire.py check printed nothing:\n{proc.stderr}"
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and not result["problems"], (
        f"{source.name} {sent['stack']} -> {destination.name} {result['stack']}:\n" + "\n".join(result["problems"]))


def test_the_stacks_are_distinct() -> None:
    """The pairs above cross what they claim to: the EL stacks are pure Python on old protobuf."""
    seen = {s.name: dump(s)["stack"] for s in STACKS}
    assert seen["newest"]["backend"] == "upb" and seen["newest-python"]["backend"] == "python"
    assert seen["el9"]["protobuf"] == "3.14.0" and seen["el9"]["python"].startswith("3.9.")
    assert seen["el10"]["protobuf"] == "3.19.6" and seen["el10"]["python"].startswith("3.12.")
    assert seen["el9"]["backend"] == seen["el10"]["backend"] == "python"
