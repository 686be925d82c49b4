"""config.py: every key parsed, the kubelet's resource-name rules, precise errors, drop-ins, no traceback."""

from __future__ import annotations

import os
import random
from typing import List, Optional

import pytest

from udev_device_plugin import config
from udev_device_plugin.config import ConfigError, Mount, PluginConfig, ResourceConfig, Template

SRC = "/etc/udev-device-plugin/udev-device-plugin.conf"
RES_HEAD = "[resource example.com/dev]\nsubsystem = mem\n"


def parse(text: str, source: str = SRC) -> config.Config:
    return config.parse([(source, text)])


def errors(text: str, source: str = SRC) -> List[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, source)
    assert str(info.value) == "\n".join(info.value.messages)
    return info.value.messages


def one_error(text: str, source: str = SRC) -> str:
    messages = errors(text, source)
    assert len(messages) == 1, messages
    return messages[0]


def resource(extra: str) -> ResourceConfig:
    cfg = parse(RES_HEAD + extra)
    assert len(cfg.resources) == 1
    return cfg.resources[0]


def assert_names(message: str, section: str, key: Optional[str], value: Optional[str], accepted: str,
                 source: str = SRC) -> None:
    """The message names the file, [section], the key, the bad value and what is accepted."""
    assert message.startswith(f"{source}: [{section}]"), message
    if key is not None:
        assert f"] {key}" in message, message
    if value is not None:
        assert repr(value) in message, message
    assert accepted in message, message


# --- [plugin] -------------------------------------------------------------------------------------


def test_empty_config_is_all_defaults():
    cfg = parse("")
    assert cfg.plugin == PluginConfig()
    assert cfg.resources == ()
    assert cfg.sources == (SRC,)
    assert parse("[plugin]\n").plugin == PluginConfig()


def test_plugin_defaults():
    p = PluginConfig()
    assert (p.kubelet_dir, p.log_level, p.events, p.register_timeout, p.register_backoff_max) == (
        "/var/lib/kubelet/device-plugins", "info", "auto", 5.0, 10.0)


@pytest.mark.parametrize("key", sorted(config.PLUGIN_KEYS))
def test_documented_plugin_default_written_out_changes_nothing(key):
    """PLUGIN_KEYS, the one table the docs show, holds the real defaults, in a form the parser takes."""
    assert set(PluginConfig._fields) == set(config.PLUGIN_KEYS)
    assert parse(f"[plugin]\n{key} = {config.PLUGIN_KEYS[key][0]}\n").plugin == PluginConfig()


@pytest.mark.parametrize("key, needs", [
    ("id", ""),
    ("permissions", ""),
    ("container_path", ""),
    ("prestart_timeout", "prestart_command = /bin/true"),
    ("health_interval", "health_command = /bin/true"),
    ("health_timeout", "health_command = /bin/true"),
    ("health_threshold", ""),
])
def test_documented_resource_default_written_out_changes_nothing(key, needs):
    assert resource(f"{needs}\n{key} = {config.RESOURCE_KEYS[key][0]}") == resource(needs)


@pytest.mark.parametrize("key, value, attr, expected", [
    ("kubelet_dir", "/srv/kubelet/device-plugins", "kubelet_dir", "/srv/kubelet/device-plugins"),
    ("kubelet_dir", "/", "kubelet_dir", "/"),
    ("log_level", "debug", "log_level", "debug"),
    ("log_level", "WARNING", "log_level", "warning"),
    ("log_level", "Error", "log_level", "error"),
    ("events", "journal", "events", "journal"),
    ("events", "stderr", "events", "stderr"),
    ("events", "auto", "events", "auto"),
    ("register_timeout", "2.5", "register_timeout", 2.5),
    ("register_timeout", "60", "register_timeout", 60.0),
    ("register_timeout", "0.001", "register_timeout", 0.001),
    ("kubelet_keepalive", "1", "kubelet_keepalive", 1.0),
    ("kubelet_keepalive", "2.5", "kubelet_keepalive", 2.5),
    ("kubelet_keepalive", "3600", "kubelet_keepalive", 3600.0),
    ("register_backoff_max", "300", "register_backoff_max", 300.0),
    ("register_backoff_max", "1e1", "register_backoff_max", 10.0),
])
def test_plugin_key_parsed(key, value, attr, expected):
    plugin = parse(f"[plugin]\n{key} = {value}\n").plugin
    assert getattr(plugin, attr) == expected
    # Every other key keeps its default.
    others = {name: getattr(plugin, name) for name in PluginConfig._fields if name != attr}
    assert others == {name: PluginConfig._field_defaults[name] for name in PluginConfig._fields if name != attr}


@pytest.mark.parametrize("key, value, accepted", [
    ("kubelet_dir", "var/lib/kubelet", "an absolute directory"),
    ("kubelet_dir", "/var/lib/kubelet/", "an absolute directory"),
    ("kubelet_dir", "/var/lib/../kubelet", "an absolute directory"),
    ("log_level", "verbose", "accepted: debug, info, warning, error"),
    ("log_level", "critical", "accepted: debug, info, warning, error"),
    ("events", "syslog", "accepted: auto, journal, stderr"),
    ("register_timeout", "0", "greater than 0 and at most 60"),
    ("register_timeout", "-1", "greater than 0 and at most 60"),
    ("register_timeout", "60.5", "greater than 0 and at most 60"),
    ("register_timeout", "five", "greater than 0 and at most 60"),
    ("register_timeout", "nan", "greater than 0 and at most 60"),
    ("register_timeout", "inf", "greater than 0 and at most 60"),
    ("register_timeout", "5s", "greater than 0 and at most 60"),
    ("kubelet_keepalive", "0.999", "from 1 to 3600"),
    ("kubelet_keepalive", "0", "from 1 to 3600"),
    ("kubelet_keepalive", "3601", "from 1 to 3600"),
    ("kubelet_keepalive", "nan", "from 1 to 3600"),
    ("kubelet_keepalive", "-inf", "from 1 to 3600"),
    ("kubelet_keepalive", "30s", "from 1 to 3600"),
    ("register_backoff_max", "301", "greater than 0 and at most 300"),
    ("register_backoff_max", "0", "greater than 0 and at most 300"),
])
def test_plugin_bad_value(key, value, accepted):
    message = one_error(f"[plugin]\n{key} = {value}\n")
    assert_names(message, "plugin", key, value, accepted)


def test_plugin_empty_value_is_refused():
    message = one_error("[plugin]\nkubelet_dir =\n")
    assert_names(message, "plugin", "kubelet_dir", "", "an absolute directory")


@pytest.mark.parametrize("key", ["kubelet_socket", "Log_Level", "loglevel", "subsystem"])
def test_plugin_unknown_key(key):
    message = one_error(f"[plugin]\n{key} = x\n")
    assert_names(message, "plugin", key, None, "unknown key; accepted: " + ", ".join(config.PLUGIN_KEYS))


# --- [resource ...]: every key ------------------------------------------------------------------


