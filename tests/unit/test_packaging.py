"""The shipped files agree with the code: man page and shipped config cover every key, the unit
uses the daemon's exit status and signals, the spec takes its version from __version__ and requires
on RHEL 9 and RHEL 10 what setup.cfg requires."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from typing import Dict, Optional

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
    lines = read("systemd", "udev-device-plugin.service").splitlines()
    writable = [line.split("=", 1)[1] for line in lines if line.startswith("ReadWritePaths=")]
    created = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStartPre=")]
    # The kubelet's socket directory and the default cdi_spec_dir (/var/run is /run): created before the
    # sandbox is set up, writable in it.
    for directory in (config.KUBELET_DIR, config.CDI_SPEC_DIR.replace("/var/run/", "/run/")):
        assert f"-{directory}" in writable, writable
        assert any(c.startswith("+/usr/bin/mkdir -p ") and c.endswith(" " + directory) for c in created), created


def test_path_unit_watches_kubelet_sock_and_oneshot_sends_sigusr1() -> None:
    path = unit("udev-device-plugin-kubelet.path")["Path"]
    assert path["PathChanged"] == os.path.join(config.KUBELET_DIR, config.KUBELET_SOCKET)
    oneshot = unit("udev-device-plugin-kubelet.service")
    assert oneshot["Unit"]["StartLimitIntervalSec"] == "0"
    assert "--signal=SIGUSR1 udev-device-plugin.service" in oneshot["Service"]["ExecStart"]


def test_spec_version_has_one_source() -> None:
    spec = read("packaging", "rpm", "udev-device-plugin.spec")
    assert re.search(r"^Version:\s+%\{pkg_version\}$", spec, re.M)


def setup_cfg_floors() -> Dict[str, str]:
    """setup.cfg's install_requires (and python_requires) as the RPM names them: name -> floor."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(read("setup.cfg"))
    floors = {"python3": parser["options"]["python_requires"].strip().removeprefix(">=")}
    for line in parser["options"]["install_requires"].split():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line)
        assert match, f"setup.cfg install_requires: {line!r} is not NAME>=FLOOR"
        floors["python3-" + match.group(1).lower()] = match.group(2)
    return floors


def rpm_requires(rhel: Optional[int]) -> Dict[str, str]:
    """What the spec requires (name -> constraint) when built for RHEL ``rhel`` (None: Debian's rpmbuild)."""
    if shutil.which("rpmspec") is None:
        pytest.fail("rpmspec is missing: apt-get install rpm (or dnf install rpm-build)", pytrace=False)
    cmd = ["rpmspec", "-q", "--requires", "--define", "pkg_version 0.1.0",
           os.path.join(ROOT, "packaging", "rpm", "udev-device-plugin.spec")]
    if rhel is not None:
        # What python3-devel defines on RHEL; the spec refuses to build there without it.
        cmd[3:3] = ["--define", f"rhel {rhel}", "--define", f"dist .el{rhel}",
                    "--define", "python3_sitelib /usr/lib/python3/site-packages"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    requires = {}
    for line in proc.stdout.splitlines():
        name, _, constraint = line.partition(" ")
        if not name.startswith("/"):  # /bin/sh of the scriptlets
            requires[name] = constraint
    return requires


@pytest.mark.parametrize("rhel", [9, 10, None], ids=["el9", "el10", "debian"])
def test_rpm_requires_setup_cfgs_floors_on_each_distribution(rhel: Optional[int]) -> None:
    requires = rpm_requires(rhel)
    expected = {name: f">= {floor}" for name, floor in setup_cfg_floors().items()}
    expected["systemd"] = ""
    # EPEL 9 has python3-sdnotify; RHEL 10 has none (the daemon speaks sd_notify itself).
    if rhel == 9:
        expected["python3-sdnotify"] = ">= 0.3"
    assert requires == expected


def test_setup_cfg_floors_are_rhel9s() -> None:
    assert setup_cfg_floors() == {"python3": "3.9", "python3-grpcio": "1.46", "python3-protobuf": "3.14",
                                  "python3-pyudev": "0.22", "python3-click": "8.0"}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(read("setup.cfg"))
    assert parser["options.extras_require"]["sdnotify"].split() == ["sdnotify>=0.3"]
