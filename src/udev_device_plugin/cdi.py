"""CDI (Container Device Interface) specs for resources with ``cdi = yes``: names and content, pure.

The target is CDI spec **0.5.0** (cncf-tags/container-device-interface, SPEC.md): the newest
version that Debian 12's podman 4.3, containerd 1.7 (both vendor the CDI package v0.5.x, which
refuses specs of later versions) and every later runtime read, and it has all this needs:
``deviceNodes`` with ``hostPath`` (0.5.0), mounts with ``type`` (0.4.0), ``env``.  No field of a
later version (annotations 0.6.0, intelRdt 0.7.0, netDevices 1.1.0) is written, and no field
of our own: a CDI parser refuses unknown fields.

One spec file per resource, kind ``cdi_kind`` (by default the resource name), holds one CDI device
per advertised ID (sharing.py: every replica too, so ``podman run --device KIND=fuse::3`` works),
named as the ID (:func:`device_name`).  How the config maps onto it:

- a device's nodes, at their ``container_path``, with ``permissions``: the CDI device's own edits;
- ``extra_devnodes``, and ``env`` and ``mounts`` whose templates use no per-allocation variable
  (only ``{resource}``, or none): the spec's own ``containerEdits``, which a runtime applies once
  whenever any device of the spec is requested;
- templates that use ``{ids}``, ``{devnodes}`` or ``{count}`` depend on the whole allocation, which
  a CDI device cannot know: they stay in the Allocate answer only (as do ``annotations``, which
  0.5.0 lacks).  The Allocate answer keeps every env, mount and annotation in every mode; a CDI
  runtime replaces an env variable, mount or device node the spec gives again by name or path.

A device without device nodes gets no CDI device: CDI refuses a device with empty edits.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from .allocation import container_path
from .config import ResourceConfig, Template
from .model import Device

CDI_VERSION = "0.5.0"
# Device names as CDI 0.5.0 takes them (pkg/cdi ValidateDeviceName): letters, digits, '_', '-', '.'
# and ':', starting and ending with a letter or digit.
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?\Z")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.:-]")
SPEC_PREFIX = "udev-device-plugin-"
SPEC_SUFFIX = ".json"


def device_name(advertised_id: str) -> str:
    """The CDI device name of an advertised ID: the ID itself where CDI takes it (loop0, 0000:3b:00.0,
    fuse::3).  An ID with characters CDI refuses (IDs may hold ``@+=,``, or end in ``-``) gets them
    replaced by ``_`` and a digest of the whole ID appended, which keeps the names of distinct IDs
    distinct: ``SN+12`` becomes ``SN_12-<8 hex digits>``."""
    if _DEVICE_NAME.match(advertised_id):
        return advertised_id
    import hashlib  # only with CDI on: hashlib loads OpenSSL's libcrypto (~0.5 MiB)

    digest = hashlib.sha256(advertised_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    safe = _NOT_IN_NAME.sub("_", advertised_id)
    if not safe[:1].isalnum():
        safe = "x" + safe
    return f"{safe}-{digest}"


def spec_file(res: ResourceConfig) -> str:
    """The file name of the resource's spec in cdi_spec_dir (the runtimes read ``*.json``)."""
    return f"{SPEC_PREFIX}{res.socket_stem}{SPEC_SUFFIX}"


def static(template: Template) -> bool:
    """True when ``template`` renders the same for every allocation (it uses ``{resource}`` at most)."""
    return all(part == "resource" for part in template.parts[1::2])


def _common_edits(res: ResourceConfig) -> Dict[str, Any]:
    values = {"resource": res.name}
    edits: Dict[str, Any] = {}
    env = [f"{k}={t.render(values)}" for k, t in res.env if static(t)]
    if env:
        edits["env"] = env
    if res.extra_devnodes:
        edits["deviceNodes"] = [{"path": container_path(res, None, n), "hostPath": n, "permissions": res.permissions}
                                for n in res.extra_devnodes]
    mounts = [{"hostPath": os.path.normpath(m.host_path.render(values)),
               "containerPath": os.path.normpath(m.container_path.render(values)),
               "type": "bind", "options": ["rbind", "ro" if m.read_only else "rw"]}
              for m in res.mounts if static(m.host_path) and static(m.container_path)]
    if mounts:
        edits["mounts"] = mounts
    return edits


