"""The command line as an admin uses it: bad configs refused by serve and check-config, list, inspect."""

from __future__ import annotations

import json
import os

import pytest

from .helpers import EXIT_CONFIG, LOOP, LOOP_CONF, LOOP_IDS, MEM, MEM_CONF, cli, our_sockets

RES = f"[resource {MEM}]\nsubsystem = mem\n"

# (config text, what the message must contain: the section and key, and the bad value where there is one)
BAD_CONFIGS = {
    "unknown-key": (RES + "colour = red\n", ["[resource example.com/mem] colour", "unknown key"]),
    "missing-subsystem": (f"[resource {MEM}]\nkernel = null\n", ["[resource example.com/mem] subsystem", "missing"]),
    "resource-name": ("[resource mem]\nsubsystem = mem\n", ["[resource mem]", "'mem'", "must contain '/'"]),
    "reserved-name": ("[resource kubernetes.io/mem]\nsubsystem = mem\n", ["kubernetes.io"]),
    "upper-case-prefix": ("[resource Example.com/mem]\nsubsystem = mem\n", ["'Example.com/mem'", "DNS subdomain"]),
    "permissions": (RES + "permissions = rwx\n", ["permissions = 'rwx'", "r, w and m"]),
    "log-level": ("[plugin]\nlog_level = loud\n" + RES, ["[plugin] log_level = 'loud'", "debug, info"]),
    "kubelet-dir": ("[plugin]\nkubelet_dir = var/lib/kubelet\n" + RES, ["[plugin] kubelet_dir", "absolute"]),
    "register-timeout": ("[plugin]\nregister_timeout = 0\n" + RES, ["register_timeout = '0'", "greater than 0"]),
    "events": ("[plugin]\nevents = syslog\n" + RES, ["events = 'syslog'", "journal"]),
    "container-path": (RES + "container_path = dev/{name}\n", ["container_path = 'dev/{name}'", "absolute"]),
    "template-variable": (RES + "container_path = /dev/{nope}\n", ["container_path", "{nope}", "{devnode}"]),
    "env": (RES + "env = 1BAD=x\n", ["[resource example.com/mem] env", "1BAD=x", "NAME=value"]),
    "env-variable": (RES + "env = IDS={devnode}\n", ["env", "{devnode}", "{ids}"]),
    "annotation-key": (RES + "annotations = bad key=x\n", ["annotations", "key=value"]),
    "mounts": (RES + "mounts = /only-one-path\n", ["mounts = '/only-one-path'", "/host/path:/container/path"]),
    "prestart-command": (RES + "prestart_command = true\n", ["prestart_command = 'true'", "absolute path"]),
    "prestart-timeout": (RES + "prestart_command = /bin/true\nprestart_timeout = 40\n",
                         ["prestart_timeout = '40'", "at most 29"]),
    "prestart-timeout-alone": (RES + "prestart_timeout = 5\n", ["prestart_timeout", "only meaningful"]),
    "health-threshold": (RES + "health_command = /bin/true\nhealth_threshold = 0\n",
                         ["health_threshold = '0'", "1 to 100"]),
    "health-attribute": (RES + "health.attribute.../x = 1\n", ["health.attribute.../x", "attribute.<name>"]),
    "id": (RES + "id = serial\n", ["id = 'serial'", "sys_name, devnode"]),
    "extra-devnodes": (RES + "extra_devnodes = /etc/passwd\n", ["extra_devnodes", "outside /dev"]),
    "duplicate-key": (RES + "subsystem = block\n", ["[resource example.com/mem] subsystem is given twice"]),
    "duplicate-section": (RES + RES, ["[resource example.com/mem] appears twice"]),
    "unknown-section": ("[plugins]\nlog_level = info\n" + RES, ["[plugins]", "unknown section"]),
    "default-section": ("[DEFAULT]\nsubsystem = mem\n" + RES, ["[DEFAULT]", "unknown section"]),
    "not-ini": ("subsystem = mem\n", ["section"]),
}


