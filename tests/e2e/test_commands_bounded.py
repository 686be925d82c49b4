"""Health and prestart commands that misbehave cost the daemon bounded memory, CPU, threads and
processes (issues 9 and 10): slow, stuck in uninterruptible sleep, flooding their output, detaching
children, or too many for the configured workers."""

from __future__ import annotations

import os
import shlex
import time
import uuid
from typing import Iterator, List

import grpc
import pytest

from ..conftest import process_gone, wait_until
from .helpers import MEM, thread_census, threads_bounded, wait_log
from .test_never_stuck import inspect

FREEZER = "/sys/fs/cgroup/freezer"
NULL_CONF = f"[resource {MEM}]\nsubsystem = mem\nkernel = null\n"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_over(pid: int, seconds: float) -> float:
    """The daemon's CPU time over a measuring window (a window, not a wait for anything)."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - before


@pytest.fixture
def frozen_cgroup() -> Iterator[str]:
    """A cgroup-v1 freezer cgroup in state FROZEN: a process that joins it stops at once and, frozen,
    does not die of SIGKILL until thawed — a process in uninterruptible sleep, as one reading from a
    hung NFS or FUSE server is."""
    if not os.path.isdir(FREEZER):
        pytest.fail(f"{FREEZER} is missing: this test needs the cgroup v1 freezer to make a process that "
                    "survives SIGKILL", pytrace=False)
    path = os.path.join(FREEZER, f"udp-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    with open(os.path.join(path, "freezer.state"), "w") as f:
        f.write("FROZEN")
    try:
        yield path
    finally:
        with open(os.path.join(path, "freezer.state"), "w") as f:
            f.write("THAWED")

        def empty() -> bool:
            with open(os.path.join(path, "tasks")) as f:
                return not f.read().strip()

        def removed() -> bool:
            try:
                os.rmdir(path)
            except OSError:  # EBUSY while a task that left is still exiting
                return False
            return True

        wait_until(empty, 10, "the frozen commands to die once thawed")
        wait_until(removed, 10, f"{path} removed")


def test_a_health_command_stuck_in_uninterruptible_sleep(start_daemon, kubelet, kubelet_dir, frozen_cgroup):
    tasks = os.path.join(frozen_cgroup, "tasks")
    script = f"echo $$ > {tasks}; echo thawed"
    daemon = start_daemon(NULL_CONF + f"health_command = /bin/sh -c {shlex.quote(script)}\n"
                          "health_interval = 1\nhealth_timeout = 0.5\n")
    kubelet.wait_live(MEM)
    threads = thread_census(daemon.pid)
    # Killed at the timeout, it does not exit: abandoned after a bounded wait, reported, the device unhealthy.
    wait_log(daemon, "did not exit within 1 s of SIGKILL (uninterruptible sleep?); abandoned")
    assert kubelet.wait_for(lambda: kubelet.health(MEM).get("null") == "Unhealthy", 10)
    # The kubelet sees only "Unhealthy"; inspect gives the reason.
    wait_until(lambda: "uninterruptible sleep" in inspect(kubelet_dir)[MEM]["devices"][0]["reason"],
               what="inspect to give the reason")
    # No new run is started for that device while its process is stuck; nothing spins, nothing is pinned.
    used = cpu_over(daemon.pid, 10.0)
    assert used < 0.1, f"{used:.3f} s of CPU in 10 s with a stuck health command"
    assert threads_bounded(daemon.pid, threads), (threads, thread_census(daemon.pid))
    with open(tasks) as f:
        assert len(f.read().split()) == 1  # one stuck process, not one per interval
    # Thawed, the process dies, is reaped, and the device is checked again: healthy.
    with open(os.path.join(frozen_cgroup, "freezer.state"), "w") as f:
        f.write("THAWED")
    wait_log(daemon, "exited at last")
    assert kubelet.wait_for(lambda: kubelet.health(MEM).get("null") == "Healthy", 10)


def test_a_health_command_slower_than_its_interval(start_daemon, kubelet):
    """It runs 3x its interval: killed at its timeout each time; the loop never spins."""
    daemon = start_daemon(NULL_CONF + "health_command = /bin/sh -c 'sleep 3'\n"
                          "health_interval = 1\nhealth_timeout = 0.9\n")
    kubelet.wait_live(MEM)
    wait_log(daemon, "device null (/dev/null) became unhealthy: health_command: /bin/sh did not finish")
    threads = thread_census(daemon.pid)
    used = cpu_over(daemon.pid, 10.0)
    assert used < 0.1, f"{used:.3f} s of CPU in 10 s with a slow health command (1%)"
    assert threads_bounded(daemon.pid, threads), (threads, thread_census(daemon.pid))


def test_an_output_flood_keeps_the_daemon_small(start_daemon, kubelet, tmp_path):
    """1 GB of output from a health command, and from a prestart command: cut off, the daemon's peak RSS
    stays under 80 MiB and the call returns long before its timeout."""
    daemon = start_daemon(NULL_CONF + "health_command = /bin/sh -c 'head -c 1000000000 /dev/zero; exit 0'\n"
                          "health_interval = 30\nhealth_timeout = 20\n"
                          "prestart_command = /bin/sh -c 'yes flooding'\nprestart_timeout = 20\n")
    kubelet.wait_live(MEM)
    wait_log(daemon, "printed more than 1 MiB and was killed")
    with pytest.raises(grpc.RpcError) as err:
        kubelet.prestart(MEM, ["null"])
    assert err.value.code() == grpc.StatusCode.INTERNAL and "printed more than 1 MiB" in err.value.details()
    peak = status_kib(daemon.pid, "VmHWM") / 1024
    assert peak < 80, f"peak RSS {peak:.1f} MiB"


def test_processes_a_command_detaches_are_ended(start_daemon, kubelet, tmp_path):
    """Each run leaves two processes in sessions of their own (setsid); each is ended after the run."""
    pids = tmp_path / "detached.pids"
    script = (f"setsid /bin/sh -c 'echo $$ >> {pids}; exec sleep 300' & "
              f"setsid /bin/sh -c 'echo $$ >> {pids}; exec sleep 300' & sleep 0.2")  # they are detached by then
    start_daemon(NULL_CONF + f"health_command = /bin/sh -c {shlex.quote(script)}\n"
                 "health_interval = 0.5\nhealth_timeout = 0.4\n")
    kubelet.wait_live(MEM)

    def recorded() -> List[int]:
        try:
            return [int(p) for p in pids.read_text().split()]
        except FileNotFoundError:
            return []

    wait_until(lambda: len(recorded()) >= 6, what="three runs' detached processes")
    for pid in recorded()[:6]:
        wait_until(lambda pid=pid: process_gone(pid), what=f"detached process {pid} to be ended")


def test_health_checks_falling_behind_are_reported(start_daemon, kubelet):
    """68 tty devices, a 1 s check every 2 s, 2 workers: each device is really checked every ~34 s.
    That is said: a WARNING naming health_workers, and STATUS/inspect."""
    daemon = start_daemon("[plugin]\nhealth_workers = 2\n[resource example.com/tty]\nsubsystem = tty\n"
                          "health_command = /bin/sh -c 'sleep 1'\nhealth_interval = 2\nhealth_timeout = 1.5\n")
    kubelet.wait_live("example.com/tty")
    wait_log(daemon, "example.com/tty: health checks are falling behind their 2 s interval", timeout=30)
    assert "[plugin] health_workers = 2 may be too few" in daemon.log()
    assert daemon.log().count("falling behind") == 1  # a transition, said once