def test_resource_defaults():
    res = resource("")
    assert res.name == "example.com/dev"
    assert res.source == SRC
    assert res.subsystem == "mem"
    assert (res.kernel, res.devtype, res.driver, res.properties, res.attributes, res.extra_devnodes) == (
        (), (), (), (), (), ())
    assert res.id == "sys_name"
    assert res.permissions == "rw"
    assert res.container_path == Template("{devnode}")
    assert (res.mounts, res.env, res.annotations, res.prestart_command) == ((), (), (), ())
    assert res.prestart_timeout == 20.0
    assert (res.health_attributes, res.health_properties, res.health_command) == ((), (), ())
    assert (res.health_interval, res.health_timeout, res.health_threshold) == (30.0, 10.0, 1)
    assert res.socket_stem == "example.com_dev"


@pytest.mark.parametrize("lines, attr, expected", [
    ("kernel = null zero  full", "kernel", ("null", "zero", "full")),
    ("kernel = loop*", "kernel", ("loop*",)),
    ('kernel = "odd name" tty[0-9]', "kernel", ("odd name", "tty[0-9]")),
    ("devtype = disk", "devtype", ("disk",)),
    ("devtype = disk partition", "devtype", ("disk", "partition")),
    ("driver = vfio-pci", "driver", ("vfio-pci",)),
    ("driver = nvidia* amdgpu", "driver", ("nvidia*", "amdgpu")),
    ("property.ID_VENDOR_ID = 8086 10de", "properties", (("ID_VENDOR_ID", ("8086", "10de")),)),
    ("property.ID_MODEL = *Accel*\nproperty.DEVNAME = /dev/x*", "properties",
     (("ID_MODEL", ("*Accel*",)), ("DEVNAME", ("/dev/x*",)))),
    ("property.MAJOR = 1", "properties", (("MAJOR", ("1",)),)),
    ("attribute.vendor = 0x10ee", "attributes", (("vendor", ("0x10ee",)),)),
    ("attribute.device/class = 0x12*", "attributes", (("device/class", ("0x12*",)),)),
    ("attribute.numa_node = 0 1\nattribute.vendor = 0x8086", "attributes",
     (("numa_node", ("0", "1")), ("vendor", ("0x8086",)))),
    ("extra_devnodes = /dev/vfio/vfio", "extra_devnodes", ("/dev/vfio/vfio",)),
    ("extra_devnodes = /dev/vfio/vfio  /dev/kfd", "extra_devnodes", ("/dev/vfio/vfio", "/dev/kfd")),
    ("id = sys_name", "id", "sys_name"),
    ("id = devnode", "id", "devnode"),
    ("id = property.ID_SERIAL_SHORT", "id", "property.ID_SERIAL_SHORT"),
    ("id = attribute.serial", "id", "attribute.serial"),
    ("id = attribute.device/serial_number", "id", "attribute.device/serial_number"),
    ("permissions = r", "permissions", "r"),
    ("permissions = w", "permissions", "w"),
    ("permissions = m", "permissions", "m"),
    ("permissions = rw", "permissions", "rw"),
    ("permissions = wr", "permissions", "rw"),
    ("permissions = mwr", "permissions", "rwm"),
    ("container_path = /dev/fpga/{id}", "container_path", Template("/dev/fpga/{id}")),
    ("container_path = {devnode}", "container_path", Template("{devnode}")),
    ("container_path = /dev/{resource}/{sys_name}-{name}", "container_path",
     Template("/dev/{resource}/{sys_name}-{name}")),
    ("container_path = /dev/static", "container_path", Template("/dev/static")),
    ("mounts = /var/lib/fpga/{ids}:/fpga:ro", "mounts",
     (Mount(Template("/var/lib/fpga/{ids}"), Template("/fpga"), True),)),
    ("mounts = /opt/a:/opt/b:rw\n  /opt/c:/opt/{resource}/{count}", "mounts",
     (Mount(Template("/opt/a"), Template("/opt/b"), False),
      Mount(Template("/opt/c"), Template("/opt/{resource}/{count}"), False))),
    ("env = FPGA_IDS={ids}", "env", (("FPGA_IDS", Template("{ids}")),)),
    ("env = A={count}\n  _B = x=y \n  C=", "env",
     (("A", Template("{count}")), ("_B", Template("x=y")), ("C", Template("")))),
    ("env = P=100%", "env", (("P", Template("100%")),)),
    ("annotations = example.com/ids={ids}", "annotations", (("example.com/ids", Template("{ids}")),)),
    ("annotations = plain=1\n  a.b-c.example/x_y.z={devnodes}", "annotations",
     (("plain", Template("1")), ("a.b-c.example/x_y.z", Template("{devnodes}")))),
    ("prestart_command = /usr/libexec/fpga-prep", "prestart_command", ("/usr/libexec/fpga-prep",)),
    ('prestart_command = /usr/bin/fpga-prep --mode "a b" \'c d\'', "prestart_command",
     ("/usr/bin/fpga-prep", "--mode", "a b", "c d")),
    ("health.attribute.status = ok good", "health_attributes", (("status", ("ok", "good")),)),
    ("health.attribute.device/state = up*", "health_attributes", (("device/state", ("up*",)),)),
    ("health.property.ID_HEALTH = 1", "health_properties", (("ID_HEALTH", ("1",)),)),
    ("health_command = /usr/libexec/fpga-check --quick", "health_command",
     ("/usr/libexec/fpga-check", "--quick")),
    ("health_threshold = 3", "health_threshold", 3),
    ("health_threshold = 1", "health_threshold", 1),
    ("health_threshold = 100", "health_threshold", 100),
])
def test_resource_key_parsed(lines, attr, expected):
    assert getattr(resource(lines), attr) == expected


@pytest.mark.parametrize("lines, attr, expected", [
    ("prestart_command = /bin/true\nprestart_timeout = 29", "prestart_timeout", 29.0),
    ("prestart_command = /bin/true\nprestart_timeout = 0.5", "prestart_timeout", 0.5),
    ("health_command = /bin/true\nhealth_interval = 60", "health_interval", 60.0),
    ("health_command = /bin/true\nhealth_interval = 86400", "health_interval", 86400.0),
    ("health_command = /bin/true\nhealth_timeout = 2.5", "health_timeout", 2.5),
    ("health_command = /bin/true\nhealth_interval = 7200\nhealth_timeout = 3600", "health_timeout", 3600.0),
    ("health_command = /bin/true\nhealth_interval = 1\nhealth_timeout = 0.5", "health_timeout", 0.5),
])
def test_resource_timing_keys(lines, attr, expected):
    assert getattr(resource(lines), attr) == expected


def test_health_selectors_do_not_select():
    res = resource("health.attribute.status = ok\nhealth.property.OK = 1")
    assert res.attributes == () and res.properties == ()


def test_selectors_do_not_become_health_rules():
    res = resource("attribute.status = ok\nproperty.OK = 1")
    assert res.health_attributes == () and res.health_properties == ()


def test_keys_are_case_sensitive_for_udev_properties():
    res = resource("property.ID_Vendor = x")
    assert res.properties == (("ID_Vendor", ("x",)),)


