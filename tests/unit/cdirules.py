"""CDI spec 0.5.0 as its consumers check it, written here from the specification (cncf-tags/
container-device-interface at v0.5.x: SPEC.md, schema/schema.json and defs.json, the Go types in
specs-go/config.go that a strict YAML/JSON decoder fills, pkg/cdi's name and edit validation), for the
tests to judge the specs the daemon writes.  Independent of udev_device_plugin.cdi on purpose: the same
rules written twice, once for each side.  The real consumer, podman 4.3, reads them in tests/cdi."""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List

VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0")  # what a v0.5.x parser accepts
_VENDOR = re.compile(r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_CLASS = re.compile(r"^[A-Za-z]([A-Za-z0-9_-]*[A-Za-z0-9])?$")
_DEVICE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")
# The fields of the Go types; a strict decoder refuses any other.
SPEC_FIELDS = {"cdiVersion": str, "kind": str, "devices": list, "containerEdits": dict}
DEVICE_FIELDS = {"name": str, "containerEdits": dict}
EDIT_FIELDS = {"env": list, "deviceNodes": list, "hooks": list, "mounts": list}
NODE_FIELDS = {"path": str, "hostPath": str, "type": str, "major": int, "minor": int, "fileMode": int,
               "permissions": str, "uid": int, "gid": int}
MOUNT_FIELDS = {"hostPath": str, "containerPath": str, "options": list, "type": str}


def _fields(where: str, obj: Any, allowed: Dict[str, type], required: List[str], problems: List[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: not an object")
        return False
    for key, value in obj.items():
        if key not in allowed:
            problems.append(f"{where}: unknown field {key!r}")
        elif not isinstance(value, allowed[key]) or isinstance(value, bool):
            problems.append(f"{where}.{key}: not a {allowed[key].__name__}")
    for key in required:
        if key not in obj:
            problems.append(f"{where}: {key} is required")
    return True


def _edits(where: str, edits: Any, problems: List[str], device: bool) -> None:
    if not _fields(where, edits, EDIT_FIELDS, [], problems):
        return
    if device and not any(edits.get(k) for k in EDIT_FIELDS):
        problems.append(f"{where}: a device's edits must not be empty")
    for env in edits.get("env", []):
        if not isinstance(env, str) or env.find("=") <= 0:
            problems.append(f"{where}.env: {env!r} is not NAME=value")
    for i, node in enumerate(edits.get("deviceNodes", [])):
        w = f"{where}.deviceNodes[{i}]"
        if _fields(w, node, NODE_FIELDS, ["path"], problems):
            if not node.get("path"):
                problems.append(f"{w}: empty path")
            if node.get("type", "") not in ("", "b", "c", "u", "p"):
                problems.append(f"{w}: type {node['type']!r}")
            if set(node.get("permissions", "")) - set("rwm"):
                problems.append(f"{w}: permissions {node['permissions']!r}")
    for i, mount in enumerate(edits.get("mounts", [])):
        w = f"{where}.mounts[{i}]"
        if _fields(w, mount, MOUNT_FIELDS, ["hostPath", "containerPath"], problems):
            if not all(isinstance(o, str) for o in mount.get("options", [])):
                problems.append(f"{w}.options: not strings")
    if edits.get("hooks"):
        problems.append(f"{where}: hooks (none expected from us)")


def problems(text: bytes) -> List[str]:
    """Everything a CDI 0.5.0 consumer would refuse in ``text`` (empty: valid)."""
    found: List[str] = []
    try:
        spec = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return [f"not JSON: {exc}"]
    if not _fields("spec", spec, SPEC_FIELDS, ["cdiVersion", "kind", "devices"], found):
        return found
    if spec.get("cdiVersion") not in VERSIONS:
        found.append(f"cdiVersion {spec.get('cdiVersion')!r} is not one of {VERSIONS}")
    vendor, _, klass = str(spec.get("kind", "")).partition("/")
    if not _VENDOR.match(vendor) or len(vendor) > 253:
        found.append(f"kind: vendor {vendor!r}")
    if not _CLASS.match(klass) or len(klass) > 63:
        found.append(f"kind: class {klass!r}")
    if "containerEdits" in spec:
        _edits("spec.containerEdits", spec["containerEdits"], found, device=False)
    devices = spec.get("devices", [])
    if not devices:
        found.append("devices: at least one is required (SPEC.md)")
    seen = set()
    for i, dev in enumerate(devices):
        w = f"devices[{i}]"
        if not _fields(w, dev, DEVICE_FIELDS, ["name", "containerEdits"], found):
            continue
        name = dev.get("name", "")
        if not _DEVICE.match(name):
            found.append(f"{w}: name {name!r}")
        if name in seen:
            found.append(f"{w}: name {name!r} twice")
        seen.add(name)
        _edits(f"{w}.containerEdits", dev.get("containerEdits"), found, device=True)
    return found
