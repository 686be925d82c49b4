"""Selectors and health rules over a plain view of a udev device.

Pure: a :class:`DeviceView` is any object with the attributes below; discovery
wraps pyudev devices in one, tests build them from dicts.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

from .config import ResourceConfig, matches_globs
from .model import quote_id

try:  # Protocol is in typing from 3.8
    from typing import Protocol
except ImportError:  # pragma: no cover
    Protocol = object  # type: ignore[assignment,misc]

# Device IDs travel through the kubelet's checkpoint and pod status: keep them printable.
_VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+=,-]{0,127}\Z")


class DeviceView(Protocol):
    """What matching reads of a device (read-only: sysfs.SysDevice reads each when asked)."""

    @property
    def sys_path(self) -> str: ...

    @property
    def sys_name(self) -> str: ...

    @property
    def subsystem(self) -> str: ...

    @property
    def devtype(self) -> Optional[str]: ...

    @property
    def driver(self) -> Optional[str]: ...

    @property
    def devnode(self) -> Optional[str]: ...

    @property
    def properties(self) -> Mapping[str, str]: ...

    def attribute(self, name: str) -> Optional[str]:
        """The sysfs attribute's value as text, stripped, or None when absent or unreadable."""


def matches(res: ResourceConfig, dev: DeviceView) -> bool:
    """True if ``dev`` satisfies every selector of ``res`` (they are ANDed)."""
    if dev.subsystem != res.subsystem:
        return False
    if res.kernel and not matches_globs(dev.sys_name, res.kernel):
        return False
    if res.devtype and not matches_globs(dev.devtype, res.devtype):
        return False
    if res.driver and not matches_globs(dev.driver, res.driver):
        return False
    for name, globs in res.properties:
        if not matches_globs(dev.properties.get(name), globs):
            return False
    for name, globs in res.attributes:
        if not matches_globs(dev.attribute(name), globs):
            return False
    return True


def device_id(res: ResourceConfig, dev: DeviceView) -> Tuple[Optional[str], str]:
    """The device's ID per ``res.id`` and, when there is none, why."""
    if res.id == "sys_name":
        value: Optional[str] = dev.sys_name
    elif res.id == "devnode":
        value = dev.devnode[len("/dev/"):].replace("/", "-") if dev.devnode else None
    elif res.id.startswith("property."):
        value = dev.properties.get(res.id[len("property."):])
    else:
        value = dev.attribute(res.id[len("attribute."):])
    if not value:
        return None, f"{res.id} is not set"
    if not _VALID_ID.match(value):
        return None, f"{res.id} value {quote_id(value)} is not a usable ID (letters, digits and _.:@+=,- up to 128)"
    return value, ""


def rule_health(res: ResourceConfig, dev: DeviceView) -> Tuple[bool, str]:
    """Health by the resource's attribute and property rules: (healthy, reason if not)."""
    for name, globs in res.health_attributes:
        value = dev.attribute(name)
        if not matches_globs(value, globs):
            return False, f"attribute {name} is {_shown(value)}, expected {' '.join(globs)}"
    for name, globs in res.health_properties:
        value = dev.properties.get(name)
        if not matches_globs(value, globs):
            return False, f"property {name} is {_shown(value)}, expected {' '.join(globs)}"
    return True, ""


def _shown(value: Optional[str]) -> str:
    # A sysfs attribute may hold 4 KiB: reasons travel into logs, events and refusals, bounded.
    return "None" if value is None else quote_id(value)