def test_several_resources_keep_file_order():
    cfg = parse("[resource example.com/b]\nsubsystem = mem\n[resource example.com/a]\nsubsystem = misc\n")
    assert [r.name for r in cfg.resources] == ["example.com/b", "example.com/a"]
    assert cfg.resource("example.com/a").subsystem == "misc"
    with pytest.raises(KeyError):
        cfg.resource("example.com/c")


def test_section_name_whitespace_is_trimmed():
    cfg = parse("[resource   example.com/dev  ]\nsubsystem = mem\n")
    assert cfg.resources[0].name == "example.com/dev"


# --- [resource ...]: bad values ------------------------------------------------------------------

SECTION = "resource example.com/dev"


@pytest.mark.parametrize("lines, key, value, accepted", [
    ("kernel =", "kernel", "", "empty; accepted: one or more space-separated globs"),
    ('kernel = "null', "kernel", '"null', "accepted: space-separated globs"),
    ("devtype = 'disk", "devtype", "'disk", "accepted: space-separated globs"),
    ("driver =", "driver", "", "empty; accepted"),
    ("property.ID_X =", "property.ID_X", "", "empty; accepted"),
    ("attribute.vendor =", "attribute.vendor", "", "empty; accepted"),
    ("health.attribute.status =", "health.attribute.status", "", "empty; accepted"),
    ("extra_devnodes = dev/vfio", "extra_devnodes", "dev/vfio", "accepted: an absolute device node path"),
    ("extra_devnodes = /dev/ok /dev/../etc/x", "extra_devnodes", "/dev/ok /dev/../etc/x",
     "accepted: an absolute device node path"),
    ("extra_devnodes = /etc/passwd", "extra_devnodes", "/etc/passwd", "accepted: device nodes under /dev"),
    ("extra_devnodes = /dev", "extra_devnodes", "/dev", "accepted: device nodes under /dev"),
    ("id = serial", "id", "serial", "accepted: sys_name, devnode, property.<NAME>, attribute.<name>"),
    ("id = property.", "id", "property.", "accepted: sys_name, devnode"),
    ("id = property.BAD-NAME", "id", "property.BAD-NAME", "accepted: sys_name, devnode"),
    ("id = attribute.", "id", "attribute.", "accepted: sys_name, devnode"),
    ("id = attribute./etc/shadow", "id", "attribute./etc/shadow", "accepted: sys_name, devnode"),
    ("id = attribute.../../../etc/shadow", "id", "attribute.../../../etc/shadow", "accepted: sys_name, devnode"),
    ("id = SYS_NAME", "id", "SYS_NAME", "accepted: sys_name, devnode"),
    ("permissions = rx", "permissions", "rx", "accepted: a combination of r, w and m"),
    ("permissions = rr", "permissions", "rr", "accepted: a combination of r, w and m"),
    ("permissions = RW", "permissions", "RW", "accepted: a combination of r, w and m"),
    ("permissions = r w", "permissions", "r w", "accepted: a combination of r, w and m"),
    ("permissions =", "permissions", "", "accepted: a combination of r, w and m"),
    ("container_path = dev/fpga/{id}", "container_path", "dev/fpga/{id}", "accepted: an absolute path template"),
    ("container_path = {name}", "container_path", "{name}", "accepted: an absolute path template"),
    ("container_path = {id}/x", "container_path", "{id}/x", "accepted: an absolute path template"),
    ("container_path = /dev/{ids}", "container_path", "/dev/{ids}",
     "unknown variable {ids}; accepted: {devnode} {name} {id} {sys_name} {resource}"),
    ("container_path = /dev/{ID}", "container_path", "/dev/{ID}", "unknown variable {ID}"),
    ("container_path = /dev/{}", "container_path", "/dev/{}", "unknown variable {}"),
    ("container_path = /dev/{id", "container_path", "/dev/{id", "unbalanced brace"),
    ("container_path = /dev/id}", "container_path", "/dev/id}", "unbalanced brace"),
    ("container_path = /dev/{{id}}", "container_path", "/dev/{{id}}", "unbalanced brace"),
    ("mounts = /a", "mounts", "/a", "accepted: lines of /host/path:/container/path[:ro|:rw]"),
    ("mounts = /a:b", "mounts", "/a:b", "accepted: lines of /host/path:/container/path"),
    ("mounts = a:/b", "mounts", "a:/b", "accepted: lines of /host/path:/container/path"),
    ("mounts = /a:/b:rx", "mounts", "/a:/b:rx", "accepted: lines of /host/path:/container/path"),
    ("mounts = /a:/b:ro:x", "mounts", "/a:/b:ro:x", "accepted: lines of /host/path:/container/path"),
    ("mounts = /a/{id}:/b", "mounts", "/a/{id}",
     "unknown variable {id}; accepted: {ids} {devnodes} {count} {resource}"),
    ("mounts = /a:/b/{devnode}", "mounts", "/b/{devnode}", "unknown variable {devnode}"),
    ("env = 1BAD=x", "env", "1BAD=x", "accepted: lines of NAME=value"),
    ("env = NO_EQUALS", "env", "NO_EQUALS", "accepted: lines of NAME=value"),
    ("env = BAD-NAME=x", "env", "BAD-NAME=x", "accepted: lines of NAME=value"),
    ("env = =x", "env", "=x", "accepted: lines of NAME=value"),
    ("env = A=1\n  A=2", "env", "A=2", "A is given twice"),
    ("env = A={devnode}", "env", "{devnode}", "unknown variable {devnode}; accepted: {ids} {devnodes} {count}"),
    ("env = A={ids", "env", "{ids", "unbalanced brace"),
    ("annotations = Example.com/x=1", "annotations", "Example.com/x=1", "accepted: lines of key=value"),
    ("annotations = a/b/c=1", "annotations", "a/b/c=1", "accepted: lines of key=value"),
    ("annotations = example.com/=1", "annotations", "example.com/=1", "accepted: lines of key=value"),
    ("annotations = -x=1", "annotations", "-x=1", "accepted: lines of key=value"),
    ("annotations = =1", "annotations", "=1", "accepted: lines of key=value"),
    (f"annotations = {'a' * 64}=1", "annotations", f"{'a' * 64}=1", "accepted: lines of key=value"),
    ("annotations = k=1\n  k=2", "annotations", "k=2", "k is given twice"),
    ("annotations = k={id}", "annotations", "{id}", "unknown variable {id}"),
    ("prestart_command = fpga-prep", "prestart_command", "fpga-prep", "accepted: a command with an absolute path"),
    ("prestart_command = ./fpga-prep", "prestart_command", "./fpga-prep", "accepted: a command with an absolute"),
    ('prestart_command = /bin/x "open', "prestart_command", '/bin/x "open', "accepted: a command line in shell"),
    ("prestart_command =", "prestart_command", "", "empty; accepted: a command line"),
    ("prestart_command = /bin/true\nprestart_timeout = 30", "prestart_timeout", "30",
     "greater than 0 and at most 29"),
    ("prestart_command = /bin/true\nprestart_timeout = 0", "prestart_timeout", "0", "greater than 0 and at most 29"),
    ("prestart_command = /bin/true\nprestart_timeout = soon", "prestart_timeout", "soon", "at most 29"),
    ("health_command = check", "health_command", "check", "accepted: a command with an absolute path"),
    ("health_command = /bin/true\nhealth_interval = 0", "health_interval", "0", "greater than 0 and at most 86400"),
    ("health_command = /bin/true\nhealth_interval = 86401", "health_interval", "86401", "at most 86400"),
    ("health_command = /bin/true\nhealth_timeout = 3601", "health_timeout", "3601", "at most 3600"),
    ("health_command = /bin/true\nhealth_timeout = -5", "health_timeout", "-5", "greater than 0"),
    ("health_threshold = 0", "health_threshold", "0", "accepted: a whole number from 1 to 100"),
    ("health_threshold = 101", "health_threshold", "101", "accepted: a whole number from 1 to 100"),
    ("health_threshold = 1.5", "health_threshold", "1.5", "accepted: a whole number from 1 to 100"),
    ("health_threshold = -1", "health_threshold", "-1", "accepted: a whole number from 1 to 100"),
    ("health_threshold = three", "health_threshold", "three", "accepted: a whole number from 1 to 100"),
    ("health_threshold = \u00b2", "health_threshold", "\u00b2", "accepted: a whole number from 1 to 100"),
    ("health_threshold = \u0663", "health_threshold", "\u0663", "accepted: a whole number from 1 to 100"),
])
def test_resource_bad_value(lines, key, value, accepted):
    message = one_error(RES_HEAD + lines)
    assert_names(message, SECTION, key, value, accepted)


