"""Parse and validate the INI configuration.

Pure: no udev, no gRPC, no filesystem access except in :func:`load`, which reads
the main file and the ``conf.d/*.conf`` drop-ins beside it, refuses files others than
root could have written (``strict_permissions``), and hands their text to :func:`parse`.
Every problem is collected, so an admin sees all of them at once; each message names
the file, the ``[section]``, the key, the bad value and what is accepted.
"""

from __future__ import annotations

import configparser
import fnmatch
import grp
import os
import pwd
import re
import shlex
import stat
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from . import metrics

DEFAULT_CONFIG = "/etc/udev-device-plugin/udev-device-plugin.conf"
DROPIN_DIR_NAME = "conf.d"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
PLUGINS_REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
# How a resource registers: Register on kubelet.sock, a socket the kubelet's plugin watcher finds
# in plugins_registry, or the watcher first with kubelet.sock as the fallback.
REGISTRATIONS = ("kubelet-socket", "plugin-watcher", "both")
KUBELET_SOCKET = "kubelet.sock"
# The kubelet gives PreStartContainer 30 s; leave room for the reply.
KUBELET_PRESTART_TIMEOUT = 30.0

# Where a drop-in that is a symlink may point while strict_permissions is on.
TRUSTED_SYMLINK_ROOT = "/etc"

LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_SINKS = ("auto", "journal", "stderr")
ID_SOURCES = ("sys_name", "devnode", "property.<NAME>", "attribute.<name>")

# Sharing: each device advertised as this many IDs at most.  256 is above the most pods a node
# runs (the kubelet's max-pods default is 110; OpenShift's default is 250), so one device can go
# to every pod; and 100 devices x 256 replicas of the longest IDs (~160 bytes per ListAndWatch
# entry) stay within the 4 MiB the kubelet's gRPC client accepts per message (sharing.py
# enforces that limit at run time too: devices come and go).
MAX_REPLICAS = 256
REPLICA_POLICIES = ("spread", "pack")
# Where CDI spec files go by default: the runtime directory every CDI consumer reads
# (containerd, CRI-O, podman; /etc/cdi is the other, for specs an admin installs).
CDI_SPEC_DIR = "/var/run/cdi"

# Variables a template may use.  Per device node (container_path) and per
# allocation (mounts, env, annotations).
DEVNODE_VARS = ("devnode", "name", "id", "sys_name", "resource")
ALLOCATION_VARS = ("ids", "devnodes", "count", "resource")

