"""Damping of health_command results: pure bookkeeping, no processes.

Rule-based health (sysfs attributes, udev properties, a vanished device node)
follows udev events and applies at once: each change is a real event.  Command
results are samples, so a change takes ``threshold`` consecutive equal results.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Tuple


class _State:
    __slots__ = ("healthy", "reason", "pending")

    def __init__(self, healthy: bool, reason: str) -> None:
        self.healthy = healthy
        self.reason = reason
        self.pending = 0


class CommandHealth:
    def __init__(self) -> None:
        self._states: Dict[Hashable, _State] = {}
        self._failing: Dict[Hashable, str] = {}  # the keys whose damped result is unhealthy -> why

    def observe(self, key: Hashable, healthy: bool, reason: str, threshold: int) -> Tuple[bool, str]:
        """Record one result; return the damped (healthy, reason)."""
        state = self._states.get(key)
        if state is None:
            # The first result applies at once: there is nothing to damp yet.
            state = self._states[key] = _State(healthy, reason)
        elif healthy == state.healthy:
            state.pending = 0
            state.reason = reason
        else:
            state.pending += 1
            if state.pending >= threshold:
                state.healthy, state.reason, state.pending = healthy, reason, 0
        if state.healthy:
            self._failing.pop(key, None)
        else:
            self._failing[key] = state.reason
        return state.healthy, state.reason

    def get(self, key: Hashable) -> Optional[Tuple[bool, str]]:
        state = self._states.get(key)
        return (state.healthy, state.reason) if state else None

    def forget(self, key: Hashable) -> None:
        self._states.pop(key, None)
        self._failing.pop(key, None)

    def failing(self) -> List[Tuple[Hashable, str]]:
        """(key, reason) of each key whose damped result is unhealthy, in the order they turned so."""
        return list(self._failing.items())

    def keys(self) -> list[Hashable]:
        return list(self._states)
