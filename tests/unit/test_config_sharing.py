"""config.py, the sharing and CDI keys: replicas, replica_policy, cdi, cdi_kind, cdi_only and [plugin]
cdi_spec_dir, their defaults, and the refusals that name the key."""

from __future__ import annotations

import pytest

from udev_device_plugin import config
from udev_device_plugin.config import PluginConfig

from .test_config import RES_HEAD, SRC, assert_names, errors, one_error, parse, resource

SECTION = "resource example.com/dev"


def test_defaults():
    r = resource("")
    assert (r.replicas, r.replica_policy, r.cdi, r.cdi_kind, r.cdi_only) == (1, "spread", False, "", False)
    assert PluginConfig().cdi_spec_dir == "/var/run/cdi" == config.PLUGIN_KEYS["cdi_spec_dir"][0]


@pytest.mark.parametrize("key, value, needs", [
    ("replicas", "1", ""),
    ("replica_policy", "spread", "replicas = 4"),
    ("cdi", "no", ""),
    ("cdi_only", "no", "cdi = yes"),
])
def test_documented_defaults_written_out_change_nothing(key, value, needs):
    assert config.RESOURCE_KEYS[key][0] == value
    assert resource(f"{needs}\n{key} = {value}") == resource(needs)


@pytest.mark.parametrize("value, expected", [("1", 1), ("2", 2), ("64", 64), ("0256", 256), (str(config.MAX_REPLICAS),
                                                                                              config.MAX_REPLICAS)])
def test_replicas(value, expected):
    assert resource(f"replicas = {value}").replicas == expected


@pytest.mark.parametrize("value", ["0", "-1", "257", "1000", "1e3", "2.5", "two", "+4", "\u0664", "4 5",
                                   "99999999999999999999"])
def test_bad_replicas_are_refused_naming_the_key(value):
    message = one_error(RES_HEAD + f"replicas = {value}\n")
    assert_names(message, SECTION, "replicas", value, f"a whole number from 1 (no sharing) to {config.MAX_REPLICAS}")
    assert "4 MiB" in message  # why the maximum


def test_empty_replicas_is_refused():
    assert_names(one_error(RES_HEAD + "replicas =\n"), SECTION, "replicas", "", "a whole number from 1")


@pytest.mark.parametrize("policy", ["spread", "pack"])
def test_replica_policy(policy):
    assert resource(f"replicas = 3\nreplica_policy = {policy}").replica_policy == policy


def test_bad_replica_policy():
    assert_names(one_error(RES_HEAD + "replicas = 2\nreplica_policy = random\n"), SECTION, "replica_policy", "random",
                 "accepted: spread or pack")
    assert_names(one_error(RES_HEAD + "replica_policy = pack\n"), SECTION, "replica_policy", None,
                 "only meaningful with replicas")


def test_cdi_kind_defaults_to_the_resource_name():
    r = resource("cdi = yes")
    assert (r.cdi, r.cdi_kind, r.cdi_only) == (True, "example.com/dev", False)
    r = resource("cdi = yes\ncdi_only = yes\ncdi_kind = vendor.example/serial-port_2")
    assert (r.cdi, r.cdi_kind, r.cdi_only) == (True, "vendor.example/serial-port_2", True)


@pytest.mark.parametrize("kind, accepted", [
    ("example.com", "must be vendor/class"),
    ("/fpga", "must be vendor/class"),
    ("example.com/", "must be vendor/class"),
    ("example.com/a/b", "exactly one '/'"),
    ("Example.com/fpga", "lowercase DNS subdomain starting with a letter"),
    ("3com.com/fpga", "lowercase DNS subdomain starting with a letter"),
    ("exa_mple.com/fpga", "lowercase DNS subdomain"),
    ("example.com./fpga", "lowercase DNS subdomain"),
    ("-example.com/fpga", "lowercase DNS subdomain"),
    ("example.com/fp.ga", "no '.'"),
    ("example.com/1fpga", "starting with a letter"),
    ("example.com/fpga-", "ending with a letter or digit"),
    ("example.com/fp=ga", "letters, digits, '-' and '_'"),
    ("example.com/" + "a" * 64, "1-63"),
    ("a" * 254 + "/fpga", "DNS subdomain"),
])
def test_bad_cdi_kind_is_refused_naming_the_key(kind, accepted):
    message = one_error(RES_HEAD + f"cdi = yes\ncdi_kind = {kind}\n")
    assert_names(message, SECTION, "cdi_kind", kind, accepted)
    assert "not a CDI kind" in message


