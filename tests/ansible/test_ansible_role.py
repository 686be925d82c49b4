"""The Ansible role ``udev_device_plugin`` and the rollout playbook, linted and applied for real.

Static checks (no root): ansible-lint with the production profile, ``ansible-playbook
--syntax-check``, and the argument specs refusing bad variables before any task.

Applied (root: debootstrap, nspawn): ``ansible/playbooks/rollout.yml`` runs on this host
against a booted systemd container (tests/integration/container.py), reached through the
``nsenter`` connection plugin beside this file, so the role's modules run on the
container's own Debian python3 as they would on a node reached over SSH.  The package is
the project's RPM, releases 1 and 2, built with ``make rpm`` (tests/integration/packages.py)
and installed with the role's ``rpm`` method (the container has no dnf); a stand-in kubelet
runs inside as a transient unit, from the source tree bind-mounted read-only (it must run
before the role installs the package).  Missing tools fail these tests, naming what to
install; ``UDP_SKIP_INTEGRATION=1`` skips them, as it does tests/integration.

Every case prints one ``CASE ...`` line (through pytest's terminal reporter, so it shows
in CI's log without ``-s``).  The container cases share one container and each starts
and ends with the baseline configuration applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # for tests.integration.container, whatever the rootdir/import mode
    sys.path.insert(0, REPO)

from tests.integration.container import Container, HostNotReady, require_host, wait_for  # noqa: E402
from tests.integration.packages import build_rpm  # noqa: E402

ANSIBLE_DIR = os.path.join(REPO, "ansible")
PLAYBOOK = os.path.join(ANSIBLE_DIR, "playbooks", "rollout.yml")
CONNECTION_PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connection_plugins")
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
STANDIN_STATE = "/run/standin.json"
STANDIN_SOURCE = os.path.join(REPO, "tests", "standin.py")
STANDIN = "/usr/local/lib/udp-test/standin.py"
CONF_DIR = "/etc/udev-device-plugin"
SERVICE = "udev-device-plugin.service"
PATH_UNIT = "udev-device-plugin-kubelet.path"

# Devices every container has without udevd: the mem subsystem, from sysfs.
NULL = {"name": "example.com/null", "subsystem": "mem", "kernel": ["null"], "attributes": {"dev": "1:3"},
        "env": {"NULL_DEVICES": "{devnodes}"}}
ZERO = {"name": "example.com/zero", "subsystem": "mem", "kernel": ["zero"], "permissions": "r",
        "annotations": {"example.com/zero-ids": "{ids}"}}
FULL = {"name": "example.com/full", "subsystem": "mem", "kernel": ["full"]}
BASELINE = [NULL, ZERO]


# --- output -------------------------------------------------------------------------------------

def case(request: pytest.FixtureRequest, line: str) -> None:
    """One clear line in the test log, captured or not."""
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:
        print(f"CASE {line}", flush=True)
        return
    with capture.global_and_fixture_disabled():  # as pytest's own live logging does
        reporter.write_line(f"CASE {line}")


# --- the ansible tools ------------------------------------------------------------------------

# Where ansible-core and ansible-lint are looked for, first found wins: $UDP_ANSIBLE_BIN,
# the repository's .venv-ansible (ansible-lint brings many packages the daemon's test
# environment need not have), this interpreter's environment, PATH.
_ANSIBLE_BINDIRS = [d for d in (os.environ.get("UDP_ANSIBLE_BIN"), os.path.join(REPO, ".venv-ansible", "bin"),
                                os.path.dirname(sys.executable)) if d]


def _tool(name: str) -> str:
    """An ansible executable (see _ANSIBLE_BINDIRS); skip, or fail under CI, when there is none."""
    found = next((os.path.join(d, name) for d in _ANSIBLE_BINDIRS if os.access(os.path.join(d, name), os.X_OK)),
                 None) or shutil.which(name)
    if not found:
        _skip_on_request()
        pytest.fail(f"{name} not found in {_ANSIBLE_BINDIRS} nor on PATH; install with: python3 -m venv "
                    f".venv-ansible && .venv-ansible/bin/pip install -r ansible/requirements.txt", pytrace=False)
    return found


def _skip_on_request() -> None:
    """As tests/integration: these system tests are skipped only on explicit request."""
    if os.environ.get("UDP_SKIP_INTEGRATION") == "1":
        pytest.skip("UDP_SKIP_INTEGRATION=1: system tests skipped on request")


def _empty_config(home: str) -> str:
    path = os.path.join(home, "ansible.cfg")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("[defaults]\n")
    return path


def _ansible_env(home: str) -> Dict[str, str]:
    env = dict(os.environ)
    bindir = os.path.dirname(_tool("ansible-playbook"))
    env.update({
        "PATH": bindir + os.pathsep + env.get("PATH", ""),
        "LC_ALL": "C.UTF-8",             # ansible refuses a non-UTF-8 locale
        "ANSIBLE_HOME": home,            # nothing written to the user's ~/.ansible
        "ANSIBLE_LOCAL_TEMP": os.path.join(home, "tmp"),
        "ANSIBLE_CONFIG": _empty_config(home),  # no ansible.cfg from the working directory
        "ANSIBLE_ROLES_PATH": os.path.join(ANSIBLE_DIR, "roles"),
        "ANSIBLE_CONNECTION_PLUGINS": CONNECTION_PLUGINS,
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
    })
    return env


class Run:
    """One ansible-playbook run: exit status, output, and the PLAY RECAP counters per host."""

    def __init__(self, proc: subprocess.CompletedProcess[str], seconds: float) -> None:
        self.rc = proc.returncode
        self.output = proc.stdout
        self.seconds = seconds
        self.recap: Dict[str, Dict[str, int]] = {}
        for host, counters in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", self.output, re.M):
            self.recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counters)}

    def handlers(self) -> List[str]:
        """The role's handlers that ran (a handler skipped by its ``when`` is not listed)."""
        ran, handler = [], None
        for line in self.output.splitlines():
            m = re.match(r"^(?:RUNNING HANDLER|TASK|PLAY) \[(?:udev_device_plugin : )?(.*)\]", line)
            if m:
                handler = m.group(1) if line.startswith("RUNNING HANDLER") else None
            elif handler and re.match(r"^(changed|ok):", line) and handler not in ran:
                ran.append(handler)
        return ran

    def changed_tasks(self) -> List[str]:
        """Names of the tasks that reported a change (for messages)."""
        names, task = [], ""
        for line in self.output.splitlines():
            m = re.match(r"^(?:TASK|RUNNING HANDLER) \[(.*)\]", line)
            if m:
                task = m.group(1)
            elif line.startswith("changed:"):
                names.append(task)
        return names

    def __repr__(self) -> str:
        return f"ansible-playbook exited {self.rc} after {self.seconds:.0f}s; output:\n{self.output[-12000:]}"


