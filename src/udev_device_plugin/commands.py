"""Run the admin's prestart and health commands: no shell, a timeout, the whole process group killed."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence, Set

from .config import ResourceConfig
from .model import Device

# Keep what the command prints in a message short enough for a log line.
_TAIL = 300

# Commands running now, so that stopping the daemon can end them (they run in sessions of
# their own, which systemd's cgroup would end, but a foreground run would not).
_running: Set[subprocess.Popen[bytes]] = set()
_lock = threading.Lock()


@dataclass(frozen=True)
class Result:
    ok: bool
    timed_out: bool
    detail: str


def run(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Result:
    """Run ``argv`` with ``env`` added to a minimal environment; ok is exit status 0."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}
    full_env.update(env)
    try:
        proc = subprocess.Popen(list(argv), env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
    except OSError as exc:
        return Result(False, False, f"cannot run {argv[0]}: {exc.strerror}")
    with _lock:
        _running.add(proc)
    try:
        return _wait(proc, argv, timeout)
    finally:
        with _lock:
            _running.discard(proc)


def run_health_command(res: ResourceConfig, dev: Device) -> Result:
    """``health_command`` for one device: its ID as the last argument, the rest in UDP_* variables."""
    return run(res.health_command + (dev.id,), {
        "UDP_RESOURCE": res.name, "UDP_DEVICE_ID": dev.id, "UDP_DEVNODES": " ".join(dev.devnodes),
        "UDP_SYSPATH": dev.sys_path}, res.health_timeout)


def kill_running() -> int:
    """End every command still running (their process groups); return how many."""
    with _lock:
        procs = list(_running)
    for proc in procs:
        _kill_group(proc)
    return len(procs)


def _wait(proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float) -> Result:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            proc.communicate(timeout=1)
        except subprocess.TimeoutExpired:
            # A descendant left the process group (setsid) and still holds the output pipe.
            assert proc.stdout is not None
            proc.stdout.close()
            proc.wait()
        return Result(False, True, f"{argv[0]} did not finish within {timeout:g} s")
    text = out.decode("utf-8", "replace").strip().replace("\n", " | ")[-_TAIL:]
    if proc.returncode == 0:
        return Result(True, False, text)
    status = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
              else f"exit status {proc.returncode}")
    return Result(False, False, f"{argv[0]} failed with {status}" + (f": {text}" if text else ""))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
