"""health.py: damping of health_command results."""

from __future__ import annotations

from typing import List, Tuple

import pytest

from udev_device_plugin.health import CommandHealth

G, B = True, False


def run(threshold: int, results: List[bool]) -> List[bool]:
    h = CommandHealth()
    return [h.observe("dev", r, "" if r else "check failed", threshold)[0] for r in results]


@pytest.mark.parametrize("threshold, results, expected", [
    # threshold 1: every result applies at once
    (1, [G], [G]),
    (1, [B], [B]),
    (1, [G, B, G, B], [G, B, G, B]),
    (1, [B, B, G, G], [B, B, G, G]),
    # the first result applies at once whatever the threshold: there is nothing to damp yet
    (3, [B], [B]),
    (3, [G], [G]),
    # threshold 3: a change takes three consecutive equal results
    (3, [G, B, B, B], [G, G, G, B]),
    (3, [G, B, B, G, B, B, B], [G, G, G, G, G, G, B]),  # an interruption starts the count again
    (3, [G, B, B, B, G, G, G], [G, G, G, B, B, B, G]),  # recovery is damped the same way
    (3, [G, B, B, B, G, G, B, G, G, G], [G, G, G, B, B, B, B, B, B, G]),
    (3, [B, G, G, G, G], [B, B, B, G, G]),
    (2, [G, B, G, B, B], [G, G, G, G, B]),
])
def test_damping(threshold, results, expected):
    assert run(threshold, results) == expected


def test_reason_follows_the_damped_state():
    h = CommandHealth()
    assert h.observe("d", False, "temperature 95", 2) == (False, "temperature 95")
    assert h.observe("d", False, "temperature 97", 2) == (False, "temperature 97")  # same state: newest reason
    assert h.observe("d", True, "", 2) == (False, "temperature 97")  # pending: the reason of the state shown
    assert h.observe("d", True, "", 2) == (True, "")
    assert h.observe("d", False, "fan", 2) == (True, "")
    assert h.get("d") == (True, "")


def test_keys_are_independent():
    h = CommandHealth()
    steps: List[Tuple[str, bool]] = [("a", G), ("b", B), ("a", B), ("b", G), ("a", B), ("b", G)]
    got = [h.observe(k, r, "x", 2)[0] for k, r in steps]
    assert got == [G, B, G, B, B, G]
    assert sorted(h.keys()) == ["a", "b"]


def test_get_and_forget():
    h = CommandHealth()
    assert h.get(("res", "d0")) is None
    h.observe(("res", "d0"), False, "broken", 3)
    assert h.get(("res", "d0")) == (False, "broken")
    h.forget(("res", "d0"))
    assert h.get(("res", "d0")) is None
    assert h.keys() == []
    h.forget(("res", "d0"))  # forgetting twice is fine
    # Forgotten, the next result applies at once again.
    assert h.observe(("res", "d0"), True, "", 3) == (True, "")
