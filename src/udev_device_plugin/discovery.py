"""pyudev enumeration -> Snapshot.  The only module besides hotplug that touches pyudev."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


def scan_resource(context, res: ResourceConfig,  # type: ignore[no-untyped-def]
                  exists: Callable[[str], bool] = os.path.exists) -> Tuple[Dict[str, Device], List[str]]:
    """Every device of one resource, keyed by ID, with rule-based health; and the problems met."""
    problems: List[str] = []
    found: Dict[str, Tuple[Device, str]] = {}
    missing_extra = [n for n in res.extra_devnodes if not exists(n)]
    for udev in context.list_devices(subsystem=res.subsystem):
        view = UdevView(udev)
        try:
            if not matches(res, view):
                continue
            dev_id, why = device_id(res, view)
            if dev_id is None:
                problems.append(f"{res.name}: {view.sys_path} skipped: {why}")
                continue
            nodes = ([view.devnode] if view.devnode else []) + child_devnodes(context, udev)
            healthy, reason = rule_health(res, view)
            gone = [n for n in nodes if not exists(n)]
            if gone:
                healthy, reason = False, f"device node {gone[0]} is missing"
            elif missing_extra:
                healthy, reason = False, f"extra device node {missing_extra[0]} is missing"
            device = Device(res.name, dev_id, view.sys_path, view.sys_name, tuple(nodes), numa_nodes(udev),
                            HEALTHY if healthy else UNHEALTHY, reason)
        except (OSError, LookupError, ValueError) as exc:
            # A device that vanishes mid-scan: its remove event will follow.
            log.debug("%s: %s vanished during the scan: %s", res.name, view.sys_path, exc)
            continue
        if dev_id in found:
            other = found[dev_id][0].sys_path
            keep, drop = sorted((other, view.sys_path))
            problems.append(f"{res.name}: ID {dev_id!r} of {drop} collides with {keep}; only {keep} is advertised")
            if keep == other:
                continue
        found[dev_id] = (device, view.sys_path)
    ordered = {k: found[k][0] for k in sorted(found, key=natural_key)}
    return ordered, problems


def scan(context, resources: Iterable[ResourceConfig],  # type: ignore[no-untyped-def]
         exists: Callable[[str], bool] = os.path.exists) -> ScanResult:
    snapshot: Dict[str, Mapping[str, Device]] = {}
    problems: List[str] = []
    for res in resources:
        snapshot[res.name], found = scan_resource(context, res, exists)
        problems.extend(found)
    return ScanResult(snapshot, tuple(problems))


def affected(resources: Sequence[ResourceConfig], snapshot: Snapshot, subsystem: Optional[str],
             sys_path: str) -> List[str]:
    """Names of the resources a udev event on (subsystem, sys_path) can change.

    Those of the event's subsystem, and those with a device at or above the
    event's device in sysfs (its child nodes count as the device's nodes).
    """
    names = []
    for res in resources:
        if res.subsystem == subsystem:
            names.append(res.name)
            continue
        for dev in snapshot.get(res.name, {}).values():
            if sys_path == dev.sys_path or sys_path.startswith(dev.sys_path + "/"):
                names.append(res.name)
                break
    return names