def write_config(directory, text: str, dropins=None) -> str:
    directory.mkdir(exist_ok=True)
    path = directory / "udev-device-plugin.conf"
    path.write_text(text)
    if dropins:
        (directory / "conf.d").mkdir()
        for name, body in dropins.items():
            (directory / "conf.d" / name).write_text(body)
    return str(path)


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_refused(tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    path = write_config(tmp_path / "etc", text)
    kubelet_dir = tmp_path / "never"

    served = cli("serve", "--config", path, "--kubelet-dir", str(kubelet_dir), timeout=20)
    assert served.returncode == EXIT_CONFIG, served.stderr
    for text in expected:
        assert text in served.stderr, f"{text!r} not in:\n{served.stderr}"
    assert path in served.stderr  # names the file
    assert "invalid configuration: not starting" in served.stderr
    assert "Traceback" not in served.stderr
    assert not kubelet_dir.exists()  # nothing created, let alone a socket

    checked = cli("check-config", "--config", path)
    assert checked.returncode == EXIT_CONFIG
    for text in expected:
        assert text in checked.stderr
    assert "invalid configuration: " in checked.stderr and "error(s)" in checked.stderr
    assert "Traceback" not in checked.stderr


def test_bad_config_with_a_kubelet_running(tmp_path, kubelet, kubelet_dir):
    path = write_config(tmp_path / "etc", MEM_CONF + "colour = red\n")
    served = cli("serve", "--config", path, "--kubelet-dir", kubelet_dir, timeout=20)
    assert served.returncode == EXIT_CONFIG
    assert os.listdir(kubelet_dir) == ["kubelet.sock"]
    assert kubelet.requests == []


def test_every_error_reported_at_once_across_dropins(tmp_path):
    path = write_config(tmp_path / "etc", "[plugin]\nlog_level = loud\n" + RES
                        + "[resource example.com/bad]\nsubsystem = mem\npermissions = x\n", {
        "10-loop.conf": LOOP_CONF + "driver =\n",
        "20-mem-again.conf": RES,
        "README": "not a drop-in, not read",
    })
    checked = cli("check-config", "--config", path)
    assert checked.returncode == EXIT_CONFIG
    err = checked.stderr
    assert "log_level = 'loud'" in err and "permissions = 'x'" in err
    assert str(tmp_path / "etc" / "conf.d" / "10-loop.conf") + f": [resource {LOOP}] driver" in err
    assert f"[resource {MEM}] is already defined in {path}" in err
    assert "invalid configuration: 4 error(s)" in err

    served = cli("serve", "--config", path, "--kubelet-dir", str(tmp_path / "never"), timeout=20)
    assert served.returncode == EXIT_CONFIG
    assert "invalid configuration: not starting (4 error(s))" in served.stderr


def test_check_config_valid_and_candidates(tmp_path):
    path = write_config(tmp_path / "etc", MEM_CONF, {"10-loop.conf": LOOP_CONF})
    checked = cli("check-config", "--config", path)
    assert checked.returncode == 0, checked.stderr
    assert "configuration valid: 2 resource(s) from 2 file(s)" in checked.stdout
    assert f"{MEM} ({path})" in checked.stdout

    # A candidate drop-in is checked in place of the installed one of the same name.
    candidate = tmp_path / "new" / "10-loop.conf"
    candidate.parent.mkdir()
    candidate.write_text(LOOP_CONF + "permissions = rwx\n")
    checked = cli("check-config", "--config", path, "--dropin", str(candidate))
    assert checked.returncode == EXIT_CONFIG
    assert f"{candidate}: [resource {LOOP}] permissions = 'rwx'" in checked.stderr
    candidate.write_text(LOOP_CONF.replace(LOOP, "example.com/loops"))
    checked = cli("check-config", "--config", path, "--dropin", str(candidate))
    assert checked.returncode == 0, checked.stderr
    assert "configuration valid: 2 resource(s)" in checked.stdout and "example.com/loops" in checked.stdout

    missing = cli("check-config", "--config", str(tmp_path / "nowhere.conf"))
    assert missing.returncode == EXIT_CONFIG and "cannot read" in missing.stderr


def test_list_json(tmp_path):
    path = write_config(tmp_path / "etc", MEM_CONF + "health.attribute.dev = 1:3 1:5\n" + LOOP_CONF)
    listed = cli("list", "--config", path, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["resource"]: r for r in json.loads(listed.stdout)["resources"]}
    assert set(rows) == {MEM, LOOP}
    mem = {d["id"]: d for d in rows[MEM]["devices"]}
    assert sorted(mem) == ["full", "null", "zero"]
    assert mem["null"]["devnodes"] == ["/dev/null"] and mem["null"]["numa_nodes"] == []
    assert mem["null"]["syspath"] == "/sys/devices/virtual/mem/null"
    assert (mem["null"]["health"], mem["zero"]["health"], mem["full"]["health"]) == ("Healthy", "Healthy",
                                                                                     "Unhealthy")
    assert "dev" in mem["full"]["reason"]
    assert [d["id"] for d in rows[LOOP]["devices"]] == LOOP_IDS
    assert rows[LOOP]["devices"][0]["devnodes"] == ["/dev/loop0"]
    assert rows[MEM]["problems"] == rows[LOOP]["problems"] == []

    text = cli("list", "--config", path)
    assert text.returncode == 0
    assert f"{MEM}: 3 device(s)" in text.stdout and f"{LOOP}: 8 device(s)" in text.stdout


def test_inspect_json(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(MEM_CONF + "prestart_command = /bin/true\n" + LOOP_CONF)
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live(LOOP, devices=8)
    report = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["kubelet_dir"] == kubelet_dir and data["unanswered"] == []
    rows = {r["resource"]: r for r in data["resources"]}
    assert set(rows) == {MEM, LOOP}
    for name, row in rows.items():
        assert row["registered"] is True and row["last_error"] == ""
        assert row["pid"] == daemon.pid
        assert os.path.basename(row["socket"]) == kubelet.endpoints(name)[-1]
    assert rows[MEM]["options"] == {"pre_start_required": True, "get_preferred_allocation_available": True}
    assert rows[LOOP]["options"] == {"pre_start_required": False, "get_preferred_allocation_available": True}
    assert {d["id"]: (d["health"], d["devnodes"]) for d in rows[MEM]["devices"]} == {
        "full": ("Healthy", ["/dev/full"]), "null": ("Healthy", ["/dev/null"]), "zero": ("Healthy", ["/dev/zero"])}
    assert [d["id"] for d in rows[LOOP]["devices"]] == LOOP_IDS

    # The human form says the same.
    text = cli("inspect", "--kubelet-dir", kubelet_dir)
    assert text.returncode == 0
    assert f"{MEM}: registered through the kubelet socket; stream connected since " in text.stdout
    assert f"pid {daemon.pid}" in text.stdout
    # Asking did not disturb the kubelet's streams or registrations.
    assert kubelet.connected(MEM) and kubelet.connected(LOOP) and len(kubelet.requests) == 2


def test_inspect_without_daemon(kubelet_dir):
    report = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
    assert report.returncode == 1
    assert "no udev-device-plugin socket answers" in report.stderr
    assert our_sockets(kubelet_dir) == []
