"""Parse and validate the INI configuration.

Pure: no udev, no gRPC, no filesystem access except in :func:`load`, which reads
the main file and the ``conf.d/*.conf`` drop-ins beside it and hands their text to
:func:`parse`.  Every problem is collected, so an admin sees all of them at once;
each message names the file, the ``[section]``, the key, the bad value and what
is accepted.
"""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

DEFAULT_CONFIG = "/etc/udev-device-plugin/udev-device-plugin.conf"
DROPIN_DIR_NAME = "conf.d"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
# The kubelet gives PreStartContainer 30 s; leave room for the reply.
KUBELET_PRESTART_TIMEOUT = 30.0

LOG_LEVELS = ("debug", "info", "warning", "error")
EVENT_SINKS = ("auto", "journal", "stderr")
ID_SOURCES = ("sys_name", "devnode", "property.<NAME>", "attribute.<name>")

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


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` lists every problem found."""

    def __init__(self, messages: List[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = list(messages)


@dataclass(frozen=True)
class Template:
    """A string with ``{var}`` placeholders, checked against allowed names at parse time."""

    text: str
    # The text split once into literal and variable parts (odd indexes are variable names):
    # rendering is on Allocate's path.
    parts: Tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(_TEMPLATE_VAR.split(self.text)))

    def render(self, values: Mapping[str, str]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        return "".join(values[p] if i % 2 else p for i, p in enumerate(parts))


@dataclass(frozen=True)
class Mount:
    host_path: Template
    container_path: Template
    read_only: bool


@dataclass(frozen=True)
class ResourceConfig:
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

    @property
    def socket_stem(self) -> str:
        """File-name-safe form of the resource name, for its socket."""
        return self.name.replace("/", "_")


@dataclass(frozen=True)
class PluginConfig:
    kubelet_dir: str = KUBELET_DIR
    log_level: str = "info"
    events: str = "auto"
    register_timeout: float = 5.0
    register_backoff_max: float = 10.0
    ready_timeout: float = 15.0


@dataclass(frozen=True)
class Config:
    plugin: PluginConfig = PluginConfig()
    resources: Tuple[ResourceConfig, ...] = ()
    sources: Tuple[str, ...] = field(default=())

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
    "ready_timeout": ("15", "seconds systemd's READY=1 waits for the kubelet to accept every registration"),
}

RESOURCE_KEYS: Dict[str, Tuple[str, str]] = {
    "subsystem": ("(required)", "udev subsystem of the devices, e.g. mem, block, pci, misc"),
    "kernel": ("(any)", "space-separated globs on the kernel name (sys_name)"),
    "devtype": ("(any)", "space-separated globs on the udev DEVTYPE"),
    "driver": ("(any)", "space-separated globs on the bound driver"),
    "property.<NAME>": ("(none)", "space-separated globs on a udev property"),
    "attribute.<name>": ("(none)", "space-separated globs on a sysfs attribute"),
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
    "health_timeout": ("10", "seconds before a health_command run counts as unhealthy"),
    "health_threshold": ("1", "consecutive equal results before health changes"),
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


class _Collector:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: List[str] = []

    def error(self, section: str, key: Optional[str], value: Optional[str], problem: str) -> None:
        where = f"{self.source}: [{section}]"
        if key is not None:
            where += f" {key}"
            if value is not None:
                where += f" = {value!r}"
        self.errors.append(f"{where}: {problem}")


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
    return words


def _number(c: _Collector, section: str, key: str, value: str, lo: float, hi: float) -> Optional[float]:
    try:
        num = float(value)
    except ValueError:
        num = float("nan")
    if not (lo < num <= hi):
        c.error(section, key, value, f"accepted: a number of seconds greater than {lo:g} and at most {hi:g}")
        return None
    return num


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
        else:
            c.error(section, key, None, "unknown key; accepted: " + ", ".join(PLUGIN_KEYS))


def _parse_resource(c: _Collector, section: str, name: str, items: Mapping[str, str]) -> Optional[ResourceConfig]:
    before = len(c.errors)
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
            if not re.match(r"^[A-Za-z0-9_.:-]+$", value):
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
            # isdigit() alone admits '²', which int() refuses.
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 100:
                c.error(section, key, value, "accepted: a whole number from 1 to 100")
            else:
                kw[key] = int(value)
        else:
            c.error(section, key, None, "unknown key; accepted: " + ", ".join(RESOURCE_KEYS))
    if "subsystem" not in kw:
        c.error(section, "subsystem", None, "missing; every resource needs the udev subsystem of its devices")
    if "health_timeout" in kw or "health_interval" in kw:
        if not kw.get("health_command"):
            c.error(section, "health_interval" if "health_interval" in kw else "health_timeout", None,
                    "only meaningful with health_command")
    if "prestart_timeout" in kw and not kw.get("prestart_command"):
        c.error(section, "prestart_timeout", None, "only meaningful with prestart_command")
    if len(c.errors) != before:
        return None
    kw["properties"], kw["attributes"] = tuple(props), tuple(attrs)
    kw["health_properties"], kw["health_attributes"] = tuple(hprops), tuple(hattrs)
    return ResourceConfig(**kw)  # type: ignore[arg-type]


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
        items = dict(parser.items(section))
        if section == "plugin":
            _parse_plugin(c, section, items, plugin)
        elif section.startswith("resource ") and section[len("resource "):].strip():
            res = _parse_resource(c, section, section[len("resource "):].strip(), items)
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

    ``[plugin]`` keys of a later file override earlier ones (as systemd drop-ins do);
    a resource defined in two files is an error naming both.
    """
    errors: List[str] = []
    plugin: Dict[str, object] = {}
    resources: Dict[str, ResourceConfig] = {}
    for source, text in files:
        p, res, errs = parse_file(text, source)
        errors.extend(errs)
        plugin.update(p)
        for r in res:
            if r.name in resources:
                errors.append(f"{source}: [resource {r.name}] is already defined in {resources[r.name].source}")
            else:
                resources[r.name] = r
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


def load(path: str = DEFAULT_CONFIG) -> Config:
    """Read ``path`` and its drop-ins; raise ConfigError naming every problem."""
    files: List[Tuple[str, str]] = []
    errors: List[str] = []
    for name in config_files(path):
        try:
            with open(name, encoding="utf-8") as f:
                files.append((name, f.read()))
        except OSError as exc:
            errors.append(f"{name}: cannot read: {exc.strerror}")
        except UnicodeDecodeError as exc:
            errors.append(f"{name}: not UTF-8 text: {exc.reason} at byte {exc.start}")
    if errors:
        raise ConfigError(errors)
    return parse(files)


def matches_globs(value: Optional[str], globs: Tuple[str, ...]) -> bool:
    """True if ``value`` matches any glob (case-sensitive); a missing value matches none."""
    return value is not None and any(fnmatch.fnmatchcase(value, g) for g in globs)
