"""What every resource has now: snapshots from discovery, health_command results over them,
the published lists, and the journal events their differences make.

The daemon feeds it scans and health results; it publishes the effective devices of each
resource to the resource's :class:`ResourceState` (which wakes the ListAndWatch streams
when, and only when, the list changed) and emits one event per device transition.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from . import discovery, events
from .health import CommandHealth
from .model import UNHEALTHY, Device, ResourceDiff, diff
from .servicer import ResourceState

log = logging.getLogger(__name__)


class Inventory:
    def __init__(self, sink: events.Sink) -> None:
        self.sink = sink
        self.states: Dict[str, ResourceState] = {}
        self.raw: Dict[str, Mapping[str, Device]] = {}
        self.problems: Set[str] = set()
        self.command_health = CommandHealth()
        # Devices whose health_command could not be killed: unhealthy until it exits.
        self.stuck: Dict[Tuple[str, str], str] = {}

    # --- resources --------------------------------------------------------------------------------

    def add(self, state: ResourceState) -> None:
        self.states[state.config.name] = state

    def remove(self, name: str) -> None:
        state = self.states.pop(name, None)
        self.raw.pop(name, None)
        if state is not None:
            for dev_id in state.current()[1]:
                self.command_health.forget((name, dev_id))
                self.stuck.pop((name, dev_id), None)
        self.problems = {p for p in self.problems if not p.startswith(name + ":")}

    def __contains__(self, name: str) -> bool:
        return name in self.states

    # --- discovery ------------------------------------------------------------------------------------

    def scan(self, context: Any, names: List[str]) -> Dict[str, ResourceDiff]:
        """Rescan ``names`` in full; publish; return what changed per resource."""
        resources = [self.states[n].config for n in names if n in self.states]
        result = discovery.scan(context, resources)
        scanned = {r.name for r in resources}
        problems = {p for p in self.problems if p.split(":", 1)[0] not in scanned}
        problems |= set(result.problems)
        self._note_problems(problems - self.problems)
        self.problems = problems
        out = {}
        for res in resources:
            self.raw[res.name] = result.snapshot[res.name]
            change = self.publish(res.name)
            if change:
                out[res.name] = change
        return out

    def refresh(self, context: Any, name: str, changes: Mapping[str, str]) -> Optional[ResourceDiff]:
        """Look again at only the devices an event touched (a full scan when only that can tell)."""
        res = self.states[name].config
        result = discovery.refresh(context, res, self.raw.get(name, {}), changes)
        if result is None:
            return self.scan(context, [name]).get(name)
        self.raw[name], problems = result
        self._note_problems(set(problems) - self.problems)
        self.problems |= set(problems)
        return self.publish(name)

    def _note_problems(self, new: Set[str]) -> None:
        for problem in sorted(new):
            log.warning("%s", problem)

    def nodes(self) -> Set[str]:
        """Every device node of every resource (for the inotify watch on their directories)."""
        out: Set[str] = set()
        for name, state in self.states.items():
            out.update(n for dev in self.raw.get(name, {}).values() for n in dev.devnodes)
            out.update(state.config.extra_devnodes)
        return out

    # --- health_command results -------------------------------------------------------------------------

    def health_result(self, name: str, dev_id: str, ok: bool, reason: str, threshold: int,
                      stuck: bool = False) -> Optional[ResourceDiff]:
        if name not in self.states or dev_id not in self.raw.get(name, {}):
            return None  # the device or resource went away meanwhile
        key = (name, dev_id)
        if stuck:
            self.stuck[key] = reason
        else:
            self.stuck.pop(key, None)
            self.command_health.observe(key, ok, reason, threshold)
        return self.publish(name)

    def release_stuck(self, name: str, dev_id: str) -> Optional[ResourceDiff]:
        if self.stuck.pop((name, dev_id), None) is None:
            return None
        return self.publish(name)

    # --- publishing ------------------------------------------------------------------------------------------

    def effective(self, name: str) -> Dict[str, Device]:
        """Rule health from the scan, overlaid with the damped health_command result."""
        out = {}
        for dev_id, dev in self.raw.get(name, {}).items():
            if dev.healthy:
                stuck = self.stuck.get((name, dev_id))
                cmd = self.command_health.get((name, dev_id))
                if stuck is not None:
                    dev = dataclasses.replace(dev, health=UNHEALTHY, reason=stuck)
                elif cmd is not None and not cmd[0]:
                    dev = dataclasses.replace(dev, health=UNHEALTHY, reason=cmd[1])
            out[dev_id] = dev
        return out

    def publish(self, name: str) -> Optional[ResourceDiff]:
        """Publish the effective devices of ``name``; emit the events of what changed."""
        state = self.states.get(name)
        if state is None:
            return None
        old = state.current()[1]
        new = self.effective(name)
        if not state.publish(new):
            return None
        change = diff({name: old}, {name: new}).get(name)
        if change is None:
            return None
        for dev in change.added:
            self.sink.emit(events.devices_event("added", name, dev.id, dev.devnodes, dev.health, dev.reason))
        for dev in change.removed:
            allocated = state.allocated_at(dev.id)
            extra = ""
            if allocated:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(allocated))
                extra = f"it was allocated to a container at {stamp}, which may have lost it"
            self.sink.emit(events.devices_event("removed", name, dev.id, dev.devnodes, dev.health, "", extra))
            self.command_health.forget((name, dev.id))
            self.stuck.pop((name, dev.id), None)
            state.forget(dev.id)
        for before, after in change.changed:
            if before.healthy and not after.healthy:
                self.sink.emit(events.devices_event("unhealthy", name, after.id, after.devnodes, after.health,
                                                    after.reason))
            elif not before.healthy and after.healthy:
                self.sink.emit(events.devices_event("recovered", name, after.id, after.devnodes, after.health,
                                                    before.reason))
            elif before.reason != after.reason and not after.healthy:
                log.info("%s: device %s still unhealthy: %s", name, after.id, after.reason)
            else:
                log.debug("%s: device %s changed: %s -> %s", name, after.id, before, after)
        return change

    def devices(self) -> List[Device]:
        return [d for s in self.states.values() for d in s.current()[1].values()]
