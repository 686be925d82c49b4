"""The shipped files agree with the code: man page and shipped config cover every key, the unit
uses the daemon's exit status and signals, the spec takes its version from __version__."""

from __future__ import annotations

import configparser
import os
import re

import pytest

from udev_device_plugin import config
from udev_device_plugin.daemon import EXIT_CONFIG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(read("systemd", name))
    return parser


def roff_text(text: str) -> str:
    """The man page's words with font macros and escapes removed, as a reader sees them."""
    lines = []
    for line in text.splitlines():
        if line.startswith((".BI ", ".BR ", ".B ", ".IR ", ".I ", ".RB ")):
            line = "".join(re.findall(r'"[^"]*"|\S+', line.split(" ", 1)[1])).replace('"', "")
        lines.append(line.replace("\\-", "-"))
    return "\n".join(lines)


@pytest.mark.parametrize("key", sorted(config.PLUGIN_KEYS) + sorted(config.RESOURCE_KEYS))
def test_conf_man_page_documents_every_key(key: str) -> None:
    page = roff_text(read("man", "udev-device-plugin.conf.5"))
    documented = key.split("<")[0] if "<" in key else key + "="
    assert documented in page, f"{key} is not documented in man/udev-device-plugin.conf.5"


@pytest.mark.parametrize("key", sorted(config.PLUGIN_KEYS))
def test_shipped_config_shows_every_plugin_key_with_its_default(key: str) -> None:
    default = config.PLUGIN_KEYS[key][0]
    assert f"#{key} = {default}\n" in read("etc", "udev-device-plugin.conf")


@pytest.mark.parametrize("key", sorted(config.RESOURCE_KEYS))
def test_shipped_config_documents_every_resource_key(key: str) -> None:
    text = read("etc", "udev-device-plugin.conf")
    pattern = re.escape(key).replace("<NAME>", "[A-Z_]+").replace("<name>", "[a-z_]+")
    assert re.search(rf"^#{pattern} = ", text, re.M), f"{key} is not shown in etc/udev-device-plugin.conf"


def test_shipped_example_resource_is_valid_once_uncommented() -> None:
    text = read("etc", "udev-device-plugin.conf")
    start = text.index("#[resource example.com/fpga]")
    lines = [line[1:] for line in text[start:].splitlines() if line.startswith("#") and not line.startswith("##")]
    cfg = config.parse([("uncommented", "\n".join(lines) + "\n")])
    assert [r.name for r in cfg.resources] == ["example.com/fpga"]


def test_shipped_config_is_valid_and_sets_nothing() -> None:
    cfg = config.parse([("udev-device-plugin.conf", read("etc", "udev-device-plugin.conf"))])
    assert cfg.plugin == config.PluginConfig() and cfg.resources == ()


def test_service_unit_matches_the_daemon() -> None:
    svc = unit("udev-device-plugin.service")["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert svc["ExecStart"].startswith("/usr/bin/udev-device-plugin serve ")
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "PrivateDevices" not in svc, "the daemon hands out and stats device nodes"
    assert config.KUBELET_DIR in svc["ReadWritePaths"] and config.KUBELET_DIR in svc["ExecStartPre"]


def test_path_unit_watches_kubelet_sock_and_oneshot_sends_sigusr1() -> None:
    path = unit("udev-device-plugin-kubelet.path")["Path"]
    assert path["PathChanged"] == os.path.join(config.KUBELET_DIR, config.KUBELET_SOCKET)
    oneshot = unit("udev-device-plugin-kubelet.service")
    assert oneshot["Unit"]["StartLimitIntervalSec"] == "0"
    assert "--signal=SIGUSR1 udev-device-plugin.service" in oneshot["Service"]["ExecStart"]


def test_spec_version_has_one_source() -> None:
    spec = read("packaging", "rpm", "udev-device-plugin.spec")
    assert re.search(r"^Version:\s+%\{pkg_version\}$", spec, re.M)