_TEMPLATE_VAR = re.compile(r"\{([^{}]*)\}")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*\Z")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UDEV_PROPERTY = re.compile(r"^[A-Za-z0-9_.]+$")
_SYSFS_ATTRIBUTE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SUBSYSTEM = re.compile(r"^[A-Za-z0-9_.:-]+$")
# Unicode's categories Cc (exactly U+0000-U+001F and U+007F-U+009F, a set the standard keeps
# stable), Zl (U+2028) and Zp (U+2029), tab and newline aside: no unicodedata (its table is
# 200 KiB of the daemon's memory) and one search instead of a loop.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}
# child_devnodes = all, stored as the one glob that matches every subsystem.
ALL_CHILDREN = ("*",)


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` lists every problem found."""

    def __init__(self, messages: List[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = list(messages)


class Template:
    """A string with ``{var}`` placeholders, checked against allowed names at parse time.  Immutable;
    equal, hashed and shown by its text."""

    __slots__ = ("text", "parts")
    text: str
    parts: Tuple[str, ...]

    def __init__(self, text: str) -> None:
        object.__setattr__(self, "text", text)
        # The text split once into literal and variable parts (odd indexes are variable names):
        # rendering is on Allocate's path.
        object.__setattr__(self, "parts", tuple(_TEMPLATE_VAR.split(text)))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Template is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Template is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        return other.text == self.text if isinstance(other, Template) else NotImplemented

    def __hash__(self) -> int:
        return hash((Template, self.text))

    def __repr__(self) -> str:
        return f"Template(text={self.text!r})"

    def __reduce__(self) -> Tuple[type, Tuple[str]]:
        return (Template, (self.text,))

    def render(self, values: Mapping[str, str]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        return "".join(values[p] if i % 2 else p for i, p in enumerate(parts))


# The configuration's values are NamedTuples: immutable, compared and hashed field by field, like the
# frozen dataclasses they were, at a fifth of their cost to define (importing the daemon: 9 -> 2 ms).
class Mount(NamedTuple):
    host_path: Template
    container_path: Template
    read_only: bool


class ResourceConfig(NamedTuple):
    """One ``[resource <name>]`` section."""

    name: str
    source: str
    subsystem: str
    kernel: Tuple[str, ...] = ()
    devtype: Tuple[str, ...] = ()
    driver: Tuple[str, ...] = ()
    properties: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    attributes: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    extra_devnodes: Tuple[str, ...] = ()
    id: str = "sys_name"
    permissions: str = "rw"
    container_path: Template = Template("{devnode}")
    mounts: Tuple[Mount, ...] = ()
    env: Tuple[Tuple[str, Template], ...] = ()
    annotations: Tuple[Tuple[str, Template], ...] = ()
    prestart_command: Tuple[str, ...] = ()
    prestart_timeout: float = 20.0
    health_attributes: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    health_properties: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    health_command: Tuple[str, ...] = ()
    health_interval: float = 30.0
    health_timeout: float = 10.0
    health_threshold: int = 1
    # Subsystems of the descendants whose device nodes are granted with the device
    # (ALL_CHILDREN: every one; (): none, the default).
    child_devnodes: Tuple[str, ...] = ()
    vfio_group_devnode: bool = False
    # Each device advertised as ``replicas`` IDs (sharing.py), chosen by ``replica_policy``.
    replicas: int = 1
    replica_policy: str = "spread"
    # CDI (cdi.py): a spec file in [plugin] cdi_spec_dir; cdi_kind is resolved at parse time
    # ("" while cdi is off).
    cdi: bool = False
    cdi_kind: str = ""
    cdi_only: bool = False

    def grants_child(self, subsystem: Optional[str]) -> bool:
        """True if a descendant of this subsystem gives its device node with the device."""
        return self.child_devnodes == ALL_CHILDREN or (subsystem is not None and subsystem in self.child_devnodes)

    @property
    def socket_stem(self) -> str:
        """File-name-safe form of the resource name, for its socket."""
        return self.name.replace("/", "_")


class PluginConfig(NamedTuple):
    kubelet_dir: str = KUBELET_DIR
    log_level: str = "info"
    events: str = "auto"
    register_timeout: float = 5.0
    register_backoff_max: float = 10.0
    kubelet_keepalive: float = 30.0
    ready_timeout: float = 15.0
    health_workers: int = 8
    strict_permissions: bool = True
    registration: str = "kubelet-socket"
    plugins_registry_dir: str = PLUGINS_REGISTRY_DIR
    cdi_spec_dir: str = CDI_SPEC_DIR
    metrics_address: Optional[metrics.MetricsAddress] = None
    metrics_allow_remote: bool = False


class Config(NamedTuple):
    plugin: PluginConfig = PluginConfig()
    resources: Tuple[ResourceConfig, ...] = ()
    sources: Tuple[str, ...] = ()

    def resource(self, name: str) -> ResourceConfig:
        for res in self.resources:
            if res.name == name:
                return res
        raise KeyError(name)


# --- The table of keys: name -> (default shown in docs, description) ---------

PLUGIN_KEYS: Dict[str, Tuple[str, str]] = {
    "kubelet_dir": (KUBELET_DIR, "directory of the kubelet's device plugin sockets"),
    "log_level": ("info", "one of " + ", ".join(LOG_LEVELS)),
    "events": ("auto", "where device events go: journal, stderr, or auto (journal if running)"),
    "register_timeout": ("5", "seconds to wait for the kubelet to answer Register"),
    "register_backoff_max": ("10", "longest wait, in seconds, between failed Register attempts"),
    "kubelet_keepalive": ("30", "seconds between the checks, while a resource is registered, that the kubelet "
                          "answers on kubelet.sock (noticing one that hangs without closing anything), 1-3600"),
    "ready_timeout": ("15", "seconds systemd's READY=1 waits for the kubelet to accept every registration"),
    "health_workers": ("8", "how many health_command runs at once, 1-1024"),
    "strict_permissions": ("yes", "refuse config files and directories others than root may write (main file only)"),
    "registration": ("kubelet-socket", "how resources register: kubelet-socket (Register on kubelet.sock), "
                     "plugin-watcher (a socket in plugins_registry_dir), or both (the watcher, then kubelet.sock)"),
    "plugins_registry_dir": (PLUGINS_REGISTRY_DIR, "directory the kubelet's plugin watcher watches"),
    "cdi_spec_dir": (CDI_SPEC_DIR, "directory where resources with cdi = yes get their CDI spec files"),
    "metrics_address": ("off", "serve Prometheus metrics at http://IP:PORT/metrics: 127.0.0.1:PORT or [::1]:PORT"),
    "metrics_allow_remote": ("no", "yes: metrics_address may be an address other than loopback"),
}

RESOURCE_KEYS: Dict[str, Tuple[str, str]] = {
    "subsystem": ("(required)", "udev subsystem of the devices, e.g. mem, block, pci, misc"),
    "kernel": ("(any)", "space-separated globs on the kernel name (sys_name)"),
    "devtype": ("(any)", "space-separated globs on the udev DEVTYPE"),
    "driver": ("(any)", "space-separated globs on the bound driver"),
    "property.<NAME>": ("(none)", "space-separated globs on a udev property"),
    "attribute.<name>": ("(none)", "space-separated globs on a sysfs attribute"),
    "child_devnodes": ("none", "whose descendants' device nodes come with a device: all, none or subsystem names"),
    "vfio_group_devnode": ("no", "yes: each device's VFIO group node /dev/vfio/<iommu_group> comes with it"),
    "extra_devnodes": ("(none)", "device nodes given with every allocation"),
    "id": ("sys_name", "device ID: sys_name, devnode, property.<NAME> or attribute.<name>"),
    "permissions": ("rw", "cgroup device permissions, a subset of rwm"),
    "container_path": ("{devnode}", "path of each node in the container; {devnode} {name} {id} {sys_name} {resource}"),
    "mounts": ("(none)", "lines of host_path:container_path[:ro|:rw]; {ids} {devnodes} {count} {resource}"),
    "env": ("(none)", "lines of NAME=value; {ids} {devnodes} {count} {resource}"),
    "annotations": ("(none)", "lines of key=value; {ids} {devnodes} {count} {resource}"),
    "prestart_command": ("(none)", "command run before each container start, with the device IDs as arguments"),
    "prestart_timeout": ("20", "seconds before prestart_command is killed (under the kubelet's 30)"),
    "health.attribute.<name>": ("(none)", "healthy only while this sysfs attribute matches these globs"),
    "health.property.<NAME>": ("(none)", "healthy only while this udev property matches these globs"),
    "health_command": ("(none)", "command run per device; exit 0 is healthy"),
    "health_interval": ("30", "seconds between health_command runs"),
    "health_timeout": ("10", "seconds before a health_command run counts as unhealthy; below health_interval"),
    "health_threshold": ("1", "consecutive equal results before health changes"),
    "replicas": ("1", f"IDs advertised per device, 1-{MAX_REPLICAS}: how many containers may share each device"),
    "replica_policy": ("spread", "preferred allocations: spread over distinct devices first, or pack onto few"),
    "cdi": ("no", "yes: write a CDI spec file for the resource and answer Allocate with its CDI devices"),
    "cdi_kind": ("(the resource name)", "CDI kind vendor.example/class of the spec; with cdi = yes"),
    "cdi_only": ("no", "yes: Allocate gives only the CDI devices, no device nodes; with cdi = yes"),
}


def validate_resource_name(name: str) -> Optional[str]:
    """Return why the kubelet would refuse ``name`` as an extended resource, or None.

    Mirrors v1helper.IsExtendedResourceName: contains ``/``, not in the
    ``kubernetes.io`` namespaces, and ``requests.<name>`` is a qualified name.
    """
    if "/" not in name:
        return "must contain '/', as in example.com/fpga"
    if "kubernetes.io/" in name:
        return "the kubernetes.io namespaces are reserved"
    if name.startswith("requests."):
        return "must not start with 'requests.'"
    parts = ("requests." + name).split("/")
    if len(parts) != 2:
        return "must have exactly one '/'"
    prefix, short = parts
    if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
        return "the prefix must be a lowercase DNS subdomain, as in example.com"
    if not short or len(short) > 63 or not _QUALIFIED_NAME.match(short):
        return "the part after '/' must be 1-63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"
    return None


# CDI names as the CDI parser of spec version 0.5.0 takes them (container-device-interface
# v0.5.x, pkg/cdi/qualified-device.go: what podman 4.3 and containerd 1.7 run): a vendor starts
# with a letter, a class has no dots (dots came with 0.6.0), both end with a letter or digit.
# The spec's text also limits the vendor (a DNS subdomain) to 253 and the class to 63 characters.
_CDI_VENDOR = re.compile(rf"^[a-z]([-a-z0-9]*[a-z0-9])?(\.{_DNS1123_LABEL})*\Z")
_CDI_CLASS = re.compile(r"^[A-Za-z]([A-Za-z0-9_-]*[A-Za-z0-9])?\Z")


def validate_cdi_kind(kind: str) -> Optional[str]:
    """Return why ``kind`` is not a CDI kind (``vendor.example/class``) of spec 0.5.0, or None."""
    vendor, sep, klass = kind.partition("/")
    if not sep or not vendor or not klass:
        return "must be vendor/class, as in example.com/fpga"
    if "/" in klass:
        return "must have exactly one '/'"
    if len(vendor) > 253 or not _CDI_VENDOR.match(vendor):
        return "the vendor must be a lowercase DNS subdomain starting with a letter, as in example.com"
    if len(klass) > 63 or not _CDI_CLASS.match(klass):
        return ("the class must be 1-63 letters, digits, '-' and '_', starting with a letter and ending with "
                "a letter or digit (no '.': CDI specs before 0.6.0 refuse it)")
    return None


class _Collector:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: List[str] = []

    def error(self, section: str, key: Optional[str], value: Optional[str], problem: str) -> None:
        where = f"{self.source}: [{_shown(section)}]"
        if key is not None:
            where += f" {_shown(key)}"
            if value is not None:
                where += f" = {value!r}"
        self.errors.append(f"{where}: {problem}")


def _control(text: str) -> Optional[int]:
    """Index of the first control character in ``text`` (tab and newline aside), or None.

    C0 and C1 controls (NUL, ESC, DEL, NEL ...) and the Unicode line and paragraph separators:
    a NUL in a path or an argument reaches the Allocate answer or fails every exec, and the
    others break lines or terminals where the value is shown.
    """
    found = _CONTROLS.search(text)
    return None if found is None else found.start()


def _shown(text: str) -> str:
    """``text`` for a message: as is when printable, else escaped as repr() escapes it."""
    return text if _control(text) is None else repr(text)[1:-1]


def _globs(c: _Collector, section: str, key: str, value: str) -> Tuple[str, ...]:
    try:
        words = tuple(shlex.split(value))
    except ValueError as exc:
        c.error(section, key, value, f"{exc}; accepted: space-separated globs, quoted where they hold spaces")
        return ()
    if not words:
        c.error(section, key, value, "empty; accepted: one or more space-separated globs")
    if any(w.startswith(("#", ";")) for w in words):
        c.error(section, key, value, "comments must be on their own line; accepted: space-separated globs")
    for w in words:
        try:  # what matching will compile (Python 3.9's fnmatch refuses a range like [z-a] only then)
            re.compile(fnmatch.translate(w))
        except re.error as exc:
            c.error(section, key, value, f"{w!r} is no glob fnmatch can use ({exc}); accepted: shell-style globs")
    return words


def _number(c: _Collector, section: str, key: str, value: str, lo: float, hi: float,
            lo_included: bool = False) -> Optional[float]:
    try:
        num = float(value)
    except ValueError:
        num = float("nan")
    if not ((lo <= num if lo_included else lo < num) and num <= hi):
        accepted = f"from {lo:g} to {hi:g}" if lo_included else f"greater than {lo:g} and at most {hi:g}"
        c.error(section, key, value, f"accepted: a number of seconds {accepted}")
        return None
    return num


def _whole(c: _Collector, section: str, key: str, value: str, lo: int, hi: int) -> Optional[int]:
    # isdigit() alone admits '\u00b2', which int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 6 or not lo <= int(value) <= hi:
        c.error(section, key, value, f"accepted: a whole number from {lo} to {hi}")
        return None
    return int(value)


def _boolean(c: _Collector, section: str, key: str, value: str) -> Optional[bool]:
    flag = _BOOLEANS.get(value.lower())
    if flag is None:
        c.error(section, key, value, "accepted: yes or no (also true/false, on/off, 1/0)")
    return flag


def _command(c: _Collector, section: str, key: str, value: str) -> Tuple[str, ...]:
    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:
        c.error(section, key, value, f"{exc}; accepted: a command line in shell quoting, run without a shell")
        return ()
    if not argv:
        c.error(section, key, value, "empty; accepted: a command line")
    elif not os.path.isabs(argv[0]):
        c.error(section, key, value, "accepted: a command with an absolute path, e.g. /usr/libexec/fpga-check")
    return argv


def _template(c: _Collector, section: str, key: str, value: str, allowed: Tuple[str, ...]) -> Template:
    for m in _TEMPLATE_VAR.finditer(value):
        if m.group(1) not in allowed:
            accepted = " ".join(f"{{{a}}}" for a in allowed)
            c.error(section, key, value, f"unknown variable {{{m.group(1)}}}; accepted: {accepted}")
    stripped = _TEMPLATE_VAR.sub("", value)
    if "{" in stripped or "}" in stripped:
        c.error(section, key, value, "unbalanced brace; accepted: {variable} placeholders")
    return Template(value)


def _abs_path(c: _Collector, section: str, key: str, value: str, path: str, what: str) -> bool:
    if not path.startswith("/") or os.path.normpath(path) != path or "\0" in path:
        c.error(section, key, value, f"{path!r} is not a normalized absolute path; accepted: an absolute {what}")
        return False
    return True


def _lines(value: str) -> List[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _key_values(c: _Collector, section: str, key: str, value: str, valid: Callable[[str], object],
                key_what: str) -> List[Tuple[str, str]]:
    pairs: List[Tuple[str, str]] = []
    seen = set()
    for line in _lines(value):
        name, sep, val = line.partition("=")
        name = name.strip()
        if not sep or not valid(name):
            c.error(section, key, line, f"accepted: lines of {key_what}=value")
            continue
        if name in seen:
            c.error(section, key, line, f"{name} is given twice")
            continue
        seen.add(name)
        pairs.append((name, val.strip()))
    return pairs


def _annotation_key(name: str) -> bool:
    parts = name.split("/")
    if len(parts) == 2:
        return bool(parts[0]) and len(parts[0]) <= 253 and bool(_DNS1123_SUBDOMAIN.match(parts[0])) \
            and len(parts[1]) <= 63 and bool(_QUALIFIED_NAME.match(parts[1]))
    return len(parts) == 1 and len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


# kubelet_keepalive's bounds: each check is one short connection to kubelet.sock.
KEEPALIVE_MIN, KEEPALIVE_MAX = 1.0, 3600.0
# [plugin] keys that are a number of seconds, with their upper bound.
_PLUGIN_SECONDS = {"register_timeout": 60.0, "register_backoff_max": 300.0, "ready_timeout": 3600.0}


def _parse_plugin(c: _Collector, section: str, items: Mapping[str, str], into: Dict[str, object]) -> None:
    for key, value in items.items():
        if key == "kubelet_dir":
            if _abs_path(c, section, key, value, value, "directory"):
                into[key] = value
        elif key == "log_level":
            if value.lower() not in LOG_LEVELS:
                c.error(section, key, value, "accepted: " + ", ".join(LOG_LEVELS))
            else:
                into[key] = value.lower()
        elif key == "events":
            if value not in EVENT_SINKS:
                c.error(section, key, value, "accepted: " + ", ".join(EVENT_SINKS))
            else:
                into[key] = value
        elif key in _PLUGIN_SECONDS:
            num = _number(c, section, key, value, 0, _PLUGIN_SECONDS[key])
            if num is not None:
                into[key] = num
        elif key == "kubelet_keepalive":
            num = _number(c, section, key, value, KEEPALIVE_MIN, KEEPALIVE_MAX, lo_included=True)
            if num is not None:
                into[key] = num
        elif key == "health_workers":
            workers = _whole(c, section, key, value, 1, 1024)
            if workers is not None:
                into[key] = workers
        elif key == "metrics_address":
            metrics.parse_setting(c, section, key, value, into)
        elif key in ("strict_permissions", "metrics_allow_remote"):
            flag = _boolean(c, section, key, value)
            if flag is not None:
                into[key] = flag
        elif key == "registration":
            if value not in REGISTRATIONS:
                c.error(section, key, value, "accepted: " + ", ".join(REGISTRATIONS))
            else:
                into[key] = value
        elif key in ("plugins_registry_dir", "cdi_spec_dir"):
            if _abs_path(c, section, key, value, value, "directory"):
                into[key] = value
        else:
            c.error(section, key, None, "unknown key; accepted: " + ", ".join(PLUGIN_KEYS))


def _printable(c: _Collector, section: str, items: Mapping[str, str]) -> Dict[str, str]:
    """The items whose values hold no control character; an error for each of the others."""
    out = {}
    for key, value in items.items():
        at = _control(value)
        if at is None:
            out[key] = value
        else:
            c.error(section, key, value, f"control character U+{ord(value[at]):04X} at position {at + 1}; "
                    "accepted: printable text (tabs and continuation lines aside)")
    return out


def _parse_resource(c: _Collector, section: str, name: str, raw: Mapping[str, str]) -> Optional[ResourceConfig]:
    before = len(c.errors)
    # A key refused for a control character still counts as given: it is not also "missing".
    given = set(raw)
    items = _printable(c, section, raw)
    problem = validate_resource_name(name)
    if problem:
        c.error(section, None, None, f"resource name {name!r} is not one the kubelet accepts: {problem}")
    kw: Dict[str, object] = {"name": name, "source": c.source}
    props: List[Tuple[str, Tuple[str, ...]]] = []
    attrs: List[Tuple[str, Tuple[str, ...]]] = []
    hprops: List[Tuple[str, Tuple[str, ...]]] = []
    hattrs: List[Tuple[str, Tuple[str, ...]]] = []
    for key, value in items.items():
        if key == "subsystem":
            if not _SUBSYSTEM.match(value):
                c.error(section, key, value, "accepted: one udev subsystem name, e.g. mem, block, pci")
            kw[key] = value
        elif key in ("kernel", "devtype", "driver"):
            kw[key] = _globs(c, section, key, value)
        elif key.startswith(("property.", "health.property.")):
            prop = key.split("property.", 1)[1]
            if not _UDEV_PROPERTY.match(prop):
                c.error(section, key, None, "accepted: property.<NAME> with a udev property name such as ID_VENDOR_ID")
            (hprops if key.startswith("health.") else props).append((prop, _globs(c, section, key, value)))
        elif key.startswith(("attribute.", "health.attribute.")):
            attr = key.split("attribute.", 1)[1]
            if not _SYSFS_ATTRIBUTE.match(attr) or ".." in attr.split("/"):
                c.error(section, key, None, "accepted: attribute.<name> with a sysfs attribute name such as vendor")
            (hattrs if key.startswith("health.") else attrs).append((attr, _globs(c, section, key, value)))
        elif key == "child_devnodes":
            words = value.split()
            if words == ["all"]:
                kw[key] = ALL_CHILDREN
            elif words == ["none"]:
                kw[key] = ()
            elif words and all(_SUBSYSTEM.match(w) and w not in ("all", "none") for w in words):
                kw[key] = tuple(dict.fromkeys(words))
            else:
                c.error(section, key, value, "accepted: all, none, or udev subsystem names separated by spaces, "
                        "e.g. accel drm")
        elif key == "vfio_group_devnode":
            kw[key] = _boolean(c, section, key, value)
        elif key == "extra_devnodes":
            nodes = value.split()
            for node in nodes:
                if _abs_path(c, section, key, value, node, "device node path") and not node.startswith("/dev/"):
                    c.error(section, key, value, f"{node!r} is outside /dev; accepted: device nodes under /dev")
            kw[key] = tuple(nodes)
        elif key == "id":
            if value in ("sys_name", "devnode"):
                kw[key] = value
            elif value.startswith("property.") and _UDEV_PROPERTY.match(value[len("property."):]):
                kw[key] = value
            elif value.startswith("attribute.") and _SYSFS_ATTRIBUTE.match(value[len("attribute."):]) \
                    and ".." not in value[len("attribute."):].split("/"):
                kw[key] = value
            else:
                c.error(section, key, value, "accepted: " + ", ".join(ID_SOURCES))
        elif key == "permissions":
            if not value or set(value) - set("rwm") or len(set(value)) != len(value):
                c.error(section, key, value, "accepted: a combination of r, w and m, e.g. rw or rwm")
            else:
                kw[key] = "".join(p for p in "rwm" if p in value)
        elif key == "container_path":
            kw[key] = _template(c, section, key, value, DEVNODE_VARS)
            # {devnode} is the absolute host path, so the documented default is accepted when written out.
            if not value.startswith(("/", "{devnode}")):
                c.error(section, key, value, "accepted: an absolute path template, e.g. /dev/fpga/{id}")
        elif key == "mounts":
            mounts = []
            for line in _lines(value):
                parts = line.split(":")
                mode = "rw"
                if len(parts) == 3 and parts[2] in ("ro", "rw"):
                    mode = parts.pop()
                if len(parts) != 2 or not parts[0].startswith("/") or not parts[1].startswith("/"):
                    c.error(section, key, line, "accepted: lines of /host/path:/container/path[:ro|:rw]")
                    continue
                mounts.append(Mount(
                    _template(c, section, key, parts[0], ALLOCATION_VARS),
                    _template(c, section, key, parts[1], ALLOCATION_VARS),
                    mode == "ro"))
            kw[key] = tuple(mounts)
        elif key == "env":
            kw[key] = tuple((k, _template(c, section, key, v, ALLOCATION_VARS))
                            for k, v in _key_values(c, section, key, value, _ENV_NAME.match, "NAME"))
        elif key == "annotations":
            kw[key] = tuple((k, _template(c, section, key, v, ALLOCATION_VARS))
                            for k, v in _key_values(c, section, key, value, _annotation_key, "key"))
        elif key in ("prestart_command", "health_command"):
            kw[key] = _command(c, section, key, value)
        elif key == "prestart_timeout":
            kw[key] = _number(c, section, key, value, 0, KUBELET_PRESTART_TIMEOUT - 1)
        elif key == "health_interval":
            kw[key] = _number(c, section, key, value, 0, 86400)
        elif key == "health_timeout":
            kw[key] = _number(c, section, key, value, 0, 3600)
        elif key == "health_threshold":
            kw[key] = _whole(c, section, key, value, 1, 100)
        elif key == "replicas":
            if not (value.isascii() and value.isdigit()) or len(value) > 6 or not 1 <= int(value) <= MAX_REPLICAS:
                c.error(section, key, value, f"accepted: a whole number from 1 (no sharing) to {MAX_REPLICAS} "
                        "(more IDs than a node runs pods; a ListAndWatch message within the kubelet's 4 MiB)")
            else:
                kw[key] = int(value)
        elif key == "replica_policy":
            if value not in REPLICA_POLICIES:
                c.error(section, key, value, "accepted: " + " or ".join(REPLICA_POLICIES))
            kw[key] = value
        elif key in ("cdi", "cdi_only"):
            kw[key] = _boolean(c, section, key, value)
        elif key == "cdi_kind":
            problem = validate_cdi_kind(value)
            if problem:
                c.error(section, key, value, f"not a CDI kind: {problem}")
            kw[key] = value
        else:
            c.error(section, key, None, "unknown key; accepted: " + ", ".join(RESOURCE_KEYS))
    if "subsystem" not in given:
        c.error(section, "subsystem", None, "missing; every resource needs the udev subsystem of its devices")
    if "health_timeout" in given or "health_interval" in given:
        if "health_command" not in given:
            c.error(section, "health_interval" if "health_interval" in given else "health_timeout", None,
                    "only meaningful with health_command")
    if "prestart_timeout" in given and "prestart_command" not in given:
        c.error(section, "prestart_timeout", None, "only meaningful with prestart_command")
    if "replica_policy" in given and "replicas" not in given:
        c.error(section, "replica_policy", None, "only meaningful with replicas")
    _check_cdi(c, section, name, given, kw)
    _check_health_timing(c, section, given, kw)
    if len(c.errors) != before:
        return None
    kw["properties"], kw["attributes"] = tuple(props), tuple(attrs)
    kw["health_properties"], kw["health_attributes"] = tuple(hprops), tuple(hattrs)
    return ResourceConfig(**kw)  # type: ignore[arg-type]


def _check_cdi(c: _Collector, section: str, name: str, given: Set[str], kw: Dict[str, object]) -> None:
    """cdi_kind and cdi_only need cdi = yes; the default kind (the resource name) must be a CDI kind."""
    for key in ("cdi_kind", "cdi_only"):
        if key in given and kw.get("cdi") is not True and kw.get(key) is not None:
            if "cdi" in given and kw.get("cdi") is None:
                continue  # the bad cdi value is reported already
            c.error(section, key, None, "only meaningful with cdi = yes")
    if kw.get("cdi") is not True:
        kw.pop("cdi_kind", None)
        return
    if "cdi_kind" not in given and validate_resource_name(name) is None:
        problem = validate_cdi_kind(name)
        if problem:
            c.error(section, "cdi_kind", None, f"the default, the resource name {name!r}, is not a CDI kind: "
                    f"{problem}; accepted: cdi_kind = vendor.example/class, e.g. example.com/fpga")
        kw["cdi_kind"] = name


def _check_health_timing(c: _Collector, section: str, given: Set[str], kw: Mapping[str, object]) -> None:
    """health_timeout below health_interval, whether each is given or defaulted: a run that may
    take as long as the interval would be due again before it ends."""
    if "health_command" not in given:
        return
    timeout, interval = kw.get("health_timeout", 10.0), kw.get("health_interval", 30.0)
    if not isinstance(timeout, float) or not isinstance(interval, float) or timeout < interval:
        return  # a bad value is reported already

    def origin(key: str) -> str:
        return "" if key in given else " (the default)"

    key = "health_timeout" if "health_timeout" in given else "health_interval"
    c.error(section, key, None, f"health_timeout {timeout:g}{origin('health_timeout')} is not below "
            f"health_interval {interval:g}{origin('health_interval')}; accepted: a health_timeout shorter "
            "than health_interval, e.g. health_interval = 30 with health_timeout = 10")


def parse_file(text: str, source: str) -> Tuple[Dict[str, object], List[ResourceConfig], List[str]]:
    """Parse one file: its ``[plugin]`` settings, its resources and its errors."""
    c = _Collector(source)
    # configparser's strict mode stops at the first duplicate; find them all first, then
    # parse leniently so every other problem of the file is reported in the same run.
    c.errors.extend(_duplicates(text, source))
    # default_section is a name no admin writes, so [DEFAULT] is not magic and
    # stays an unknown section; no interpolation, so '%' is literal.
    parser = configparser.ConfigParser(interpolation=None, strict=False,
                                       default_section="\x00no-defaults", empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # udev properties are upper case
    try:
        parser.read_string(text, source=source)
    except configparser.MissingSectionHeaderError as exc:
        c.errors.append(f"{source}: line {exc.lineno}: {_line(text, exc.lineno)!r} comes before any section; "
                        "accepted: [plugin] or [resource <vendor.example/name>] first")
        return {}, [], c.errors
    except configparser.ParsingError as exc:
        # Name every bad line, not just "Source contains parsing errors".
        for lineno, _ in exc.errors:
            c.errors.append(f"{source}: line {lineno}: {_line(text, lineno)!r} "
                            "is not a section header, key = value or comment")
        if not exc.errors:
            c.errors.append(f"{source}: not an INI file: {exc.message.splitlines()[0]}")
        return {}, [], c.errors
    except configparser.Error as exc:
        c.errors.append(f"{source}: not an INI file: {exc.message.splitlines()[0]}")
        return {}, [], c.errors
    plugin: Dict[str, object] = {}
    resources: List[ResourceConfig] = []
    for section in parser.sections():
        given = dict(parser.items(section))
        if section == "plugin":
            _parse_plugin(c, section, _printable(c, section, given), plugin)
        elif section.startswith("resource ") and section[len("resource "):].strip():
            res = _parse_resource(c, section, section[len("resource "):].strip(), given)
            if res is not None:
                resources.append(res)
        else:
            c.error(section, None, None, "unknown section; accepted: [plugin] and [resource <vendor.example/name>]")
    return plugin, resources, c.errors


_SECTION_LINE = re.compile(r"^\[(?P<header>.+)\]\s*$")


def _duplicates(text: str, source: str) -> List[str]:
    """Sections and keys given twice, with both line numbers (configparser's own rules:
    a key line is not indented; indented lines continue the previous value)."""
    errors: List[str] = []
    sections: Dict[str, int] = {}
    keys: Dict[str, int] = {}  # of the section being read: a repeated section is reported once, as such
    section: Optional[str] = None
    for lineno, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")) or line[:1].isspace():
            continue
        match = _SECTION_LINE.match(stripped)
        if match:
            section = match.group("header")
            if section in sections:
                errors.append(f"{source}: [{section}] appears twice (lines {sections[section]} and {lineno})")
            else:
                sections[section] = lineno
            keys = {}
            continue
        if section is None:
            continue
        key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip()
        if key in keys:
            errors.append(f"{source}: [{section}] {key} is given twice (lines {keys[key]} and {lineno})")
        else:
            keys[key] = lineno
    return errors


def _line(text: str, lineno: int) -> str:
    """Line ``lineno`` (from 1) as configparser counts them: split at newlines only."""
    lines = text.split("\n")
    return lines[lineno - 1].rstrip("\r") if 0 < lineno <= len(lines) else ""


def parse(files: List[Tuple[str, str]]) -> Config:
    """Build a Config from ``(source, text)`` pairs in order; raise ConfigError with every problem.

    The first file is the main file.  ``[plugin]`` keys of a later file override earlier ones
    (as systemd drop-ins do), except ``strict_permissions``, which only the main file may set;
    a resource defined in two files is an error naming both.
    """
    errors: List[str] = []
    plugin: Dict[str, object] = {}
    resources: Dict[str, ResourceConfig] = {}
    for index, (source, text) in enumerate(files):
        p, res, errs = parse_file(text, source)
        errors.extend(errs)
        if index and "strict_permissions" in p:
            errors.append(f"{source}: [plugin] strict_permissions: only read from the main file {files[0][0]}, "
                          "which decides how the drop-ins are judged; accepted: the key in the main file")
            del p["strict_permissions"]
        plugin.update(p)
        for r in res:
            if r.name in resources:
                errors.append(f"{source}: [resource {r.name}] is already defined in {resources[r.name].source}")
            else:
                resources[r.name] = r
    kinds: Dict[str, ResourceConfig] = {}
    for r in resources.values():
        if r.cdi and r.cdi_kind in kinds:
            other = kinds[r.cdi_kind]
            errors.append(f"{r.source}: [resource {r.name}] cdi_kind = {r.cdi_kind!r}: already the CDI kind of "
                          f"[resource {other.name}] in {other.source}; accepted: a kind of its own per resource "
                          "(their CDI devices would clash)")
        elif r.cdi:
            kinds[r.cdi_kind] = r
    errors.extend(metrics.check_plugin(plugin))
    if errors:
        raise ConfigError(errors)
    return Config(PluginConfig(**plugin), tuple(resources.values()), tuple(s for s, _ in files))  # type: ignore[arg-type]


def config_files(path: str) -> List[str]:
    """The main file then its drop-ins, ``conf.d/*.conf`` beside it, in lexical order."""
    dropin = os.path.join(os.path.dirname(os.path.abspath(path)), DROPIN_DIR_NAME)
    try:
        names = sorted(n for n in os.listdir(dropin) if n.endswith(".conf") and not n.startswith("."))
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise ConfigError([f"{dropin}: cannot list drop-ins: {exc.strerror}"]) from None
    return [path] + [os.path.join(dropin, n) for n in names]


# A config file is a few kilobytes; refuse to read a runaway one into memory.
MAX_FILE_BYTES = 1 << 20


def load(path: str = DEFAULT_CONFIG, candidates: Sequence[str] = ()) -> Config:
    """Read ``path`` and its drop-ins; raise ConfigError naming every problem.

    ``candidates`` are read as if they were in ``conf.d/`` (each replaces the drop-in of its
    name), for ``check-config --dropin``.  The main file and its directory must be writable by
    root (or the user running us) only; so must ``conf.d/`` and each drop-in, and a drop-in that
    is a symlink must point into /etc, unless the main file says ``strict_permissions = no``.
    The main file's own setting cannot excuse the main file: a file anyone may write could say so.
    """
    errors: List[str] = []
    main_text = _read_file(path, errors, judge=True, symlink_rule=False, main=path)
    strict = True
    if main_text is not None:
        settings, _, _ = parse_file(main_text, path)
        strict = bool(settings.get("strict_permissions", True))
    main_dir = os.path.dirname(os.path.abspath(path))
    _judge_dir(main_dir, errors, main=path, relaxable=False)
    dropin_dir = os.path.join(main_dir, DROPIN_DIR_NAME)
    try:
        names = config_files(path)[1:]
    except ConfigError as exc:
        errors.extend(exc.messages)
        names = []
    if strict and names:
        _judge_dir(dropin_dir, errors, main=path, relaxable=True)
    replaced = {os.path.basename(c) for c in candidates}
    names = [n for n in names if os.path.basename(n) not in replaced] + list(candidates)
    files: List[Tuple[str, str]] = [] if main_text is None else [(path, main_text)]
    for name in names:
        text = _read_file(name, errors, judge=strict, symlink_rule=strict, main=path)
        if text is not None:
            files.append((name, text))
    if errors:
        raise ConfigError(errors)
    return parse(files)


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _insecure(st: os.stat_result) -> Optional[str]:
    """Why someone other than root (or the user we run as) could change this file or directory."""
    why = []
    if st.st_uid not in (0, os.geteuid()):
        why.append(f"owned by {_owner(st.st_uid)}")
    writable = [who for bit, who in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "everyone")) if st.st_mode & bit]
    if writable:
        why.append("writable by " + " and ".join(writable))
    if not why:
        return None
    return (f"{' and '.join(why)} (owner {_owner(st.st_uid)}, group {_group(st.st_gid)}, "
            f"mode {stat.S_IMODE(st.st_mode):04o})")


def _refusal(name: str, what: str, why: str, main: str, relaxable: bool) -> str:
    accepted = f"accepted: a {what} only root may change (chown root, chmod go-w)"
    if relaxable:
        accepted += f", or strict_permissions = no in [plugin] of {main}"
    else:
        accepted += "; strict_permissions cannot excuse the main file or its directory"
    return f"{name}: refused: the {what} is {why}; {accepted}"


def _judge_dir(directory: str, errors: List[str], main: str, relaxable: bool) -> None:
    try:
        st = os.stat(directory)
    except OSError:
        return  # what cannot be listed or read is reported as such
    why = _insecure(st)
    if why is not None:
        what = "drop-in directory" if relaxable else "directory of the main file"
        errors.append(_refusal(directory, what, why, main, relaxable))
    elif relaxable:
        _symlink_rule(directory, errors, main, "drop-in directory")


def _symlink_rule(name: str, errors: List[str], main: str, what: str) -> bool:
    """False (and an error) if ``name`` is a symlink that leads outside TRUSTED_SYMLINK_ROOT."""
    try:
        if not stat.S_ISLNK(os.lstat(name).st_mode):
            return True
    except OSError:
        return True  # reported when it is opened
    real = os.path.realpath(name)
    if real.startswith(TRUSTED_SYMLINK_ROOT.rstrip("/") + "/"):
        return True
    errors.append(f"{name}: refused: the {what} is a symlink to {real}, outside {TRUSTED_SYMLINK_ROOT}; accepted: "
                  f"a file in place or a symlink into {TRUSTED_SYMLINK_ROOT}, "
                  f"or strict_permissions = no in [plugin] of {main}")
    return False


def _read_file(name: str, errors: List[str], judge: bool, symlink_rule: bool, main: str) -> Optional[str]:
    """The text of ``name``, judged on the file actually opened (no race with a rename); None on error."""
    if symlink_rule and not _symlink_rule(name, errors, main, "drop-in"):
        return None
    try:
        # O_NONBLOCK: a FIFO planted under a config name must not hang the start.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        errors.append(f"{name}: cannot read: {exc.strerror}")
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            errors.append(f"{name}: cannot read: Is a directory")
            return None
        if not stat.S_ISREG(st.st_mode):
            errors.append(f"{name}: cannot read: not a regular file; accepted: a text file")
            return None
        if judge:
            why = _insecure(st)
            if why is not None:
                errors.append(_refusal(name, "drop-in" if name != main else "main file", why, main, name != main))
                return None
        data = os.read(fd, MAX_FILE_BYTES + 1)
        while len(data) <= MAX_FILE_BYTES:
            more = os.read(fd, MAX_FILE_BYTES + 1 - len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        errors.append(f"{name}: cannot read: {exc.strerror}")
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        errors.append(f"{name}: larger than {MAX_FILE_BYTES >> 20} MiB; accepted: a config file of at most that")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        errors.append(f"{name}: not UTF-8 text: {exc.reason} at byte {exc.start}")
        return None


# Each selector's globs as one compiled pattern (fnmatchcase's, ORed): a scan of 10,000 devices asks
# each of them several times.  Bounded: cleared when a series of reloads has filled it.
_GLOB_PATTERNS: Dict[Tuple[str, ...], Callable[[str], object]] = {}
_GLOB_PATTERNS_MAX = 4096


def matches_globs(value: Optional[str], globs: Tuple[str, ...]) -> bool:
    """True if ``value`` matches any glob (case-sensitive, as fnmatch.fnmatchcase); a missing value matches none."""
    if value is None:
        return False
    match = _GLOB_PATTERNS.get(globs)
    if match is None:
        if len(_GLOB_PATTERNS) >= _GLOB_PATTERNS_MAX:
            _GLOB_PATTERNS.clear()
        pattern = "|".join(f"(?:{fnmatch.translate(g)})" for g in globs) or "(?!)"
        match = _GLOB_PATTERNS[globs] = re.compile(pattern).match
    return match(value) is not None
