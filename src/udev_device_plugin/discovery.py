"""pyudev enumeration -> Snapshot.  The only module besides hotplug that touches pyudev."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pyudev

from .config import ResourceConfig
from .matching import device_id, matches, rule_health
from .model import HEALTHY, UNHEALTHY, Device, Snapshot, natural_key

log = logging.getLogger(__name__)


class UdevView:
    """A pyudev Device seen through the :class:`matching.DeviceView` protocol."""

    __slots__ = ("device", "sys_path", "sys_name", "subsystem", "devtype", "driver", "devnode", "properties")

    def __init__(self, device) -> None:  # type: ignore[no-untyped-def]
        self.device = device
        self.sys_path: str = device.sys_path
        self.sys_name: str = device.sys_name
        self.subsystem: str = device.subsystem or ""
        self.devtype: Optional[str] = device.device_type
        self.driver: Optional[str] = device.driver
        self.devnode: Optional[str] = device.device_node
        self.properties: Mapping[str, str] = device.properties

    def attribute(self, name: str) -> Optional[str]:
        try:
            value = self.device.attributes.asstring(name)
        except (KeyError, OSError, ValueError, UnicodeDecodeError):
            return None
        return value.strip() if value is not None else None


@dataclass(frozen=True)
class ScanResult:
    snapshot: Snapshot
    problems: Tuple[str, ...]


def numa_nodes(device) -> Tuple[int, ...]:  # type: ignore[no-untyped-def]
    """NUMA node of the device or its nearest parent that has one (>= 0)."""
    dev = device
    while dev is not None:
        try:
            raw = dev.attributes.asstring("numa_node")
        except (KeyError, OSError, ValueError, UnicodeDecodeError):
            raw = None
        if raw is not None:
            try:
                node = int(raw.strip())
            except ValueError:
                node = -1
            if node >= 0:
                return (node,)
        dev = dev.parent
    return ()


def child_devnodes(context, device) -> List[str]:  # type: ignore[no-untyped-def]
    """Device nodes of the device's descendants (a PCI card's /dev/accel/accel0), sorted."""
    nodes = []
    for child in context.list_devices().match_parent(device):
        node = child.device_node
        if node and child.sys_path != device.sys_path:
            nodes.append(node)
    return sorted(nodes, key=natural_key)


def evaluate(context, res: ResourceConfig, udev,  # type: ignore[no-untyped-def]
             exists: Callable[[str], bool] = os.path.exists) -> Tuple[Optional[Device], str]:
    """One udev device seen as a device of ``res``: (Device, "") if it matches, else (None, why or "")."""
    view = UdevView(udev)
    if not matches(res, view):
        return None, ""
    dev_id, why = device_id(res, view)
    if dev_id is None:
        return None, f"{res.name}: {view.sys_path} skipped: {why}"
    nodes = ([view.devnode] if view.devnode else []) + child_devnodes(context, udev)
    healthy, reason = rule_health(res, view)
    gone = [n for n in nodes if not exists(n)]
    missing_extra = [n for n in res.extra_devnodes if not exists(n)]
    if gone:
        healthy, reason = False, f"device node {gone[0]} is missing"
    elif missing_extra:
        healthy, reason = False, f"extra device node {missing_extra[0]} is missing"
    return Device(res.name, dev_id, view.sys_path, view.sys_name, tuple(nodes), numa_nodes(udev),
                  HEALTHY if healthy else UNHEALTHY, reason), ""


def _evaluate_safely(context, res: ResourceConfig, udev,  # type: ignore[no-untyped-def]
                     exists: Callable[[str], bool]) -> Tuple[Optional[Device], str]:
    try:
        return evaluate(context, res, udev, exists)
    except (OSError, LookupError, ValueError, pyudev.DeviceNotFoundError) as exc:
        # A device that vanishes mid-scan: its remove event will follow.
        log.debug("%s: %s vanished during the scan: %s", res.name, udev.sys_path, exc)
        return None, ""


def _ordered(found: Mapping[str, Device]) -> Dict[str, Device]:
    return {k: found[k] for k in sorted(found, key=natural_key)}


def scan_resource(context, res: ResourceConfig,  # type: ignore[no-untyped-def]
                  exists: Callable[[str], bool] = os.path.exists) -> Tuple[Dict[str, Device], List[str]]:
    """Every device of one resource, keyed by ID, with rule-based health; and the problems met."""
    problems: List[str] = []
    found: Dict[str, Device] = {}
    for udev in context.list_devices(subsystem=res.subsystem):
        device, problem = _evaluate_safely(context, res, udev, exists)
        if problem:
            problems.append(problem)
        if device is None:
            continue
        if device.id in found:
            other = found[device.id].sys_path
            keep, drop = sorted((other, device.sys_path))
            problems.append(f"{res.name}: ID {device.id!r} of {drop} collides with {keep}; only {keep} is advertised")
            if keep == other:
                continue
        found[device.id] = device
    return _ordered(found), problems


def refresh(context, res: ResourceConfig, current: Mapping[str, Device],  # type: ignore[no-untyped-def]
            changes: Mapping[str, str], exists: Callable[[str], bool] = os.path.exists
            ) -> Optional[Tuple[Dict[str, Device], List[str]]]:
    """``current`` with only the devices at ``changes`` (sys_path -> udev action) looked at again.

    What keeps an event's cost independent of the resource's size.  None when only a full
    scan can tell (two devices claiming one ID): the caller then scans the resource.
    """
    by_path = {d.sys_path: d for d in current.values()}
    found = dict(current)
    problems: List[str] = []
    for sys_path, action in changes.items():
        old = by_path.get(sys_path)
        if old is not None:
            del found[old.id]
        if action == "remove":
            continue
        try:
            udev = pyudev.Devices.from_sys_path(context, sys_path)
        except (pyudev.DeviceNotFoundError, OSError, ValueError):
            continue  # gone already; its remove event follows
        device, problem = _evaluate_safely(context, res, udev, exists)
        if problem:
            problems.append(problem)
        if device is None:
            continue
        if device.id in found and found[device.id].sys_path != sys_path:
            return None
        found[device.id] = device
    return _ordered(found), problems


def scan(context, resources: Iterable[ResourceConfig],  # type: ignore[no-untyped-def]
         exists: Callable[[str], bool] = os.path.exists) -> ScanResult:
    snapshot: Dict[str, Mapping[str, Device]] = {}
    problems: List[str] = []
    for res in resources:
        snapshot[res.name], found = scan_resource(context, res, exists)
        problems.extend(found)
    return ScanResult(snapshot, tuple(problems))


def touched(resources: Sequence[ResourceConfig], snapshot: Snapshot, subsystem: Optional[str],
            sys_path: str) -> Dict[str, List[str]]:
    """Per resource, the devices a udev event on (subsystem, sys_path) asks to look at again.

    The event's own device, for resources of its subsystem; and any device of ours above
    it in sysfs, whose child nodes count as its own.
    """
    out: Dict[str, List[str]] = {}
    for res in resources:
        paths = [sys_path] if res.subsystem == subsystem else []
        paths.extend(dev.sys_path for dev in snapshot.get(res.name, {}).values()
                     if sys_path.startswith(dev.sys_path + "/"))
        if paths:
            out[res.name] = paths
    return out