@pytest.mark.parametrize("lines, key, accepted", [
    ("property.BAD-NAME = x", "property.BAD-NAME", "accepted: property.<NAME>"),
    ("property. = x", "property.", "accepted: property.<NAME>"),
    ("health.property.A-B = x", "health.property.A-B", "accepted: property.<NAME>"),
    ("attribute./vendor = x", "attribute./vendor", "accepted: attribute.<name>"),
    ("attribute.../../etc = x", "attribute.../../etc", "accepted: attribute.<name>"),
    ("attribute.device/../../x = y", "attribute.device/../../x", "accepted: attribute.<name>"),
    ("attribute.a b = x", "attribute.a b", "accepted: attribute.<name>"),
    ("health.attribute.x//y = 1", "health.attribute.x//y", "accepted: attribute.<name>"),
])
def test_bad_selector_names(lines, key, accepted):
    message = one_error(RES_HEAD + lines)
    assert_names(message, SECTION, key, None, accepted)


@pytest.mark.parametrize("key", ["kernal", "Subsystem", "devnode", "health.attr.x", "prestart", "name"])
def test_resource_unknown_key(key):
    message = one_error(RES_HEAD + f"{key} = x")
    assert_names(message, SECTION, key, None, "unknown key; accepted: " + ", ".join(config.RESOURCE_KEYS))


@pytest.mark.parametrize("lines, key, needs", [
    ("prestart_timeout = 5", "prestart_timeout", "prestart_command"),
    ("health_interval = 5", "health_interval", "health_command"),
    ("health_timeout = 5", "health_timeout", "health_command"),
])
def test_timeouts_only_with_their_command(lines, key, needs):
    message = one_error(RES_HEAD + lines)
    assert_names(message, SECTION, key, None, f"only meaningful with {needs}")


@pytest.mark.parametrize("value", ["", "mem pci", "mem/x", "mem*", "m\u00e9m"])
def test_bad_subsystem(value):
    message = one_error(f"[{SECTION}]\nsubsystem = {value}\n")
    assert_names(message, SECTION, "subsystem", value, "accepted: one udev subsystem name")


@pytest.mark.parametrize("value", ["mem", "usb-serial", "scsi_generic", "platform", "net", "a:b", "x.y"])
def test_good_subsystem(value):
    assert parse(f"[{SECTION}]\nsubsystem = {value}\n").resources[0].subsystem == value


def test_missing_subsystem():
    message = one_error(f"[{SECTION}]\nkernel = null\n")
    assert message == f"{SRC}: [{SECTION}] subsystem: missing; every resource needs the udev subsystem of its devices"


# --- resource names, exactly as the kubelet checks them --------------------------------------------

LONG_PREFIX = ".".join(["a" * 60] * 4) + ".a"  # 245 characters: "requests." + prefix = 254 > 253
assert len(LONG_PREFIX) == 245


@pytest.mark.parametrize("name", [
    "example.com/fpga",
    "example.com/FPGA",
    "x/y",
    "a.b/c",
    "sub.example.com/a",
    "example-1.com/dev",
    "1.example/2",
    "example.com/x_y.z-1",
    "example.com/" + "a" * 63,
    LONG_PREFIX[1:] + "/x",  # "requests." + 244 characters = 253
    "example.com/kubernetes.io",  # only the kubernetes.io/ namespaces are reserved
    "kubernetes.io.example.com/x",
])
def test_resource_name_accepted(name):
    assert config.validate_resource_name(name) is None
    assert parse(f"[resource {name}]\nsubsystem = mem\n").resources[0].name == name


@pytest.mark.parametrize("name, why", [
    ("fpga", "must contain '/'"),
    ("example.com", "must contain '/'"),
    ("kubernetes.io/fpga", "kubernetes.io namespaces are reserved"),
    ("foo.kubernetes.io/fpga", "kubernetes.io namespaces are reserved"),
    ("requests.example.com/fpga", "must not start with 'requests.'"),
    ("example.com/a/b", "exactly one '/'"),
    ("Example.com/fpga", "lowercase DNS subdomain"),
    ("example_com/fpga", "lowercase DNS subdomain"),
    ("-example.com/fpga", "lowercase DNS subdomain"),
    ("example-.com/fpga", "lowercase DNS subdomain"),
    ("example..com/fpga", "lowercase DNS subdomain"),
    (".example.com/fpga", "lowercase DNS subdomain"),
    ("example.com./fpga", "lowercase DNS subdomain"),
    ("/fpga", "lowercase DNS subdomain"),
    ("ex ample.com/fpga", "lowercase DNS subdomain"),
    (LONG_PREFIX + "/x", "lowercase DNS subdomain"),
    ("example.com\n/fpga", "lowercase DNS subdomain"),
    ("example.com/", "1-63 characters"),
    ("example.com/" + "a" * 64, "1-63 characters"),
    ("example.com/-fpga", "1-63 characters"),
    ("example.com/fpga-", "1-63 characters"),
    ("example.com/_fpga", "1-63 characters"),
    ("example.com/fp ga", "1-63 characters"),
    ("example.com/fp:ga", "1-63 characters"),
    ("example.com/fpga\n", "1-63 characters"),
    ("example.com/f\u00fcr", "1-63 characters"),
])
def test_resource_name_refused(name, why):
    problem = config.validate_resource_name(name)
    assert problem is not None and why in problem


@pytest.mark.parametrize("name, why", [
    ("fpga", "must contain '/'"),
    ("kubernetes.io/fpga", "reserved"),
    ("Example.com/fpga", "lowercase DNS subdomain"),
    ("example.com/" + "a" * 64, "1-63 characters"),
])
def test_bad_resource_name_in_config(name, why):
    message = one_error(f"[resource {name}]\nsubsystem = mem\n")
    assert message.startswith(f"{SRC}: [resource {name}]: resource name {name!r} is not one the kubelet accepts")
    assert why in message