class Spec(NamedTuple):
    """A resource's spec: its text (None when it has no CDI device: no file then), the fully
    qualified name of each advertised ID it gives a CDI device, and what it had to leave out."""

    text: Optional[bytes]
    names: Dict[str, str]
    problems: Tuple[str, ...]


class _Entry(NamedTuple):
    """One device's part of the spec, kept while the device's nodes and IDs stay the same."""

    key: Tuple[Any, ...]
    ids: Tuple[str, ...]
    names: Tuple[str, ...]  # CDI device names, one per ID
    qualified: Tuple[str, ...]  # kind=name
    lines: Tuple[str, ...]  # JSON, one CDI device each


class SpecBuilder:
    """Builds one resource's spec, re-encoding only the devices that changed (10,000 replica IDs
    make a spec of about a megabyte)."""

    def __init__(self) -> None:
        self._entries: Dict[str, _Entry] = {}
        self._last: Optional[Tuple[Any, Spec]] = None  # what the last build was of, and its spec

    def build(self, res: ResourceConfig, devices: Mapping[str, Device],
              ids_of: Mapping[str, Tuple[str, ...]]) -> Spec:
        """The spec of ``res`` for its ``devices`` (device ID -> device), advertised as ``ids_of``."""
        import json  # here: only resources with CDI on build specs, and the daemon's start needs no json

        shape = (res.name, res.permissions, res.container_path.text)
        keyed = [(device_id, dev, (shape, res.cdi_kind, dev.id, dev.sys_name, dev.devnodes, ids_of[device_id]))
                 for device_id, dev in devices.items() if ids_of.get(device_id) and dev.devnodes]
        # Nothing the spec says changed (a health change, a scan that found the same): the same spec.
        what = (res, [k for _, _, k in keyed])
        if self._last is not None and self._last[0] == what:
            return self._last[1]
        entries: Dict[str, _Entry] = {}
        lines: List[str] = []
        names: Dict[str, str] = {}
        taken: Dict[str, str] = {}  # CDI name -> advertised ID
        problems: List[str] = []
        for device_id, dev, key in keyed:
            ids = key[-1]
            entry = self._entries.get(device_id)
            if entry is None or entry.key != key:
                nodes = [{"path": container_path(res, dev, n), "hostPath": n, "permissions": res.permissions}
                         for n in dev.devnodes]
                cdi_names = tuple(device_name(i) for i in ids)
                entry = _Entry(key, ids, cdi_names, tuple(f"{res.cdi_kind}={n}" for n in cdi_names),
                               tuple(json.dumps({"name": n, "containerEdits": {"deviceNodes": nodes}})
                                     for n in cdi_names))
            entries[device_id] = entry
            if taken.keys().isdisjoint(entry.names) and len(set(entry.names)) == len(entry.names):
                taken.update(zip(entry.names, entry.ids))  # the common case, at C speed
                names.update(zip(entry.ids, entry.qualified))
                lines.extend(entry.lines)
                continue
            for advertised_id, name, qualified, line in zip(entry.ids, entry.names, entry.qualified, entry.lines):
                if name in taken:
                    problems.append(f"{res.name}: the CDI name {name!r} of {advertised_id!r} is already that of "
                                    f"{taken[name]!r}; {advertised_id!r} is left out of the CDI spec")
                    continue
                taken[name] = advertised_id
                names[advertised_id] = qualified
                lines.append(line)
        self._entries = entries
        if not lines:
            spec = Spec(None, names, tuple(problems))
        else:
            head = json.dumps({"cdiVersion": CDI_VERSION, "kind": res.cdi_kind})[:-1]
            text = head + ', "devices": [\n' + ",\n".join(lines) + "\n]"
            common = _common_edits(res)
            if common:
                text += ', "containerEdits": ' + json.dumps(common)
            spec = Spec((text + "}\n").encode(), names, tuple(problems))
        self._last = (what, spec)
        return spec
