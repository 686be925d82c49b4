"""The RPM, the units and the daemon under a real systemd (issue 4).

Every test boots a fresh container (about half a second), installs the RPM
built from this tree, starts a stand-in kubelet as ``kubelet.service`` and
configures the resource ``example.com/mem`` (the mem-class devices /dev/null
and /dev/zero, present in every container).  Each check prints one
``[integration]`` line to the terminal, with or without ``-s``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

from .container import Container, wait_for
from .log import say

UNIT = "udev-device-plugin.service"
PATH_UNIT = "udev-device-plugin-kubelet.path"
ONESHOT = "udev-device-plugin-kubelet.service"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
STATE_FILE = "/run/standin.json"
RESOURCE = "example.com/mem"
MAIN_CONF = "/etc/udev-device-plugin/udev-device-plugin.conf"
TEST_CONF = "/etc/udev-device-plugin/conf.d/test.conf"
DROPIN_DIR = f"/etc/systemd/system/{UNIT}.d"

# The node's kubelet: the test stand-in (tests/standin.py, not in the RPM), copied in and run by
# the container's python3 with the api module of the installed package, as a unit of its own so
# that "systemctl restart kubelet" is a kubelet restart.  No start limit: the storm test restarts
# it ten times in a few seconds.
STANDIN_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "standin.py")
STANDIN = "/usr/local/lib/udp-test/standin.py"
KUBELET_UNIT = f"""[Unit]
Description=stand-in kubelet (integration test)
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/bin/python3 {STANDIN} --kubelet-dir {{dir}} --state-file {{state}}
"""

MEM_CONF = f"""[resource {RESOURCE}]
subsystem = mem
kernel = null zero
"""

_names = itertools.count(1)


class Node:
    """A booted container with the RPM installed: the daemon's host, seen from outside."""

    def __init__(self, ct: Container, kubelet_dir: str = KUBELET_DIR) -> None:
        self.ct = ct
        self.kubelet_dir = kubelet_dir

    # -- units

    def prop(self, prop: str, unit: str = UNIT) -> str:
        return self.ct.unit_property(unit, prop)

    def active(self, unit: str = UNIT) -> bool:
        return self.prop("ActiveState", unit) == "active"

    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def n_restarts(self) -> int:
        return int(self.prop("NRestarts"))

    def timestamp(self, prop: str, unit: str = UNIT) -> float:
        """A unit timestamp property as seconds since the epoch (microsecond precision)."""
        text = self.ct.run("systemctl", "show", "-P", prop, "--timestamp=us+utc", unit).stdout.strip()
        when = datetime.datetime.strptime(text, "%a %Y-%m-%d %H:%M:%S.%f UTC")
        return when.replace(tzinfo=datetime.timezone.utc).timestamp()

    def add_dropin(self, name: str, text: str) -> None:
        self.ct.write_file(f"{DROPIN_DIR}/{name}.conf", text)
        self.ct.systemctl("daemon-reload")

    def journal(self, *args: str) -> List[Dict[str, Any]]:
        return self.ct.journal(*args)

    def messages(self, unit: str = UNIT) -> List[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal("-u", unit)]

    def wait_message(self, text: str, timeout: float = 15, unit: str = UNIT) -> None:
        wait_for(lambda: any(text in m for m in self.messages(unit)), timeout, f"{unit} to log {text!r}")

    # -- the stand-in kubelet's view

    def state(self) -> Dict[str, Any]:
        try:
            return json.loads(self.ct.read_file(STATE_FILE))
        except (FileNotFoundError, ValueError):
            return {}

    def registration(self, since: float = 0.0) -> Optional[Dict[str, Any]]:
        """The live registration of RESOURCE with the kubelet running now, made after ``since``.

        Live: the kubelet holds a connected ListAndWatch stream to the endpoint
        it was registered with, that endpoint's socket exists, and the
        registration happened after this kubelet started.
        """
        state = self.state()
        res = state.get("resources", {}).get(RESOURCE)
        if not res or not res["connected"]:
            return None
        regs = [r for r in state["registrations"] if r["resource"] == RESOURCE and r["endpoint"] == res["endpoint"]
                and r["time"] >= max(state["started"], since)]
        if not regs or not os.path.exists(self.ct.host_path(f"{self.kubelet_dir}/{res['endpoint']}")):
            return None
        return dict(regs[-1], devices=res["devices"], kubelet_started=state["started"])

    def wait_registered(self, what: str, since: float = 0.0, timeout: float = 20) -> Dict[str, Any]:
        reg = wait_for(lambda: self.registration(since), timeout, f"{RESOURCE} registered ({what})")
        return reg

    def devices(self) -> Dict[str, str]:
        res = self.state().get("resources", {}).get(RESOURCE, {})
        return {d["id"]: d["health"] for d in res.get("devices", [])}

    def restart_kubelet(self) -> float:
        """Restart the stand-in kubelet (it clears the socket directory); return its start time."""
        before = self.state().get("started")
        self.ct.systemctl("restart", "kubelet.service")
        return float(wait_for(lambda: self.state().get("started") != before and self.state().get("started"),
                              10, "the restarted kubelet to write its state"))

    def start_daemon(self) -> Dict[str, Any]:
        self.ct.systemctl("start", UNIT)
        return self.wait_registered("after start")