def playbook(home: str, inventory: str, extra_vars: Dict[str, Any], *args: str, timeout: float = 240) -> Run:
    vars_file = os.path.join(home, "extra-vars.json")
    with open(vars_file, "w") as f:
        json.dump(extra_vars, f)
    started = time.monotonic()
    proc = subprocess.run([_tool("ansible-playbook"), "-i", inventory, "-e", "@" + vars_file, *args, PLAYBOOK],
                          env=_ansible_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return Run(proc, time.monotonic() - started)


# --- static checks ----------------------------------------------------------------------------

def test_ansible_lint_production_profile(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    env = _ansible_env(str(tmp_path))
    env.pop("ANSIBLE_CONFIG")          # ansible-lint reads ansible/.ansible-lint and ansible/ansible.cfg
    proc = subprocess.run([_tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
                          cwd=ANSIBLE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    summary = [line for line in proc.stdout.splitlines() if "Passed" in line or "Failed" in line]
    case(request, f"ansible-lint: {summary[-1].strip() if summary else 'passed'}")


def test_playbook_syntax_check(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    inventory = os.path.join(ANSIBLE_DIR, "inventory.example.ini")
    proc = subprocess.run([_tool("ansible-playbook"), "--syntax-check", "-i", inventory, PLAYBOOK],
                          env=_ansible_env(str(tmp_path)), cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    case(request, f"ansible-playbook --syntax-check {os.path.relpath(PLAYBOOK, REPO)}: ok")


@pytest.mark.parametrize("bad_vars, expected", [
    ({"udev_device_plugin_log_level": "verbose"},
     "value of udev_device_plugin_log_level must be one of: debug, info, warning, error, got: verbose"),
    ({"udev_device_plugin_resources": [{"name": "example.com/null", "subsytem": "mem"}]},
     "missing required arguments: subsystem found in udev_device_plugin_resources"),
    ({"udev_device_plugin_resources": [{"name": "example.com/null", "subsystem": "mem", "kernel": "null",
                                        "mounts": [{"host_path": "/a"}]}]},
     "missing required arguments: container_path found in udev_device_plugin_resources -> mounts"),
    ({"udev_device_plugin_verify_timeout": "soon"},
     "udev_device_plugin_verify_timeout"),
])
def test_bad_variables_fail_before_any_task(request: pytest.FixtureRequest, tmp_path: Any,
                                            bad_vars: Dict[str, Any], expected: str) -> None:
    # A host no task could reach (no such PID): only the controller-side argument
    # check may run.  Were it to pass, the first remote task fails "unreachable".
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[udev_device_plugin_nodes]\n"
                         "nowhere ansible_connection=nsenter ansible_nsenter_pid=999999999\n")
    run = playbook(str(tmp_path), str(inventory), {"ansible_become": False, **bad_vars})
    assert run.rc != 0, run
    assert "Validation of arguments failed" in run.output, run
    assert expected in run.output, run
    assert run.recap["nowhere"]["unreachable"] == 0 and run.recap["nowhere"]["ok"] == 0, run
    case(request, f"bad variables {sorted(bad_vars)} refused by the argument specs before any task: {expected!r}")


# --- applied to a booted container ------------------------------------------------------------

def _rpms(outdir: str) -> List[str]:
    """Release 1 and release 2 of the same version (an upgrade), built as tests/integration builds them."""
    return [build_rpm(outdir, release) for release in ("1", "2")]


class Node:
    """The container as an Ansible node, and what the tests look at."""

    def __init__(self, ct: Container, home: str, rpms: List[str]) -> None:
        self.ct = ct
        self.home = home
        self.rpms = rpms
        self.inventory = os.path.join(home, "inventory.ini")

    def write_inventory(self, hosts: Optional[Dict[str, int]] = None) -> None:
        """An inventory of ``name -> container PID 1`` (default: this node as node1)."""
        with open(self.inventory, "w") as f:
            f.write("[udev_device_plugin_nodes]\n")
            for name, pid in (hosts or {"node1": self.ct.leader}).items():
                f.write(f"{name} ansible_connection=nsenter ansible_nsenter_pid={pid}\n")

    def apply(self, resources: List[Dict[str, Any]], rpm: Optional[str] = None,
              hosts: Optional[Dict[str, int]] = None, check: bool = False, **more: Any) -> Run:
        """Run the rollout playbook on ``hosts`` (default: this node) with these resources."""
        extra = {
            "ansible_become": False,           # root already; the container has no sudo
            "udev_device_plugin_install_method": "rpm",
            "udev_device_plugin_package_file": rpm or self.rpms[0],
            # Debian's rpm: the dependencies are Debian packages it does not know,
            # and it wants --force-debian to install at all.
            "udev_device_plugin_rpm_extra_args": ["--nodeps", "--force-debian"],
            "udev_device_plugin_resources": resources,
            "udev_device_plugin_verify_timeout": 30,
            "udev_device_plugin_verify_delay": 1,
        }
        extra.update(more)
        self.write_inventory(hosts)
        return playbook(self.home, self.inventory, extra, *(["--check", "--diff"] if check else []))

    def main_pid(self) -> int:
        return int(self.ct.unit_property(SERVICE, "MainPID"))

    def inspect(self) -> Dict[str, bool]:
        """resource -> registered, as the daemon reports it."""
        return {r["resource"]: r["registered"] for r in self.inspect_json()}

    def inspect_json(self) -> List[Dict[str, Any]]:
        out = self.ct.run("udev-device-plugin", "inspect", "--json", check=False).stdout
        return list(json.loads(out or '{"resources": []}')["resources"])

    def kubelet_view(self, state_file: str = STANDIN_STATE) -> Dict[str, bool]:
        """resource -> connected, as the stand-in kubelet sees it."""
        state = json.loads(self.ct.read_file(state_file))
        return {name: bool(r.get("connected")) for name, r in state.get("resources", {}).items()}

    def config_files(self) -> Dict[str, str]:
        out = {}
        root = self.ct.host_path(CONF_DIR)
        for dirpath, _, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    out[os.path.relpath(path, root)] = f.read()
        return out

    def dropins(self) -> List[str]:
        return sorted(n for n in self.config_files() if n.startswith("conf.d/"))

    def reloads(self) -> int:
        """How many times systemd reloaded the daemon (its journal's 'Reloaded' lines for the unit)."""
        return sum(1 for e in self.ct.journal("_PID=1") if str(e.get("MESSAGE", "")).startswith("Reloaded ")
                   and e.get("UNIT") == SERVICE)


def _names(resources: List[Dict[str, Any]]) -> List[str]:
    return [r["name"] for r in resources]


def start_standin(ct: Container, unit: str = "kubelet-stand-in", kubelet_dir: str = KUBELET_DIR,
                  state_file: str = STANDIN_STATE) -> None:
    """Start a stand-in kubelet as a transient unit; return once it has written its state.

    The stand-in is the test one (tests/standin.py, not in the RPM), copied in; its api module
    comes from the source tree bind-mounted at /opt/udp-src: the role has not installed the
    package yet when the first one starts.
    """
    state = ct.host_path(state_file)
    if os.path.exists(state):
        os.unlink(state)
    ct.copy_in(STANDIN_SOURCE, STANDIN)
    ct.run("systemd-run", "--collect", f"--unit={unit}", "--setenv=PYTHONPATH=/opt/udp-src",
           "/usr/bin/python3", STANDIN, "--kubelet-dir", kubelet_dir, "--state-file", state_file)
    wait_for(lambda: os.path.exists(state), 30, f"{unit}'s state file")


@contextlib.contextmanager
def booted(name: str) -> Iterator[Container]:
    """A booted container with the stand-in kubelet running and nothing of ours installed."""
    with Container(name, binds=[(os.path.join(REPO, "src"), "/opt/udp-src", True)]) as ct:
        start_standin(ct)
        yield ct
        # End our processes inside before the container halts (it freezes them).
        ct.systemctl("stop", "kubelet-stand-in.service", SERVICE, check=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    _skip_on_request()
    try:
        require_host()
    except HostNotReady as exc:
        pytest.fail(f"the role's container tests cannot run here: {exc}", pytrace=False)
    _tool("ansible-playbook")
    home = str(tmp_path_factory.mktemp("ansible"))
    rpms = _rpms(str(tmp_path_factory.mktemp("rpms")))
    with booted("udp-ansible-1") as ct:
        yield Node(ct, home, rpms)


@pytest.fixture(scope="module")
def fresh_check(node: Node) -> Run:
    """``--check --diff`` on the node before anything is installed."""
    return node.apply(BASELINE, check=True)


@pytest.fixture(scope="module")
def first_run(node: Node, fresh_check: Run) -> Run:
    return node.apply(BASELINE)


def test_check_mode_on_a_fresh_node_changes_nothing(request: pytest.FixtureRequest, node: Node,
                                                    fresh_check: Run) -> None:
    run = fresh_check
    assert run.rc == 0, run
    assert run.recap["node1"]["changed"] > 0, run
    assert "Would install udev-device-plugin-0.1.0-1.noarch.rpm with rpm -U" in run.output, run
    assert "+[resource example.com/null]" in run.output, run          # the --diff of a drop-in
    assert node.ct.run("rpm", "-q", "udev-device-plugin", check=False).returncode == 1
    assert not os.path.exists(node.ct.host_path(CONF_DIR))
    case(request, f"--check --diff on a fresh node: reports the install and the files "
                  f"(changed={run.recap['node1']['changed']}), installs and writes nothing ({run.seconds:.0f}s)")


def test_first_run_installs_and_starts(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    run = first_run
    assert run.rc == 0, run
    assert run.recap["node1"]["changed"] > 0, run
    assert "Restart udev-device-plugin" in run.handlers(), run
    installed = node.ct.run("rpm", "-q", "udev-device-plugin").stdout.strip()
    assert installed == "udev-device-plugin-0.1.0-1.noarch"
    for unit in (SERVICE, PATH_UNIT):
        assert node.ct.unit_property(unit, "ActiveState") == "active", unit
        assert node.ct.unit_property(unit, "UnitFileState") == "enabled", unit
    assert node.dropins() == ["conf.d/ansible-example.com_null.conf", "conf.d/ansible-example.com_zero.conf"]
    # The post-check passed, so the daemon says both are registered; the kubelet agrees.
    assert node.inspect() == {"example.com/null": True, "example.com/zero": True}
    view = wait_for(lambda: node.kubelet_view() if all(node.kubelet_view().get(n) for n in _names(BASELINE))
                    else None, 10, "the stand-in kubelet to see both resources")
    case(request, f"first run: installed {installed}, {SERVICE} and {PATH_UNIT} active+enabled, "
                  f"kubelet sees {sorted(view)} (changed={run.recap['node1']['changed']}, "
                  f"handlers={run.handlers()}, {run.seconds:.0f}s)")


def test_second_run_changes_nothing(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    assert first_run.rc == 0, first_run
    pid = node.main_pid()
    run = node.apply(BASELINE)
    assert run.rc == 0, run
    assert run.recap["node1"]["changed"] == 0, f"changed: {run.changed_tasks()}\n{run}"
    assert run.handlers() == [], run
    assert node.main_pid() == pid
    case(request, f"second run: changed=0, no handler, daemon PID {pid} untouched ({run.seconds:.0f}s)")


def test_changed_resource_reloads_and_registers(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    assert first_run.rc == 0, first_run
    pid, reloads = node.main_pid(), node.reloads()
    files = node.config_files()

    run = node.apply(BASELINE + [FULL], check=True)
    assert run.rc == 0, run
    assert run.recap["node1"]["changed"] > 0 and "+[resource example.com/full]" in run.output, run
    assert node.config_files() == files and node.main_pid() == pid and node.reloads() == reloads
    assert "example.com/full" not in node.inspect()
    case(request, f"--check --diff with an added resource: shows the new drop-in, writes and reloads nothing "
                  f"({run.seconds:.0f}s)")

    run = node.apply(BASELINE + [FULL])
    assert run.rc == 0, run
    assert run.handlers() == ["Reload udev-device-plugin"], run
    assert node.main_pid() == pid, "a configuration change must reload, not restart"
    assert node.reloads() == reloads + 1
    assert node.inspect()["example.com/full"] is True
    wait_for(lambda: node.kubelet_view().get("example.com/full"), 10, "the kubelet to see example.com/full")
    assert "conf.d/ansible-example.com_full.conf" in node.dropins()
    case(request, f"added resource: reload (PID {pid} kept), example.com/full registered, "
                  f"kubelet sees it (changed={run.recap['node1']['changed']}, {run.seconds:.0f}s)")

    run = node.apply(BASELINE)
    assert run.rc == 0, run
    assert run.handlers() == ["Reload udev-device-plugin"], run
    assert node.main_pid() == pid
    assert "conf.d/ansible-example.com_full.conf" not in node.dropins()
    assert node.inspect() == {"example.com/null": True, "example.com/zero": True}
    case(request, f"removed resource: its drop-in deleted, reload (PID {pid} kept), daemon serves "
                  f"{sorted(node.inspect())} ({run.seconds:.0f}s)")


def test_bad_resource_name_fails_validation_and_changes_nothing(request: pytest.FixtureRequest, node: Node,
                                                                first_run: Run) -> None:
    assert first_run.rc == 0, first_run
    before_files, pid, reloads = node.config_files(), node.main_pid(), node.reloads()
    before = node.inspect()
    # Valid for the argument specs (a string), refused by check-config: no '/'.
    bad = {"name": "full-without-domain", "subsystem": "mem", "kernel": ["full"]}

    run = node.apply([NULL, bad, ZERO, FULL])
    assert run.rc != 0, run
    assert run.recap["node1"]["failed"] == 1, run
    assert "check-config rejected the candidate configuration" in run.output, run
    assert ("/etc/udev-device-plugin/conf.d/ansible-full-without-domain.conf: [resource full-without-domain]: "
            "resource name 'full-without-domain' is not one the kubelet accepts") in run.output, run
    assert run.handlers() == [], run
    assert node.config_files() == before_files, "a live config file changed"
    assert node.main_pid() == pid and node.reloads() == reloads
    assert node.inspect() == before
    message = re.search(r"resource name 'full-without-domain'[^\n\"\\]*", run.output)
    case(request, f"bad resource name: failed at validation ({message.group(0) if message else '?'}); "
                  f"config files, daemon PID {pid} and registrations unchanged ({run.seconds:.0f}s)")


def test_package_change_restarts(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    assert first_run.rc == 0, first_run
    pid = node.main_pid()

    run = node.apply(BASELINE, rpm=node.rpms[1])
    assert run.rc == 0, run
    assert run.handlers() == ["Restart udev-device-plugin"], run
    installed = node.ct.run("rpm", "-q", "udev-device-plugin").stdout.strip()
    assert installed == "udev-device-plugin-0.1.0-2.noarch"
    new_pid = node.main_pid()
    assert new_pid != pid
    served = node.inspect_json()
    assert {r["resource"]: (r["registered"], r["pid"]) for r in served} == \
        {n: (True, new_pid) for n in _names(BASELINE)}
    case(request, f"package upgrade to {installed}: restart (PID {pid} -> {new_pid}), "
                  f"{_names(BASELINE)} registered by the new daemon ({run.seconds:.0f}s)")

    # A rollback to the older file is a package change too (rpm -U --oldpackage).
    run = node.apply(BASELINE)
    assert run.rc == 0, run
    assert run.handlers() == ["Restart udev-device-plugin"], run
    installed = node.ct.run("rpm", "-q", "udev-device-plugin").stdout.strip()
    assert installed == "udev-device-plugin-0.1.0-1.noarch"
    assert node.main_pid() != new_pid
    assert node.inspect() == {n: True for n in _names(BASELINE)}
    case(request, f"package rollback to {installed}: restart, registered again ({run.seconds:.0f}s)")


def test_failed_post_check_stops_the_rollout(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    """Batch 1 is node1 and a fresh node2; node1's kubelet is down, so no resource is registered
    there (a stopped kubelet holds no stream), the one added in this rollout included: node1 fails
    its post-check naming every resource, node2 passes, 1 of 2 failed exceeds max_fail_percentage 0,
    and batch 2 (node3) is never touched."""
    assert first_run.rc == 0, first_run
    with booted("udp-ansible-2") as ct2:
        node.ct.systemctl("stop", "kubelet-stand-in.service")
        try:
            run = node.apply(BASELINE + [FULL], hosts={"node1": node.ct.leader, "node2": ct2.leader,
                                                       # Unreachable were it ever tried.
                                                       "node3": 999999999},
                             udev_device_plugin_batches=[2, 1], udev_device_plugin_verify_timeout=5)
            node2 = Node(ct2, node.home, node.rpms)
            node2_view = node2.inspect()
        finally:
            start_standin(node.ct)
    assert run.rc != 0, run
    assert run.recap["node1"]["failed"] == 1, run
    assert run.recap["node2"]["failed"] == 0 and run.recap["node2"]["changed"] > 0, run
    assert "node3" not in run.recap, run
    assert "still not registered with the kubelet" in run.output and "example.com/full" in run.output, run
    assert node2_view == {n: True for n in _names(BASELINE + [FULL])}
    failure = re.search(r"still not registered with the kubelet in \S+: ([^\"]*?)\. "
                        r"The daemon reports: ([^\"]*?)\. See", run.output)
    assert failure and sorted(failure.group(1).split(", ")) == sorted(_names(BASELINE + [FULL])), run
    case(request, f"post-check gate: node1 failed (not registered: {failure.group(1)}; daemon: {failure.group(2)}), "
                  f"node2 passed, max_fail_percentage 0 stopped the play: batch 2 (node3) never started "
                  f"({run.seconds:.0f}s)")

    # Back to the baseline: with its kubelet back, node1's daemon registers the new
    # resource by itself; the next run removes it again.
    wait_for(lambda: node.inspect().get("example.com/full"), 30, "node1 to register example.com/full")
    run = node.apply(BASELINE)
    assert run.rc == 0, run
    assert node.inspect() == {n: True for n in _names(BASELINE)}


def test_other_kubelet_dir_gets_unit_dropins(request: pytest.FixtureRequest, node: Node, first_run: Run) -> None:
    """The units are written for the default kubelet directory; another one (k0s, microk8s)
    needs the sandbox opened there and the path unit watching there.  The plugin is rolled out
    before that kubelet has created its directory, as on a node being set up."""
    assert first_run.rc == 0, first_run
    alt_dir, alt_state = "/var/lib/k0s/kubelet/device-plugins", "/run/standin-alt.json"
    service_dropin = f"/etc/systemd/system/{SERVICE}.d/ansible-kubelet-dir.conf"
    path_dropin = f"/etc/systemd/system/{PATH_UNIT}.d/ansible-kubelet-dir.conf"
    assert not os.path.exists(node.ct.host_path("/var/lib/k0s"))
    pid = node.main_pid()

    # No kubelet there yet, so nothing can register: no post-check on this run.
    run = node.apply(BASELINE, udev_device_plugin_kubelet_dir=alt_dir, udev_device_plugin_verify=False)
    assert run.rc == 0, run
    assert run.handlers() == ["Restart udev-device-plugin"], run
    assert node.main_pid() not in (0, pid), "the daemon must restart, and start while the directory is missing"
    assert os.path.exists(node.ct.host_path(service_dropin)) and os.path.exists(node.ct.host_path(path_dropin))
    assert node.ct.unit_property(PATH_UNIT, "Paths") == f"{alt_dir}/kubelet.sock (PathChanged)"
    assert os.path.isdir(node.ct.host_path(alt_dir)), "ExecStartPre= of the drop-in creates the directory"
    case(request, f"kubelet_dir {alt_dir} (missing): unit drop-ins written, daemon restarted and waiting, "
                  f"directory created, path unit watches {alt_dir}/kubelet.sock ({run.seconds:.0f}s)")

    start_standin(node.ct, "kubelet-stand-in-alt", alt_dir, alt_state)
    try:
        run = node.apply(BASELINE, udev_device_plugin_kubelet_dir=alt_dir)
        assert run.rc == 0, run
        assert run.recap["node1"]["changed"] == 0, f"changed: {run.changed_tasks()}\n{run}"
        served = node.inspect_json()   # reads kubelet_dir from the main config the role wrote
        assert {r["resource"]: r["registered"] for r in served} == {n: True for n in _names(BASELINE)}
        assert all(r["socket"].startswith(alt_dir + "/") for r in served)
        wait_for(lambda: all(node.kubelet_view(alt_state).get(n) for n in _names(BASELINE)), 10,
                 "the stand-in kubelet in the other directory to see both resources")
        case(request, f"kubelet in {alt_dir} started: registered there, the next run changes nothing and its "
                      f"post-check passes ({run.seconds:.0f}s)")
    finally:
        node.ct.systemctl("stop", "kubelet-stand-in-alt.service", check=False)

    run = node.apply(BASELINE)
    assert run.rc == 0, run
    assert run.handlers() == ["Restart udev-device-plugin"], run
    assert not os.path.exists(node.ct.host_path(service_dropin))
    assert not os.path.exists(node.ct.host_path(path_dropin))
    assert node.ct.unit_property(PATH_UNIT, "Paths") == f"{KUBELET_DIR}/kubelet.sock (PathChanged)"
    assert node.inspect() == {n: True for n in _names(BASELINE)}
    case(request, f"kubelet_dir back to the default: drop-ins removed, registered in {KUBELET_DIR} "
                  f"({run.seconds:.0f}s)")
