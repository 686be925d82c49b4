"""Real kernel hotplug for the tests and the benchmark: a systemd-udevd of our own and loop devices
created and removed through /dev/loop-control (TESTING.md, "Real udev events without hardware").

Loop numbers 100-199 belong to these tests: the resource under test matches ``loop1[0-9][0-9]``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import subprocess
import threading
import time
from typing import Callable, List, Optional, Set, Tuple

from tests.conftest import process_gone

UDEVD = "/lib/systemd/systemd-udevd"
LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
FIRST, LAST = 100, 199  # the numbers the tests own

LOOP_CONFIG = """
[plugin]
log_level = {log_level}
events = {events}

[resource example.com/loop]
subsystem = block
kernel = loop1[0-9][0-9]
devtype = disk
"""
LOOP_RESOURCE = "example.com/loop"


def _run(*argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def ping() -> bool:
    return _run("udevadm", "control", "--ping", "--timeout=1").returncode == 0


class Udevd:
    """A systemd-udevd started for the tests (or one already running, which is left alone).

    Started detached (through a shell that exits at once), so it is not a child of the test
    process and the leak check does not count it.
    """

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.pid: Optional[int] = None
        self.created_run_udev = False
        self.foreign = False

    @staticmethod
    def problem() -> Optional[str]:
        """Why a udevd cannot be started here, or None."""
        if os.geteuid() != 0:
            return "the hotplug tests need root (udevd, /dev/loop-control, mknod); run them as root"
        if not os.access(UDEVD, os.X_OK):
            return f"{UDEVD} is missing: apt-get install udev"
        if shutil.which("udevadm") is None:
            return "udevadm is missing: apt-get install udev"
        if not os.path.exists(LOOP_CONTROL):
            return f"{LOOP_CONTROL} is missing: the loop module is not loaded (modprobe loop)"
        return None

    def start(self) -> Udevd:
        if ping():
            # Only one udevd can run on a machine; a running one serves us as well.
            self.foreign = True
            return self
        if not os.path.isdir("/run/udev"):
            os.makedirs("/run/udev")
            self.created_run_udev = True
        out = subprocess.run(["/bin/sh", "-c", f'{UDEVD} </dev/null >"$1" 2>&1 & echo $!', "sh", self.log_path],
                             stdout=subprocess.PIPE, text=True, check=True)
        self.pid = int(out.stdout.strip())
        if not _wait(ping, 10.0):
            self.stop()
            raise RuntimeError(f"systemd-udevd did not answer udevadm control --ping; its log:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.foreign:
            return
        _run("udevadm", "settle", "--timeout=5")
        _run("udevadm", "control", "--exit", "--timeout=5")
        if self.pid is not None and not _wait(lambda: process_gone(self.pid), 10.0):  # type: ignore[arg-type]
            os.kill(self.pid, 9)
            _wait(lambda: process_gone(self.pid), 5.0)  # type: ignore[arg-type]
        if self.created_run_udev:
            shutil.rmtree("/run/udev", ignore_errors=True)


def settle(timeout: float = 30.0) -> None:
    """Wait until udevd has handled (and broadcast) every queued event."""
    out = _run("udevadm", "settle", f"--timeout={timeout:g}", timeout=timeout + 5)
    if out.returncode != 0:
        raise RuntimeError(f"udevadm settle failed: {out.stdout}")


def trigger_change(name: str) -> None:
    """A synthesized ``change`` event for one block device (never an unfiltered trigger)."""
    out = _run("udevadm", "trigger", "--action=change", "--subsystem-match=block", f"--sysname-match={name}")
    if out.returncode != 0:
        raise RuntimeError(f"udevadm trigger failed: {out.stdout}")


class LoopDevices:
    """Adds and removes loop devices through /dev/loop-control; :meth:`close` removes every one left."""

    def __init__(self) -> None:
        self.fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        self.created: Set[int] = set()
        self.lock = threading.Lock()

    @staticmethod
    def exists(number: int) -> bool:
        return os.path.exists(f"/sys/block/loop{number}")

    def add(self, number: int) -> float:
        """Create loop<number>; return time.monotonic() just before the ioctl (which sends the kernel's uevent)."""
        assert FIRST <= number <= LAST, number
        start = time.monotonic()
        fcntl.ioctl(self.fd, LOOP_CTL_ADD, number)
        with self.lock:
            self.created.add(number)
        return start

    def remove(self, number: int, timeout: float = 10.0) -> float:
        """Remove loop<number>, retrying while a udevd worker still has it open (EBUSY); return
        time.monotonic() just before the ioctl that succeeded (it sends the uevent, then blocks 35-70 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                start = time.monotonic()
                fcntl.ioctl(self.fd, LOOP_CTL_REMOVE, number)
                break
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # already gone
                    break
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        with self.lock:
            self.created.discard(number)
        return start

    def remove_all(self, numbers: List[int]) -> None:
        """Remove several at once: each LOOP_CTL_REMOVE blocks 35-70 ms, so do them in parallel."""
        errors: List[BaseException] = []

        def worker(chunk: List[int]) -> None:
            for n in chunk:
                try:
                    self.remove(n)
                except OSError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(numbers[i::8],), name="loop-remove") for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def close(self) -> None:
        try:
            self.remove_all(sorted(self.created))
        finally:
            os.close(self.fd)


def leftovers() -> List[int]:
    """Loop devices in our range left by an earlier, interrupted run, unbound (no backing file)."""
    found = []
    for n in range(FIRST, LAST + 1):
        if os.path.exists(f"/sys/block/loop{n}") and not os.path.exists(f"/sys/block/loop{n}/loop/backing_file"):
            found.append(n)
    return found


def clean_leftovers() -> None:
    numbers = leftovers()
    if numbers:
        loops = LoopDevices()
        loops.created.update(numbers)
        loops.close()


def devnode_numbers(number: int) -> Tuple[int, int]:
    with open(f"/sys/block/loop{number}/dev") as f:
        major, minor = f.read().strip().split(":")
    return int(major), int(minor)


def remove_node(number: int) -> None:
    os.unlink(f"/dev/loop{number}")


def restore_node(number: int) -> None:
    """Put /dev/loop<number> back as the kernel's devtmpfs made it (block node, 0660 root:disk)."""
    major, minor = devnode_numbers(number)
    path = f"/dev/loop{number}"
    os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
    try:
        import grp
        os.chown(path, 0, grp.getgrnam("disk").gr_gid)
    except KeyError:
        pass