# --- sections, duplicates, [DEFAULT], syntax ---------------------------------------------------------


@pytest.mark.parametrize("section", ["DEFAULT", "default", "Plugin", "resources example.com/x", "resource",
                                     "resource ", "device example.com/x", "general"])
def test_unknown_section(section):
    message = one_error(f"[{section}]\nlog_level = info\n")
    assert message.startswith(f"{SRC}: [{section}]")
    assert "unknown section; accepted: [plugin] and [resource <vendor.example/name>]" in message


def test_default_section_is_not_magic():
    """[DEFAULT] keys are not inherited by other sections: it is an unknown section like any other."""
    messages = errors("[DEFAULT]\nsubsystem = mem\nlog_level = debug\n[resource example.com/a]\nkernel = null\n"
                      "[plugin]\n")
    assert len(messages) == 2, messages
    assert any(m.startswith(f"{SRC}: [DEFAULT]") and "unknown section" in m for m in messages)
    assert any("[resource example.com/a] subsystem: missing" in m for m in messages)


def test_no_interpolation():
    res = resource("env = A=%(foo)s\n  B=$HOME 50%%")
    assert res.env == (("A", Template("%(foo)s")), ("B", Template("$HOME 50%%")))


def test_duplicate_section():
    message = one_error("[plugin]\n[resource example.com/a]\nsubsystem = mem\n\n[resource example.com/a]\n"
                        "subsystem = misc\n")
    assert message == f"{SRC}: [resource example.com/a] appears twice (lines 2 and 5)"


def test_duplicate_plugin_section():
    assert one_error("[plugin]\nlog_level = info\n[plugin]\n") == f"{SRC}: [plugin] appears twice (lines 1 and 3)"


@pytest.mark.parametrize("text, section, key, lines", [
    ("[plugin]\nlog_level = info\nlog_level = debug\n", "plugin", "log_level", "2 and 3"),
    ("[resource example.com/a]\nsubsystem = mem\nkernel = a\nkernel = b\n", "resource example.com/a", "kernel",
     "3 and 4"),
    ("[resource example.com/a]\nsubsystem = mem\nsubsystem = mem\n", "resource example.com/a", "subsystem",
     "2 and 3"),
])
def test_duplicate_key(text, section, key, lines):
    assert one_error(text) == f"{SRC}: [{section}] {key} is given twice (lines {lines})"


def test_every_duplicate_and_every_other_error_of_a_file_at_once():
    messages = errors("[plugin]\nlog_level = info\nlog_level = loud\n"
                      "[resource example.com/a]\nsubsystem = mem\nkernel = a\nkernel = b\nbogus = 1\n"
                      "[plugin]\n")
    assert f"{SRC}: [plugin] log_level is given twice (lines 2 and 3)" in messages
    assert f"{SRC}: [resource example.com/a] kernel is given twice (lines 6 and 7)" in messages
    assert f"{SRC}: [plugin] appears twice (lines 1 and 9)" in messages
    # Parsing goes on past the duplicates: the later value and the unknown key are judged too.
    assert any("log_level = 'loud'" in m for m in messages)
    assert any("bogus: unknown key" in m for m in messages)


@pytest.mark.parametrize("value", ["null  # the null device", "null ;comment"])
def test_inline_comment_in_a_glob_list_is_refused(value):
    message = one_error(f"[resource example.com/a]\nsubsystem = mem\nkernel = {value}\n")
    assert "comments must be on their own line" in message


def test_same_resource_twice_in_one_file_under_different_spellings():
    message = one_error("[resource example.com/a]\nsubsystem = mem\n[resource  example.com/a]\nsubsystem = misc\n")
    assert message == f"{SRC}: [resource example.com/a] is already defined in {SRC}"


@pytest.mark.parametrize("text, line, content", [
    ("garbage", 1, "garbage"),
    ("  indented = 1\n[plugin]\n", 1, "  indented = 1"),
    ("\n\nlog_level = info\n", 3, "log_level = info"),
    ("[plugin\nlog_level = info\n", 1, "[plugin"),
])
def test_text_before_any_section(text, line, content):
    message = one_error(text)
    assert message.startswith(f"{SRC}: line {line}: {content!r} comes before any section")
    assert "accepted: [plugin] or [resource" in message


def test_every_unparsable_line_is_named():
    messages = errors("[plugin]\nlog_level = info\njust words\n[resource example.com/a]\nsubsystem = mem\n"
                      "kernel\r\n")
    assert messages == [
        f"{SRC}: line 3: 'just words' is not a section header, key = value or comment",
        f"{SRC}: line 6: 'kernel' is not a section header, key = value or comment",
    ]


def test_comments_and_continuations():
    cfg = parse("# comment\n; another\n[resource example.com/a]\n# inside\nsubsystem = mem\n"
                "kernel = null\n  zero\n\tfull\n")
    assert cfg.resources[0].kernel == ("null", "zero", "full")


# --- all errors at once -------------------------------------------------------------------------------


def test_all_errors_of_a_file_at_once():
    messages = errors(
        "[plugin]\nlog_level = loud\nbogus = 1\n"
        "[resource example.com/a]\nsubsystem = mem\npermissions = x\nid = nope\n"
        "[resource example.com/b]\nkernel = null\n"
        "[resource nope]\nsubsystem = mem\n"
        "[elsewhere]\n")
    assert len(messages) == 7, messages
    for fragment in ["[plugin] log_level = 'loud'", "[plugin] bogus", "[resource example.com/a] permissions = 'x'",
                     "[resource example.com/a] id = 'nope'", "[resource example.com/b] subsystem: missing",
                     "[resource nope]: resource name", "[elsewhere]: unknown section"]:
        assert sum(fragment in m for m in messages) == 1, (fragment, messages)


def test_all_errors_of_all_files_at_once():
    with pytest.raises(ConfigError) as info:
        config.parse([("/a.conf", "[plugin]\nlog_level = loud\n"),
                      ("/b.conf", "[plugin]\n[plugin]\n"),
                      ("/c.conf", "oops"),
                      ("/d.conf", "[resource example.com/x]\nsubsystem = mem\n"),
                      ("/e.conf", "[resource example.com/y]\nkernel = x\n")])
    messages = info.value.messages
    assert [m.split(":")[0] for m in messages] == ["/a.conf", "/b.conf", "/c.conf", "/e.conf"], messages


# --- several files: later [plugin] keys win, resources once ------------------------------------------


def test_later_plugin_keys_override_earlier_ones():
    cfg = config.parse([("/main.conf", "[plugin]\nlog_level = info\nregister_timeout = 3\n"),
                        ("/conf.d/10.conf", "[plugin]\nlog_level = debug\n"),
                        ("/conf.d/20.conf", "[plugin]\nevents = stderr\n[resource example.com/a]\nsubsystem = mem\n")])
    assert cfg.plugin == PluginConfig(log_level="debug", register_timeout=3.0, events="stderr")
    assert cfg.resources[0].source == "/conf.d/20.conf"
    assert cfg.sources == ("/main.conf", "/conf.d/10.conf", "/conf.d/20.conf")


