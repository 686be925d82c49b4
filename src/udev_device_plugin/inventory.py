"""What every resource has now: snapshots from discovery, health_command results over them,
the published lists, and the journal events their differences make.

The daemon feeds it scans and health results; it publishes the effective devices of each
resource to the resource's :class:`ResourceState` (which wakes the ListAndWatch streams
when, and only when, the list changed) and emits one event per device transition.
"""

from __future__ import annotations

import logging
import time
from typing import AbstractSet, Any, Dict, List, Mapping, Optional, Set, Tuple, Union

from . import discovery, events
from .health import CommandHealth
from .model import UNHEALTHY, Device, ResourceDiff, diff, diff_of
from .servicer import ResourceState

log = logging.getLogger(__name__)


class _Index:
    """One resource's devices by sys_path and by device node, kept in step with its snapshot, so
    that an event finds its devices without a walk over all of them.  A node most often belongs to
    one device: ``by_node`` holds its sys_path then, a set only for a node devices share (a VFIO
    group's); at 10,000 devices that is 2 MiB less."""

    def __init__(self, devices: Mapping[str, Device]) -> None:
        self.by_path: Dict[str, Device] = {d.sys_path: d for d in devices.values()}
        self.by_node: Dict[str, Union[str, Set[str]]] = {}
        for dev in devices.values():
            self._link(dev)

    def paths_at(self, node: str) -> Set[str]:
        held = self.by_node.get(node)
        if held is None:
            return set()
        return {held} if isinstance(held, str) else set(held)

    def _link(self, dev: Device) -> None:
        for node in dev.devnodes:
            held = self.by_node.get(node)
            if held is None:
                self.by_node[node] = dev.sys_path
            elif isinstance(held, str):
                if held != dev.sys_path:
                    self.by_node[node] = {held, dev.sys_path}
            else:
                held.add(dev.sys_path)

    def _unlink(self, dev: Device) -> None:
        for node in dev.devnodes:
            held = self.by_node.get(node)
            if isinstance(held, str):
                if held == dev.sys_path:
                    del self.by_node[node]
            elif held is not None:
                held.discard(dev.sys_path)
                if len(held) == 1:
                    self.by_node[node] = next(iter(held))

    def update(self, at: Mapping[str, Optional[Device]]) -> None:
        for sys_path, dev in at.items():
            old = self.by_path.pop(sys_path, None)
            if old is not None:
                self._unlink(old)
            if dev is not None:
                self.by_path[sys_path] = dev
                self._link(dev)


class Inventory:
    def __init__(self, sink: events.Sink) -> None:
        self.sink = sink
        self.states: Dict[str, ResourceState] = {}
        self.raw: Dict[str, Mapping[str, Device]] = {}
        self.index: Dict[str, _Index] = {}
        self._sick: Dict[str, int] = {}  # resource -> how many of its published devices are unhealthy
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
        self.index.pop(name, None)
        self._sick.pop(name, None)
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
        result = discovery.scan(context, resources, previous=self.raw)
        scanned = {r.name for r in resources}
        problems = {p for p in self.problems if p.split(":", 1)[0] not in scanned}
        problems |= set(result.problems)
        self._note_problems(problems - self.problems)
        self.problems = problems
        out = {}
        for res in resources:
            devices = result.snapshot[res.name]
            if devices is not self.raw.get(res.name) or res.name not in self.index:
                self.raw[res.name] = devices
                self.index[res.name] = _Index(devices)
            change = self.publish(res.name)
            if change:
                out[res.name] = change
        return out

    def refresh(self, context: Any, name: str, changes: Mapping[str, str]) -> Optional[ResourceDiff]:
        """Look again at only the devices an event touched (a full scan when only that can tell)."""
        res = self.states[name].config
        index = self.index.get(name)
        before = self.raw.get(name, {})
        result = discovery.refresh(context, res, before, changes,
                                   by_path=index.by_path if index is not None else None)
        if result is None:
            return self.scan(context, [name]).get(name)
        # The IDs that may differ: those of the devices at the event's paths, before and now.
        by_path = index.by_path if index is not None else {d.sys_path: d for d in before.values()}
        touched = {d.id for p, now in result.at.items() for d in (by_path.get(p), now) if d is not None}
        self.raw[name] = result.devices
        if index is None:
            self.index[name] = _Index(result.devices)
        else:
            index.update(result.at)
        self._note_problems(set(result.problems) - self.problems)
        self.problems |= set(result.problems)
        return self.publish(name, (before, touched))

    def _note_problems(self, new: Set[str]) -> None:
        for problem in sorted(new):
            log.warning("%s", problem)

    def at_nodes(self, name: str, nodes: AbstractSet[str]) -> Set[str]:
        """The sys_paths of the devices of ``name`` that have one of ``nodes``."""
        index = self.index.get(name)
        if index is None:
            return set()
        return {p for node in nodes for p in index.paths_at(node)}

    def paths(self, name: str) -> AbstractSet[str]:
        """The sys_paths of the devices of ``name`` (a live view)."""
        index = self.index.get(name)
        return index.by_path.keys() if index is not None else frozenset()

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

    def effective(self, name: str) -> Mapping[str, Device]:
        """Rule health from the scan, overlaid with the damped health_command result.

        The scan's own mapping when no command or stuck check overrides a device (the usual case),
        else a copy with only the overridden devices replaced: the cost follows the unhealthy
        devices, not all of them.
        """
        raw = self.raw.get(name, {})
        overrides: Dict[str, str] = {}
        for key, reason in self.command_health.failing():
            if key[0] == name:  # type: ignore[index]
                overrides[key[1]] = reason  # type: ignore[index]
        for (res, dev_id), reason in self.stuck.items():
            if res == name:
                overrides[dev_id] = reason  # a stuck check wins over the last result
        if not overrides:
            return raw
        out = dict(raw)
        for dev_id, reason in overrides.items():
            dev = raw.get(dev_id)
            if dev is not None and dev.healthy:
                out[dev_id] = dev.replace(health=UNHEALTHY, reason=reason)
        return out

    def publish(self, name: str, touched: Optional[Tuple[Mapping[str, Device], AbstractSet[str]]] = None
                ) -> Optional[ResourceDiff]:
        """Publish the effective devices of ``name``; emit the events of what changed.

        ``touched``: (the scan's devices before, the IDs a refresh looked at).  Where the published
        devices were those very devices and still are the scan's (no health_command overrides a
        device), only those IDs can differ: the diff costs them, not the resource's size.
        """
        state = self.states.get(name)
        if state is None:
            return None
        old = state.current()[1]
        new = self.effective(name)
        if touched is not None and old is touched[0] and new is self.raw.get(name):
            found = diff_of(old, new, touched[1])
            change: Optional[ResourceDiff] = found if found else None
            known = True
        else:
            change, known = diff({name: old}, {name: new}).get(name), False
        if not state.publish(new, change, known=known) or change is None:
            return None
        sick = self._sick.get(name, 0)
        sick += sum(1 for d in change.added if not d.healthy) - sum(1 for d in change.removed if not d.healthy)
        sick += sum(int(b.healthy) - int(a.healthy) for b, a in change.changed)
        self._sick[name] = sick
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

    def counts(self) -> Tuple[int, int]:
        """How many devices every resource publishes, and how many of them are unhealthy."""
        return sum(len(s.current()[1]) for s in self.states.values()), sum(self._sick.values())