@pytest.mark.parametrize("kind", ["example.com/fpga", "a/b", "x1.example-vendor.io/Class_9",
                                  "a" * 63 + "." + "a" * 63 + "/" + "b" * 63])
def test_good_cdi_kinds(kind):
    assert config.validate_cdi_kind(kind) is None


def test_a_resource_name_that_is_no_cdi_kind_needs_cdi_kind():
    text = "[resource example.com/my.dev]\nsubsystem = mem\ncdi = yes\n"
    message = one_error(text)
    assert_names(message, "resource example.com/my.dev", "cdi_kind", None, "accepted: cdi_kind = vendor.example/class")
    assert "'example.com/my.dev'" in message and "no '.'" in message
    assert parse(text + "cdi_kind = example.com/my-dev\n").resources[0].cdi_kind == "example.com/my-dev"


@pytest.mark.parametrize("extra", ["cdi_kind = example.com/x", "cdi_only = yes", "cdi = no\ncdi_only = yes",
                                   "cdi = no\ncdi_kind = example.com/x"])
def test_cdi_keys_need_cdi(extra):
    key = extra.split("\n")[-1].split(" ")[0]
    assert_names(one_error(RES_HEAD + extra + "\n"), SECTION, key, None, "only meaningful with cdi = yes")


def test_bad_cdi_boolean_is_reported_once():
    message = one_error(RES_HEAD + "cdi = sure\ncdi_only = yes\n")
    assert_names(message, SECTION, "cdi", "sure", "accepted: yes or no")


def test_two_resources_with_one_cdi_kind_are_refused_naming_both():
    files = [(SRC, "[resource example.com/a]\nsubsystem = mem\ncdi = yes\n"),
             ("/etc/udev-device-plugin/conf.d/b.conf",
              "[resource example.com/b]\nsubsystem = mem\ncdi = yes\ncdi_kind = example.com/a\n")]
    with pytest.raises(config.ConfigError) as info:
        config.parse(files)
    [message] = info.value.messages
    assert message.startswith("/etc/udev-device-plugin/conf.d/b.conf: [resource example.com/b] cdi_kind = "
                              "'example.com/a': already the CDI kind of [resource example.com/a] in " + SRC)
    # Without CDI on one of them there is no clash.
    files[0] = (SRC, "[resource example.com/a]\nsubsystem = mem\n")
    assert len(config.parse(files).resources) == 2


@pytest.mark.parametrize("value", ["/etc/cdi", "/var/run/cdi", "/srv/cdi specs"])
def test_cdi_spec_dir(value):
    assert parse(f"[plugin]\ncdi_spec_dir = {value}\n").plugin.cdi_spec_dir == value


@pytest.mark.parametrize("value", ["etc/cdi", "/etc/cdi/", "/etc/../cdi", ""])
def test_bad_cdi_spec_dir(value):
    assert_names(one_error(f"[plugin]\ncdi_spec_dir = {value}\n"), "plugin", "cdi_spec_dir", value,
                 "an absolute directory")


def test_every_problem_at_once():
    found = errors(RES_HEAD + "replicas = 0\nreplica_policy = nope\ncdi = yes\ncdi_kind = x\n")
    assert [m.split("] ", 1)[1].split(" ", 1)[0] for m in found] == ["replicas", "replica_policy", "cdi_kind"]