def test_resource_in_two_files_names_both():
    with pytest.raises(ConfigError) as info:
        config.parse([("/main.conf", "[resource example.com/a]\nsubsystem = mem\n"),
                      ("/conf.d/10-a.conf", "[resource example.com/b]\nsubsystem = mem\n"),
                      ("/conf.d/20-a.conf", "[resource example.com/a]\nsubsystem = misc\n")])
    assert info.value.messages == [
        "/conf.d/20-a.conf: [resource example.com/a] is already defined in /main.conf"]


# --- load(): the main file and conf.d drop-ins --------------------------------------------------------


@pytest.fixture
def etc(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    return d


def test_load_reads_dropins_in_lexical_order(etc):
    main = etc / "udev-device-plugin.conf"
    main.write_text("[plugin]\nlog_level = info\nregister_timeout = 7\n")
    dropins = etc / "conf.d"
    dropins.mkdir()
    (dropins / "20-b.conf").write_text("[plugin]\nlog_level = warning\n[resource example.com/b]\nsubsystem = mem\n")
    (dropins / "10-a.conf").write_text("[plugin]\nlog_level = debug\n[resource example.com/a]\nsubsystem = mem\n")
    (dropins / "9-z.conf").write_text("[resource example.com/z]\nsubsystem = mem\n")
    # Not drop-ins: other suffixes, hidden files, package manager leftovers.
    (dropins / "README").write_text("not ini")
    (dropins / ".hidden.conf").write_text("not ini")
    (dropins / "30-c.conf.rpmnew").write_text("not ini")
    (dropins / "30-c.conf~").write_text("not ini")

    cfg = config.load(str(main))
    assert cfg.sources == (str(main), str(dropins / "10-a.conf"), str(dropins / "20-b.conf"),
                           str(dropins / "9-z.conf"))
    assert [r.name for r in cfg.resources] == ["example.com/a", "example.com/b", "example.com/z"]
    assert cfg.resource("example.com/b").source == str(dropins / "20-b.conf")
    assert cfg.plugin.log_level == "warning"  # the last drop-in wins
    assert cfg.plugin.register_timeout == 7.0  # not overridden


def test_load_without_dropin_dir(etc):
    main = etc / "main.conf"
    main.write_text("[resource example.com/a]\nsubsystem = mem\n")
    cfg = config.load(str(main))
    assert cfg.sources == (str(main),)
    assert [r.name for r in cfg.resources] == ["example.com/a"]


def test_load_relative_path(etc, monkeypatch):
    (etc / "main.conf").write_text("")
    (etc / "conf.d").mkdir()
    (etc / "conf.d" / "a.conf").write_text("[resource example.com/a]\nsubsystem = mem\n")
    monkeypatch.chdir(etc)
    cfg = config.load("main.conf")
    assert [r.name for r in cfg.resources] == ["example.com/a"]


def test_load_resource_in_two_dropins_names_both(etc):
    main = etc / "main.conf"
    main.write_text("")
    (etc / "conf.d").mkdir()
    first, second = etc / "conf.d" / "10-fpga.conf", etc / "conf.d" / "20-fpga.conf"
    first.write_text("[resource example.com/fpga]\nsubsystem = pci\n")
    second.write_text("[resource example.com/fpga]\nsubsystem = pci\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(main))
    assert info.value.messages == [f"{second}: [resource example.com/fpga] is already defined in {first}"]


def test_load_missing_main_file(etc):
    with pytest.raises(ConfigError) as info:
        config.load(str(etc / "absent.conf"))
    assert info.value.messages == [f"{etc / 'absent.conf'}: cannot read: No such file or directory"]


def test_load_dropin_dir_not_a_directory(etc):
    (etc / "main.conf").write_text("")
    (etc / "conf.d").write_text("a file")
    with pytest.raises(ConfigError) as info:
        config.load(str(etc / "main.conf"))
    assert info.value.messages == [f"{etc / 'conf.d'}: cannot list drop-ins: Not a directory"]


def test_load_reports_unreadable_and_invalid_files_together(etc):
    main = etc / "main.conf"
    main.write_text("[plugin]\n")
    (etc / "conf.d").mkdir()
    (etc / "conf.d" / "a.conf").write_bytes(b"[plugin]\nlog_level = \xff\xfe\n")
    (etc / "conf.d" / "b.conf").mkdir()
    (etc / "conf.d" / "c.conf").write_bytes(b"\xc3")
    with pytest.raises(ConfigError) as info:
        config.load(str(main))
    messages = info.value.messages
    assert len(messages) == 3, messages
    assert messages[0].startswith(f"{etc / 'conf.d' / 'a.conf'}: not UTF-8 text: invalid start byte at byte 21")
    assert messages[1].startswith(f"{etc / 'conf.d' / 'b.conf'}: cannot read: Is a directory")
    assert messages[2].startswith(f"{etc / 'conf.d' / 'c.conf'}: not UTF-8 text")


def test_load_shipped_example_config():
    path = os.path.join(os.path.dirname(config.__file__), "example.conf")
    cfg = config.load(path)
    assert "example.com/mem" in [r.name for r in cfg.resources]


# --- templates and globs --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, values, expected", [
    ("{devnode}", {"devnode": "/dev/null"}, "/dev/null"),
    ("/dev/fpga/{id}-{id}", {"id": "a"}, "/dev/fpga/a-a"),
    ("plain", {}, "plain"),
    ("{ids}", {"ids": "{count}", "count": "2"}, "{count}"),  # values are not templates themselves
])
def test_template_render(text, values, expected):
    assert Template(text).render(values) == expected


@pytest.mark.parametrize("value, globs, expected", [
    ("null", ("null",), True),
    ("null", ("zero", "n*"), True),
    ("loop10", ("loop[0-9]",), False),
    ("loop1", ("loop[0-9]",), True),
    ("Null", ("null",), False),  # case-sensitive even where the file system is not
    ("", ("*",), True),
    (None, ("*",), False),  # a missing value matches nothing
    ("x", (), False),
])
def test_matches_globs(value, globs, expected):
    assert config.matches_globs(value, globs) is expected


# --- no traceback, ever --------------------------------------------------------------------------------

VALID = """\
[plugin]
kubelet_dir = /var/lib/kubelet/device-plugins
log_level = debug
events = journal
register_timeout = 3
register_backoff_max = 30

[resource example.com/fpga]
subsystem = pci
kernel = 0000:*
devtype = x
driver = vfio-pci
property.ID_VENDOR_ID = 10ee
attribute.vendor = 0x10ee
id = attribute.serial
extra_devnodes = /dev/vfio/vfio
permissions = rwm
container_path = /dev/fpga/{id}
mounts = /var/lib/fpga/{ids}:/fpga:ro
env = FPGA_IDS={ids}
    FPGA_COUNT={count}
annotations = example.com/fpga={devnodes}
prestart_command = /usr/libexec/fpga-prep --fast
prestart_timeout = 5
health.attribute.status = ok
health.property.HEALTH = 1
health_command = /usr/libexec/fpga-check
health_interval = 60
health_timeout = 5
health_threshold = 3
"""

