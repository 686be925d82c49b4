"""health_command: healthy, failing, hanging (timeout), recovering, damped by health_threshold; the
transitions reach the kubelet's list and the journal (native-protocol datagrams)."""

from __future__ import annotations

import os
import shlex
from typing import List

from tests.conftest import wait_until
from udev_device_plugin import events

RES = "example.com/mem"
# One run per device per interval; a hanging run is killed after the timeout; two equal results
# in a row change the health.
CONFIG = """
[plugin]
events = journal

[resource example.com/mem]
subsystem = mem
kernel = null zero
health_command = /bin/sh {script} {state}
health_interval = 0.6
health_timeout = 0.5
health_threshold = 2
"""
# Arguments: the state directory, then the device ID (the daemon appends it).  The file
# <state>/<id> says how to behave; every run logs its start (wall time) and its environment.
CHECK = r"""
state=$(cat "$1/$2" 2>/dev/null || echo ok)
echo "$(date +%s.%N) $state $UDP_RESOURCE $UDP_DEVICE_ID $UDP_DEVNODES $UDP_SYSPATH" >> "$1/$2.log"
case "$state" in
ok) exit 0 ;;
hang) while :; do sleep 1; done ;;
*) echo "device $2 is $state"; exit 1 ;;
esac
"""


class Checks:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.script = os.path.join(os.path.dirname(directory), "check.sh")
        with open(self.script, "w") as f:
            f.write(CHECK)

    def set(self, dev: str, state: str) -> None:
        with open(os.path.join(self.dir, dev), "w") as f:
            f.write(state)

    def runs(self, dev: str) -> List[List[str]]:
        """Every run of the command for ``dev``: [wall time, state, resource, id, devnodes, syspath]."""
        try:
            with open(os.path.join(self.dir, f"{dev}.log")) as f:
                return [line.split() for line in f]
        except FileNotFoundError:
            return []

    def started(self, dev: str, state: str) -> List[float]:
        return [float(r[0]) for r in self.runs(dev) if r[1] == state]

    def processes(self) -> List[int]:
        """PIDs whose command line mentions our state directory (a health command still running)."""
        pids = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.dir.encode() in f.read():
                        pids.append(int(pid))
            except (OSError, ValueError):
                continue
        return pids


def health(kubelet, dev: str) -> str:
    return kubelet.devices.get(RES, {}).get(dev, {}).get("health", "")


def test_health_command_healthy_failing_hanging_recovering_with_damping(start_daemon, kubelet, tmp_path, journal):
    state = tmp_path / "state"
    state.mkdir()
    checks = Checks(str(state))
    config = CONFIG.format(script=shlex.quote(checks.script), state=shlex.quote(str(state)))
    daemon = start_daemon(config, env={events.JOURNAL_SOCKET_ENV: journal.path})
    ids = events.MESSAGE_IDS

    # Healthy: both devices checked repeatedly, with their ID, nodes and syspath in the environment.
    wait_until(lambda: len(checks.started("null", "ok")) >= 2 and len(checks.started("zero", "ok")) >= 2,
               what="two passing runs per device")
    assert checks.runs("null")[0][2:] == [RES, "null", "/dev/null", "/sys/devices/virtual/mem/null"]
    wait_until(lambda: health(kubelet, "null") == health(kubelet, "zero") == "Healthy", what="both Healthy")

    # Failing: the first failure is damped; the second makes the device unhealthy.
    checks.set("null", "broken")
    wait_until(lambda: health(kubelet, "null") == "Unhealthy", what="null Unhealthy")
    [entry] = journal.find(MESSAGE_ID=ids["unhealthy"], DEVICE_ID="null")
    failed = checks.started("null", "broken")
    assert len(failed) >= 2
    assert entry["REASON"] == "health_command: /bin/sh failed with exit status 1: device null is broken"
    assert (entry["HEALTH"], entry["PRIORITY"], entry["DEVNODE"], entry["RESOURCE"]) == (
        "Unhealthy", "4", "/dev/null", RES)
    sick = next(r for r in kubelet.history(RES) if r.devices["null"]["health"] == "Unhealthy")
    assert sick.wall > failed[1], "null became unhealthy before its second failing run: not damped"

    # Recovering: again two passing runs in a row.
    checks.set("null", "ok")
    wait_until(lambda: health(kubelet, "null") == "Healthy", what="null recovered")
    [entry] = journal.find(MESSAGE_ID=ids["recovered"], DEVICE_ID="null")
    assert (entry["HEALTH"], entry["PRIORITY"]) == ("Healthy", "5")
    passed_again = [t for t in checks.started("null", "ok") if t > failed[-1]]
    back = next(r for r in kubelet.history(RES, sick.seq) if r.devices["null"]["health"] == "Healthy")
    assert back.wall > passed_again[1], "null recovered on its first passing run: not damped"

    # Hanging: a run that outlives health_timeout is killed (its whole process group) and counts as failed.
    before_hang = kubelet.messages[RES]
    checks.set("zero", "hang")
    wait_until(lambda: health(kubelet, "zero") == "Unhealthy", what="zero Unhealthy after timeouts")
    [entry] = journal.find(MESSAGE_ID=ids["unhealthy"], DEVICE_ID="zero")
    assert entry["REASON"] == "health_command: /bin/sh did not finish within 0.5 s"
    checks.set("zero", "ok")
    wait_until(lambda: health(kubelet, "zero") == "Healthy", what="zero recovered")
    wait_until(lambda: not checks.processes(), what="the hung health commands to be killed")

    # The other device never flickered while its neighbour failed and hung.
    assert all(r.devices["zero"]["health"] == "Healthy" for r in kubelet.history(RES) if r.seq <= before_hang)
    kinds = [e["MESSAGE_ID"] for e in journal.read()]
    assert kinds.count(ids["unhealthy"]) == 2 and kinds.count(ids["recovered"]) == 2, kinds
    assert daemon.proc.poll() is None


def test_health_command_failing_from_the_start(start_daemon, kubelet, tmp_path):
    """The first result applies at once (there is nothing to damp yet)."""
    state = tmp_path / "state"
    state.mkdir()
    checks = Checks(str(state))
    checks.set("null", "absent")
    start_daemon(CONFIG.format(script=shlex.quote(checks.script), state=shlex.quote(str(state)))
                 .replace("events = journal", "events = stderr"))
    wait_until(lambda: health(kubelet, "null") == "Unhealthy", what="null Unhealthy")
    sick = next(r for r in kubelet.history(RES) if r.devices["null"]["health"] == "Unhealthy")
    runs = checks.started("null", "absent")
    assert len(runs) == 1 or sick.wall < runs[1], "the first failing result was damped"
    assert health(kubelet, "zero") == "Healthy"