@pytest.fixture
def node(cached_rootfs: str, rpms: Dict[str, str]) -> Iterator[Node]:
    with Container(f"udp-it-{os.getpid()}-{next(_names)}", log=say) as ct:
        ct.install_rpm(rpms["1"])
        ct.copy_in(STANDIN_SOURCE, STANDIN)
        ct.write_file("/etc/systemd/system/kubelet.service", KUBELET_UNIT.format(dir=KUBELET_DIR, state=STATE_FILE))
        ct.write_file(TEST_CONF, MEM_CONF)
        ct.systemctl("daemon-reload")
        ct.systemctl("start", "kubelet.service")
        n = Node(ct)
        wait_for(lambda: n.state().get("started"), 15, "the stand-in kubelet to start")
        yield n


def hold(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Assert ``predicate`` stays true for ``seconds`` (proving that something does *not* happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(0.2)


def test_units_verify_clean(node: Node) -> None:
    out = node.ct.run("systemd-analyze", "verify", UNIT, PATH_UNIT, ONESHOT, check=False)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out
    say("systemd-analyze verify: the three units are clean (man pages resolve, binaries exist)")


def test_start_is_active_only_through_ready(node: Node) -> None:
    reg = node.start_daemon()
    assert node.active()
    # The daemon sends READY=1 only after the kubelet accepted its registration:
    # process start < registration (the kubelet's clock) <= unit active.
    forked, active = node.timestamp("ExecMainStartTimestamp"), node.timestamp("ActiveEnterTimestamp")
    assert forked < reg["time"] <= active, (forked, reg, active)
    say(f"systemctl start: process started at {forked:.3f}, kubelet accepted the registration at "
        f"{reg['time']:.3f}, unit active at {active:.3f}")
    status = node.ct.run("systemctl", "status", "--no-pager", UNIT).stdout
    status_line = next((line.strip() for line in status.splitlines() if line.strip().startswith("Status:")), "")
    assert "registered" in status_line, status
    say(f"systemctl status shows the daemon's STATUS=: {status_line}")

    # Negative control: without NOTIFY_SOCKET the daemon cannot send READY=1,
    # and systemd must not consider it started.
    node.ct.systemctl("stop", UNIT)
    node.add_dropin("no-notify", "[Service]\nUnsetEnvironment=NOTIFY_SOCKET\nTimeoutStartSec=3s\nRestart=no\n")
    started = time.monotonic()
    out = node.ct.systemctl("start", UNIT, check=False)
    assert out.returncode != 0 and node.prop("Result") == "timeout", (out, node.prop("Result"))
    say(f"negative control: without READY=1 the start times out ({time.monotonic() - started:.1f}s, "
        f"Result={node.prop('Result')})")


def test_kubelet_restart_fires_path_unit_and_reregisters(node: Node) -> None:
    first = node.start_daemon()
    assert node.prop("SubState", PATH_UNIT) == "waiting"
    before = node.prop("InvocationID", ONESHOT)
    started = node.restart_kubelet()
    reg = node.wait_registered("after a kubelet restart", since=started)
    assert reg["endpoint"] != first["endpoint"], "a new socket per registration"
    wait_for(lambda: node.prop("InvocationID", ONESHOT) not in ("", before), 10, "the path unit to start the oneshot")
    node.wait_message("SIGUSR1 received")
    assert node.prop("Result", ONESHOT) == "success"
    say(f"kubelet restart: {PATH_UNIT} started {ONESHOT} (SIGUSR1 to the daemon) and the daemon registered "
        f"again as {reg['endpoint']}")


def test_restart_storm_keeps_path_unit_and_registration(node: Node) -> None:
    node.start_daemon()
    t0 = time.monotonic()
    latencies = []
    for i in range(10):
        t = time.monotonic()
        started = node.restart_kubelet()
        node.wait_registered(f"kubelet restart {i + 1}/10", since=started, timeout=10)
        latencies.append(time.monotonic() - t)
    total = time.monotonic() - t0
    assert total <= 10, f"10 restarts took {total:.1f}s"
    # "running" while the oneshot of the last restart runs; then back to waiting.
    wait_for(lambda: node.prop("SubState", PATH_UNIT) == "waiting", 10, f"{PATH_UNIT} to wait again")
    assert node.prop("ActiveState", PATH_UNIT) == "active" and node.prop("Result", PATH_UNIT) == "success"
    assert node.prop("ActiveState", ONESHOT) != "failed"
    assert node.active()
    say(f"10 kubelet restarts in {total:.1f}s, each registered again (slowest {max(latencies):.2f}s); "
        f"{PATH_UNIT} still active (waiting), {ONESHOT} never failed")


def test_oneshot_quiet_when_daemon_not_running(node: Node) -> None:
    node.ct.systemctl("start", PATH_UNIT)
    before = node.prop("InvocationID", ONESHOT)
    node.restart_kubelet()
    wait_for(lambda: node.prop("InvocationID", ONESHOT) not in ("", before), 10, "the path unit to fire")
    wait_for(lambda: node.prop("ActiveState", ONESHOT) == "inactive", 10, "the oneshot to finish")
    assert node.prop("Result", ONESHOT) == "exec-condition"
    assert node.prop("ActiveState", PATH_UNIT) == "active"
    failed = node.ct.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout.strip()
    assert not failed, failed
    say(f"daemon stopped: {ONESHOT} is skipped (Result=exec-condition), nothing failed, path unit active")


def test_kill_9_restarts_and_reregisters(node: Node) -> None:
    node.start_daemon()
    pid, restarts = node.main_pid(), node.n_restarts()
    killed = time.time()
    node.ct.run("kill", "-9", str(pid))
    wait_for(lambda: node.n_restarts() == restarts + 1 and node.active() and node.main_pid() not in (0, pid),
             20, "systemd to restart the daemon")
    reg = node.wait_registered("after kill -9", since=killed)
    say(f"kill -9 {pid}: restarted as PID {node.main_pid()} (NRestarts={node.n_restarts()}), "
        f"registered again as {reg['endpoint']}")


def test_kubelet_dir_removed_under_the_sandbox_exits_and_systemd_restarts_it(node: Node) -> None:
    """The socket directory removed and recreated (kubeadm reset, rm -rf /var/lib/kubelet): in the
    unit's mount namespace the new one is not writable (ReadWritePaths= bound the old one).  The daemon
    exits 1 saying why; systemd restarts it in a new namespace, where it serves and registers."""
    node.start_daemon()
    pid, restarts = node.main_pid(), node.n_restarts()
    removed = time.time()
    node.ct.run("systemctl", "stop", "kubelet.service")
    # The daemon may put a new socket in while rm empties it: retry, then make the new directory.
    node.ct.run("sh", "-c", f"for i in 1 2 3 4 5; do rm -rf {KUBELET_DIR} && break; done; "
                            f"mkdir -p -m 0750 {KUBELET_DIR}")
    node.ct.systemctl("start", "kubelet.service")
    wait_for(lambda: node.n_restarts() >= restarts + 1 and node.active() and node.main_pid() not in (0, pid),
             30, "systemd to restart the daemon that exited")
    node.wait_message("exiting so that a restart can serve again")
    reg = node.wait_registered("after the restart in a new namespace", since=removed)
    say(f"{KUBELET_DIR} removed and recreated: PID {pid} exited, restarted as PID {node.main_pid()} "
        f"(NRestarts={node.n_restarts()}), registered again as {reg['endpoint']}")


def test_hung_main_loop_is_killed_by_watchdog(node: Node) -> None:
    node.add_dropin("watchdog", "[Service]\nWatchdogSec=2s\n")
    node.start_daemon()
    assert node.prop("WatchdogUSec") == "2s"
    pid, restarts = node.main_pid(), node.n_restarts()
    stopped = time.time()
    node.ct.run("kill", "-STOP", str(pid))
    wait_for(lambda: node.n_restarts() == restarts + 1 and node.active() and node.main_pid() not in (0, pid),
             30, "the watchdog to kill and restart the daemon")
    node.wait_message("Watchdog timeout")
    reg = node.wait_registered("after the watchdog restart", since=stopped)
    say(f"SIGSTOP {pid}: watchdog timeout after 2s, restarted as PID {node.main_pid()}, "
        f"registered again as {reg['endpoint']}")


def test_reload_applies_config_and_refuses_invalid(node: Node) -> None:
    node.start_daemon()
    wait_for(lambda: sorted(node.devices()) == ["null", "zero"], 10, "the kubelet to see null and zero")
    pid = node.main_pid()
    node.ct.write_file(TEST_CONF, MEM_CONF.replace("kernel = null zero", "kernel = null zero full"))
    node.ct.systemctl("reload", UNIT)
    wait_for(lambda: sorted(node.devices()) == ["full", "null", "zero"], 15, "the kubelet to see /dev/full")
    node.wait_registered("after reload")
    assert node.main_pid() == pid and node.active()
    say(f"systemctl reload: the new config applies in PID {pid} (kubelet sees {sorted(node.devices())})")

    node.ct.write_file(TEST_CONF, MEM_CONF + "bogus_key = 1\n")
    out = node.ct.systemctl("reload", UNIT, check=False)
    assert out.returncode != 0, "systemctl reload must fail visibly on an invalid config"
    wait_for(lambda: any("bogus_key" in m for m in node.messages()), 10, "the check-config error in the journal")
    assert node.main_pid() == pid and node.active() and sorted(node.devices()) == ["full", "null", "zero"]
    say("systemctl reload with an invalid config: the reload fails (ExecReload check-config), "
        "the error is in journalctl -u, the daemon keeps running its config")

    # A SIGHUP that reaches the daemon anyway (kill -HUP by hand): it refuses and keeps its config too.
    node.ct.systemctl("kill", "--kill-who=main", "--signal=SIGHUP", UNIT)
    node.wait_message("reload refused")
    wait_for(lambda: node.active(), 10, "the daemon to be active again after the refused reload")
    assert node.main_pid() == pid and sorted(node.devices()) == ["full", "null", "zero"]
    say("SIGHUP with an invalid config: refused and logged by the daemon, the running config is kept")


def test_invalid_config_fails_start_without_restart_loop(node: Node) -> None:
    node.ct.write_file(TEST_CONF, MEM_CONF + "bogus_key = 1\n")
    out = node.ct.systemctl("start", UNIT, check=False)
    assert out.returncode != 0
    assert node.prop("ActiveState") == "failed" and node.prop("ExecMainStatus") == "78", node.prop("Result")
    errors = [m for m in node.messages() if "bogus_key" in m]
    assert errors and TEST_CONF in errors[0], node.messages()
    # RestartSec=1s: a restart loop would show within 3 s.
    hold(lambda: node.n_restarts() == 0 and node.prop("ActiveState") == "failed", 3, "failed without restarts")
    say(f"invalid config: start fails with status 78, journalctl -u shows {errors[0]!r}, NRestarts stays 0 for 3s")


def test_other_kubelet_dir_with_documented_dropins(node: Node) -> None:
    # The drop-ins udev-device-plugin(8) and docs/INSTALL-RHEL.md give for a
    # kubelet directory elsewhere; the daemon starts before that directory exists.
    other = "/var/lib/k0s/kubelet/device-plugins"
    node.ct.systemctl("stop", "kubelet.service")
    node.add_dropin("kubelet-dir", f"[Service]\nExecStartPre=+/usr/bin/mkdir -p -m 0750 {other}\n"
                                   f"ReadWritePaths=-{other}\n")
    node.ct.write_file(f"/etc/systemd/system/{PATH_UNIT}.d/kubelet-dir.conf",
                       f"[Path]\nPathChanged=\nPathChanged={other}/kubelet.sock\n")
    node.ct.write_file(TEST_CONF, f"[plugin]\nkubelet_dir = {other}\n\n" + MEM_CONF)
    node.ct.write_file("/etc/systemd/system/kubelet.service", KUBELET_UNIT.format(dir=other, state=STATE_FILE))
    node.ct.systemctl("daemon-reload")
    node.ct.run("rm", "-f", STATE_FILE)
    assert not os.path.exists(node.ct.host_path(other))
    node.ct.systemctl("start", UNIT)
    assert node.active() and "waiting for the kubelet" in node.prop("StatusText"), node.prop("StatusText")
    say(f"no kubelet yet: active with STATUS={node.prop('StatusText')!r}; {other} created by the ExecStartPre drop-in")
    node.kubelet_dir = other
    node.ct.systemctl("start", "kubelet.service")
    first = node.wait_registered(f"in {other}")
    before = node.prop("InvocationID", ONESHOT)
    started = node.restart_kubelet()
    reg = node.wait_registered(f"after a kubelet restart in {other}", since=started)
    wait_for(lambda: node.prop("InvocationID", ONESHOT) not in ("", before), 10, "the path unit drop-in to fire")
    say(f"kubelet in {other}: registered as {first['endpoint']}, after its restart the path unit fired and "
        f"the daemon registered as {reg['endpoint']}")


HEALTH_SCRIPT = """#!/bin/sh
# Unhealthy while the test's flag file for this device exists.
if [ -e "/run/udp-test/sick-$1" ]; then echo "flagged by the test"; exit 1; fi
exit 0
"""


def test_health_events_in_journal(node: Node) -> None:
    node.ct.write_file("/usr/local/bin/udp-test-health", HEALTH_SCRIPT, mode=0o755)
    node.ct.write_file("/run/udp-test/.keep", "")
    node.ct.write_file(TEST_CONF, MEM_CONF + "health_command = /usr/local/bin/udp-test-health\n"
                                             "health_interval = 0.5\nhealth_timeout = 0.4\n")
    node.start_daemon()

    def events(kind: str, dev: str) -> List[Dict[str, Any]]:
        return [e for e in node.journal("-u", UNIT) if e.get("EVENT") == kind and e.get("DEVICE_ID") == dev]

    added = wait_for(lambda: events("ADDED", "zero"), 10, "the ADDED event")[0]
    assert (added["RESOURCE"], added["DEVNODE"], added["HEALTH"]) == (RESOURCE, "/dev/zero", "Healthy"), added
    say(f"journal: {added['MESSAGE']!r} with RESOURCE, DEVICE_ID, DEVNODE, HEALTH, MESSAGE_ID")

    node.ct.write_file("/run/udp-test/sick-zero", "")
    sick = wait_for(lambda: events("UNHEALTHY", "zero"), 15, "the UNHEALTHY event")[0]
    assert sick["HEALTH"] == "Unhealthy" and "flagged by the test" in sick["REASON"], sick
    assert sick["PRIORITY"] == "4" and sick["SYSLOG_IDENTIFIER"] == "udev-device-plugin" and sick["MESSAGE_ID"]
    wait_for(lambda: node.devices().get("zero") == "Unhealthy", 10, "the kubelet to see zero unhealthy")
    # The query docs/INSTALL-RHEL.md and the man page give admins.
    query = node.journal("SYSLOG_IDENTIFIER=udev-device-plugin", "HEALTH=Unhealthy")
    assert [e["DEVICE_ID"] for e in query] == ["zero"], query
    say(f"journal: {sick['MESSAGE']!r} (PRIORITY=4, REASON={sick['REASON']!r}); "
        "'journalctl SYSLOG_IDENTIFIER=udev-device-plugin HEALTH=Unhealthy' finds exactly it")

    node.ct.run("rm", "/run/udp-test/sick-zero")
    back = wait_for(lambda: events("RECOVERED", "zero"), 15, "the RECOVERED event")[0]
    wait_for(lambda: node.devices().get("zero") == "Healthy", 10, "the kubelet to see zero healthy again")
    say(f"journal: {back['MESSAGE']!r}; the kubelet sees zero Healthy again")


def test_removed_device_node_is_a_health_event(node: Node) -> None:
    # /dev in the container is its own tmpfs: moving /dev/full away harms nothing outside.
    node.ct.write_file(TEST_CONF, MEM_CONF.replace("kernel = null zero", "kernel = null zero full"))
    node.start_daemon()
    wait_for(lambda: node.devices().get("full") == "Healthy", 10, "the kubelet to see full healthy")

    def events(kind: str) -> List[Dict[str, Any]]:
        return [e for e in node.journal("-u", UNIT) if e.get("EVENT") == kind and e.get("DEVICE_ID") == "full"]

    node.ct.run("mv", "/dev/full", "/dev/full.away")
    sick = wait_for(lambda: events("UNHEALTHY"), 15, "the UNHEALTHY event for /dev/full")[0]
    assert sick["DEVNODE"] == "/dev/full" and "/dev/full" in sick["REASON"], sick
    wait_for(lambda: node.devices().get("full") == "Unhealthy", 10, "the kubelet to see full unhealthy")
    say(f"device node removed inside the sandboxed service's view: {sick['MESSAGE']!r}")
    node.ct.run("mv", "/dev/full.away", "/dev/full")
    back = wait_for(lambda: events("RECOVERED"), 15, "the RECOVERED event for /dev/full")[0]
    wait_for(lambda: node.devices().get("full") == "Healthy", 10, "the kubelet to see full healthy again")
    say(f"device node back: {back['MESSAGE']!r}")


def test_rpm_upgrade_restarts_daemon_and_keeps_config(node: Node, rpms: Dict[str, str]) -> None:
    node.ct.systemctl("enable", "--now", UNIT, PATH_UNIT)
    node.wait_registered("before the upgrade")
    pid, invocation = node.main_pid(), node.prop("InvocationID")
    edited = node.ct.read_file(MAIN_CONF).replace("#log_level = info", "log_level = debug")
    assert "log_level = debug" in edited
    node.ct.write_file(MAIN_CONF, edited)
    upgraded = time.time()
    node.ct.install_rpm(rpms["2"])
    assert node.ct.run("rpm", "-q", "udev-device-plugin").stdout.strip().endswith("-2.noarch")
    wait_for(lambda: node.active() and node.prop("InvocationID") != invocation, 20, "the daemon to be restarted")
    reg = node.wait_registered("after the upgrade", since=upgraded)
    assert node.ct.read_file(MAIN_CONF) == edited
    leftovers = node.ct.run("find", "/etc/udev-device-plugin", "-name", "*.rpm*").stdout.strip()
    assert not leftovers, leftovers
    assert node.active(PATH_UNIT)
    say(f"rpm -U to release 2: daemon restarted (PID {pid} -> {node.main_pid()}), registered as {reg['endpoint']}, "
        "edited config kept as is")


def test_rpm_erase_stops_and_disables_units(node: Node) -> None:
    node.ct.systemctl("enable", "--now", UNIT, PATH_UNIT)
    node.wait_registered("before erase")
    pid = node.main_pid()
    node.ct.remove_rpm("udev-device-plugin")
    for unit in (UNIT, PATH_UNIT):
        assert node.ct.systemctl("is-active", unit, check=False).stdout.strip() in ("inactive", "unknown")
        assert node.ct.systemctl("is-enabled", unit, check=False).returncode != 0
    wants = node.ct.run("find", "/etc/systemd/system", "-name", "udev-device-plugin*").stdout.strip()
    assert not wants, wants
    assert node.ct.run("kill", "-0", str(pid), check=False).returncode != 0, f"PID {pid} still runs"
    sockets = sorted(os.listdir(node.ct.host_path(KUBELET_DIR)))
    assert sockets == ["kubelet.sock"], sockets
    say(f"rpm -e: both units stopped and disabled, PID {pid} gone, only kubelet.sock left in {KUBELET_DIR}")


CDI_SPEC = "udev-device-plugin-example.com_mem.json"


def test_cdi_specs_under_the_sandbox(node: Node) -> None:
    """ProtectSystem=strict: the unit makes the default cdi_spec_dir (/run/cdi) writable; another directory
    is refused by the reload's check-config (which runs in the same sandbox) and logged by the daemon, which
    serves on, until the drop-in udev-device-plugin(8) gives is in place."""
    node.ct.write_file(TEST_CONF, MEM_CONF + "replicas = 2\ncdi = yes\n")
    node.start_daemon()
    spec = f"/run/cdi/{CDI_SPEC}"
    wait_for(lambda: os.path.exists(node.ct.host_path(spec)), 10, f"{spec} in the container")
    data = json.loads(node.ct.read_file(spec))
    assert [d["name"] for d in data["devices"]] == ["null::0", "null::1", "zero::0", "zero::1"]
    assert oct(os.stat(node.ct.host_path(spec)).st_mode & 0o777) == "0o644"
    # The spec is written when the devices are published; the stand-in has them once it read their list.
    wait_for(lambda: sorted(node.devices()) == ["null::0", "null::1", "zero::0", "zero::1"], 10,
             "the four replica IDs at the stand-in kubelet")
    say(f"CDI: {spec} written under ProtectSystem=strict, mode 0644, {len(data['devices'])} CDI devices")

    # /etc/cdi is read-only in the sandbox: systemctl reload refuses it (check-config, naming the key).
    pid = node.main_pid()
    node.ct.write_file(TEST_CONF, "[plugin]\ncdi_spec_dir = /etc/cdi\n\n" + MEM_CONF + "cdi = yes\n")
    out = node.ct.systemctl("reload", UNIT, check=False)
    assert out.returncode != 0
    wait_for(lambda: any("cdi_spec_dir = '/etc/cdi'" in m and "read-only file system" in m for m in node.messages()),
             10, "check-config's refusal in the journal")
    assert node.main_pid() == pid and os.path.exists(node.ct.host_path(spec))
    # Started with it anyway: the daemon logs why, serves on, and the old spec is gone with the old process.
    node.ct.systemctl("restart", UNIT)
    node.wait_message("[plugin] cdi_spec_dir")
    assert any("/etc/cdi" in m and "ReadWritePaths=" in m for m in node.messages())
    node.wait_registered("with an unwritable cdi_spec_dir")
    assert node.active() and not os.path.exists(node.ct.host_path(spec))
    say("CDI: cdi_spec_dir = /etc/cdi without a drop-in: reload refused by check-config; serve logs it, "
        "naming the key and ReadWritePaths=, and serves on")

    # The documented drop-in: written there.
    node.add_dropin("cdi-dir", "[Service]\nExecStartPre=+/usr/bin/mkdir -p -m 0755 /etc/cdi\n"
                               "ReadWritePaths=-/etc/cdi\n")
    node.ct.systemctl("restart", UNIT)
    node.wait_registered("with the /etc/cdi drop-in")
    wait_for(lambda: os.path.exists(node.ct.host_path(f"/etc/cdi/{CDI_SPEC}")), 10, "the spec in /etc/cdi")
    node.ct.systemctl("stop", UNIT)
    assert not os.path.exists(node.ct.host_path(f"/etc/cdi/{CDI_SPEC}"))
    say("CDI: with the drop-in the spec is in /etc/cdi, and systemctl stop removes it")