ALPHABET = list("[]=:%{}#;/\\\"'.-_ \n\t\r*?") + [
    "\x00", "\x0b", "\x0c", "\x85", "\u2028", "\u00b2", "\u0663", "\u00e9", "\ufeff", "\U0001f600",
    "[DEFAULT]", "[plugin]", "[resource ", "health_threshold", "{ids}", "{x}", "property.", "attribute.",
    "kubernetes.io/", "requests.", "\n  ", "nan", "1e999", "-0",
]


def _check_parse(text: str) -> None:
    try:
        result = config.parse([("/fuzz.conf", text)])
    except ConfigError as exc:
        assert exc.messages and all(isinstance(m, str) and m.startswith("/fuzz.conf") for m in exc.messages)
    else:
        assert isinstance(result, config.Config)


def test_valid_fuzz_seed_parses():
    cfg = parse(VALID)
    assert cfg.resources[0].health_threshold == 3 and cfg.plugin.events == "journal"


def test_fuzz_mutations_never_raise_anything_but_config_error():
    rng = random.Random(20240229)
    for _ in range(3000):
        text = list(VALID)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(text) + 1)
            op = rng.random()
            if op < 0.45:
                text.insert(pos, rng.choice(ALPHABET))
            elif op < 0.75 and text:
                del text[min(pos, len(text) - 1)]
            else:
                text.insert(pos, chr(rng.randrange(1, 0x2FFF)))
        _check_parse("".join(text))


def test_fuzz_garbage_never_raises_anything_but_config_error():
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 200)
        text = "".join(rng.choice(ALPHABET) if rng.random() < 0.5 else chr(rng.randrange(1, 0x10FFFF) % 0xD800)
                       for _ in range(n))
        # Garbage with no section header at all, and garbage below a valid header.
        for candidate in (text, RES_HEAD + text, "[plugin]\n" + text):
            _check_parse(candidate)


VALUE_PIECES = list("0123456789abcxyzABC/.*?[]{}:=-_ ,%'\"\\") + [
    "\u00b2", "\u0663", "\u00bd", "\u00e9", "\x00", "\t", "\n  ", "{ids}", "{id}", "{devnode}", "/dev/", "..", "rw",
    "m", "property.", "attribute.", "sys_name", "devnode", "nan", "inf", "1e9", "-", "0x", "ro", "/usr/bin/x"]


def test_fuzz_keys_with_random_values():
    """Every known key (and some unknown ones) with random values: each value path must refuse cleanly."""
    rng = random.Random(3)
    resource_keys = [k for k in config.RESOURCE_KEYS if "<" not in k] + [
        "property.ID_X", "attribute.vendor", "health.attribute.status", "health.property.H", "bogus"]
    plugin_keys = list(config.PLUGIN_KEYS) + ["bogus"]

    def value() -> str:
        return "".join(rng.choice(VALUE_PIECES) for _ in range(rng.randint(0, 5))).replace("\n", "\n  ")

    for _ in range(1500):
        lines = ["[plugin]"] + [f"{k} = {value()}" for k in rng.sample(plugin_keys, rng.randint(0, 3))]
        lines += [f"[resource example.com/{rng.choice(['a', 'b', 'c c', 'D'])}{rng.randint(0, 3)}]"]
        lines += [f"{k} = {value()}" for k in rng.sample(resource_keys, rng.randint(1, 8))]
        _check_parse("\n".join(lines) + "\n")


def test_fuzz_garbage_files_through_load(tmp_path):
    rng = random.Random(11)
    main = tmp_path / "main.conf"
    for _ in range(200):
        main.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 120))))
        try:
            config.load(str(main))
        except ConfigError as exc:
            assert all(m.startswith(str(main)) for m in exc.messages)


# --- control characters (NUL reached Allocate answers and made every exec fail) ---------------------

CONTROL_KEYS = [
    ("plugin", "kubelet_dir", "/var/lib/kubelet/{c}device-plugins"),
    ("plugin", "log_level", "in{c}fo"),
    ("plugin", "register_timeout", "5{c}0"),
    ("plugin", "health_workers", "8{c}0"),
    ("plugin", "strict_permissions", "y{c}es"),
    (SECTION, "subsystem", "m{c}em"),
    (SECTION, "kernel", "nu{c}ll"),
    (SECTION, "devtype", "di{c}sk"),
    (SECTION, "driver", "vfio{c}pci"),
    (SECTION, "property.ID_SERIAL", "a{c}b"),
    (SECTION, "attribute.vendor", "0x10{c}ee"),
    (SECTION, "health.attribute.enable", "1{c}1"),
    (SECTION, "health.property.OK", "1{c}1"),
    (SECTION, "id", "sys{c}_name"),
    (SECTION, "extra_devnodes", "/dev/vfio/{c}vfio"),
    (SECTION, "permissions", "r{c}w"),
    (SECTION, "container_path", "/dev/x/{c}{{name}}"),
    (SECTION, "mounts", "/a:/b{c}:ro"),
    (SECTION, "env", "A=b{c}c"),
    (SECTION, "annotations", "example.com/a=b{c}c"),
    (SECTION, "prestart_command", "/bin/true {c} x"),
    (SECTION, "health_command", "/bin/tr{c}ue"),
    (SECTION, "child_devnodes", "acc{c}el"),
    (SECTION, "vfio_group_devnode", "y{c}es"),
]


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9b", "\x0b", "\x0c", "\r", "\u2028",
                                  "\u2029"])
@pytest.mark.parametrize("section, key, template", CONTROL_KEYS)
def test_control_characters_are_refused_in_every_value(section, key, template, char):
    value = template.format(c=char)
    body = f"[{section}]\n" + ("" if section == "plugin" or key == "subsystem" else "subsystem = mem\n")
    body += f"{key} = {value}\n"
    messages = errors(body)
    assert len(messages) == 1, messages
    assert_names(messages[0], section, key, value, f"control character U+{ord(char):04X}")
    assert "accepted: printable text" in messages[0]


def test_trailing_whitespace_controls_are_stripped_like_spaces():
    # configparser strips values with str.strip(), which takes \r, \x0b, \x0c, \x85, \u2028 as spaces.
    assert resource("kernel = null\r\x0b\x0c\x85\u2028").kernel == ("null",)


def test_a_control_character_in_a_continuation_line_is_refused():
    message = one_error(RES_HEAD + "env = A=1\n  B=2\x00\n")
    assert_names(message, SECTION, "env", "A=1\nB=2\x00", "control character U+0000 at position 8")


@pytest.mark.parametrize("lines, attr, expected", [
    ("kernel = null\tzero", "kernel", ("null", "zero")),  # a tab separates globs as a space does
    ("env = A=x\ty", "env", (("A", Template("x\ty")),)),
    ("env = A=1\n  B=2", "env", (("A", Template("1")), ("B", Template("2")))),
    ("env = A=caf\u00e9 \u00b2", "env", (("A", Template("caf\u00e9 \u00b2")),)),  # printable non-ASCII is text
])
def test_tabs_newlines_and_printable_text_are_accepted(lines, attr, expected):
    assert getattr(resource(lines), attr) == expected


def test_control_characters_in_section_and_key_names_are_escaped_in_messages():
    messages = errors("[plug\x1bin]\n" + RES_HEAD + "ker\x1bnel = x\n")
    assert len(messages) == 2, messages
    assert all("\x1b" not in m for m in messages)
    assert messages[0].startswith(f"{SRC}: [plug\\x1bin]: unknown section")
    assert messages[1].startswith(f"{SRC}: [{SECTION}] ker\\x1bnel: unknown key")


def test_a_refused_subsystem_is_not_also_missing():
    assert one_error(RES_HEAD.replace("mem", "mem\x00")).startswith(f"{SRC}: [{SECTION}] subsystem = 'mem\\x00'")


def test_a_refused_command_still_counts_for_its_timeout():
    message = one_error(RES_HEAD + "health_command = /bin/x\x00\nhealth_interval = 60\n")
    assert_names(message, SECTION, "health_command", "/bin/x\x00", "control character U+0000")


# --- health_timeout below health_interval ------------------------------------------------------------


@pytest.mark.parametrize("lines, key, shown", [
    ("health_interval = 5", "health_interval", "health_timeout 10 (the default) is not below health_interval 5"),
    ("health_interval = 10", "health_interval", "health_timeout 10 (the default) is not below health_interval 10"),
    ("health_timeout = 30", "health_timeout", "health_timeout 30 is not below health_interval 30 (the default)"),
    ("health_timeout = 60", "health_timeout", "health_timeout 60 is not below health_interval 30 (the default)"),
    ("health_interval = 2\nhealth_timeout = 2", "health_timeout", "health_timeout 2 is not below health_interval 2"),
    ("health_interval = 0.2\nhealth_timeout = 0.5", "health_timeout",
     "health_timeout 0.5 is not below health_interval 0.2"),
])
def test_health_timeout_must_be_below_health_interval(lines, key, shown):
    message = one_error(RES_HEAD + "health_command = /bin/true\n" + lines)
    assert_names(message, SECTION, key, None, "accepted: a health_timeout shorter than health_interval")
    assert shown in message, message


@pytest.mark.parametrize("lines", [
    "",  # 10 < 30, both defaulted
    "health_interval = 10.5",
    "health_timeout = 29.9",
    "health_interval = 1\nhealth_timeout = 0.9",
])
def test_health_timeout_below_health_interval_is_accepted(lines):
    res = resource("health_command = /bin/true\n" + lines)
    assert res.health_timeout < res.health_interval


def test_health_timing_is_not_compared_when_a_value_is_bad():
    message = one_error(RES_HEAD + "health_command = /bin/true\nhealth_interval = soon\nhealth_timeout = 50\n")
    assert_names(message, SECTION, "health_interval", "soon", "greater than 0")


# --- new keys: health_workers, strict_permissions, child_devnodes, vfio_group_devnode ---------------


@pytest.mark.parametrize("value, expected", [("1", 1), ("8", 8), ("64", 64), ("1024", 1024), ("0064", 64)])
def test_health_workers(value, expected):
    assert parse(f"[plugin]\nhealth_workers = {value}\n").plugin.health_workers == expected


@pytest.mark.parametrize("value", ["0", "1025", "-1", "2.5", "eight", "\u00b2", "", "9" * 5000])
def test_bad_health_workers(value):
    message = one_error(f"[plugin]\nhealth_workers = {value}\n")
    assert_names(message, "plugin", "health_workers", value, "accepted: a whole number from 1 to 1024")


@pytest.mark.parametrize("value, expected", [("yes", True), ("no", False), ("No", False), ("true", True),
                                             ("off", False), ("1", True), ("0", False)])
def test_strict_permissions(value, expected):
    assert parse(f"[plugin]\nstrict_permissions = {value}\n").plugin.strict_permissions is expected


@pytest.mark.parametrize("value", ["", "maybe", "y", "2"])
def test_bad_strict_permissions(value):
    message = one_error(f"[plugin]\nstrict_permissions = {value}\n")
    assert_names(message, "plugin", "strict_permissions", value, "accepted: yes or no")


def test_strict_permissions_only_from_the_main_file():
    with pytest.raises(ConfigError) as info:
        config.parse([("/main.conf", "[plugin]\nstrict_permissions = yes\n"),
                      ("/conf.d/a.conf", "[plugin]\nstrict_permissions = no\n")])
    assert info.value.messages == [
        "/conf.d/a.conf: [plugin] strict_permissions: only read from the main file /main.conf, which decides "
        "how the drop-ins are judged; accepted: the key in the main file"]
    cfg = config.parse([("/main.conf", "[plugin]\nstrict_permissions = no\n"), ("/conf.d/a.conf", "")])
    assert cfg.plugin.strict_permissions is False


@pytest.mark.parametrize("value, expected", [
    ("none", ()),
    ("all", config.ALL_CHILDREN),
    ("accel", ("accel",)),
    ("accel drm accel", ("accel", "drm")),
    ("usb-serial tty scsi_generic", ("usb-serial", "tty", "scsi_generic")),
])
def test_child_devnodes(value, expected):
    assert resource(f"child_devnodes = {value}").child_devnodes == expected


def test_child_devnodes_default_is_none():
    res = resource("")
    assert res.child_devnodes == () and not res.grants_child("accel") and not res.grants_child(None)


@pytest.mark.parametrize("value, subsystem, granted", [
    ("all", "accel", True), ("all", None, True), ("accel drm", "drm", True), ("accel drm", "block", False),
    ("accel", "acce*", False), ("none", "block", False),
])
def test_grants_child(value, subsystem, granted):
    assert resource(f"child_devnodes = {value}").grants_child(subsystem) is granted


@pytest.mark.parametrize("value", ["", "all accel", "none accel", "acc*", "a/b", "all all", "m\u00e9m"])
def test_bad_child_devnodes(value):
    message = one_error(RES_HEAD + f"child_devnodes = {value}\n")
    assert_names(message, SECTION, "child_devnodes", value, "accepted: all, none, or udev subsystem names")


@pytest.mark.parametrize("value, expected", [("yes", True), ("no", False), ("on", True)])
def test_vfio_group_devnode(value, expected):
    assert resource(f"vfio_group_devnode = {value}").vfio_group_devnode is expected


def test_bad_vfio_group_devnode():
    message = one_error(RES_HEAD + "vfio_group_devnode = /dev/vfio\n")
    assert_names(message, SECTION, "vfio_group_devnode", "/dev/vfio", "accepted: yes or no")


def test_the_control_characters_refused_are_unicodes_cc_zl_and_zp():
    """_control's one expression is unicodedata's categories Cc, Zl and Zp (tab and newline aside), over
    every code point this Python knows."""
    import sys
    import unicodedata

    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        refused = ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Zl", "Zp")
        assert config._control(f"ab{ch}") == (2 if refused else None), hex(code)
