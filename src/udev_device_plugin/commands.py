"""Run the admin's prestart and health commands, bounded in every resource.

- No shell; a minimal environment plus the UDP_* variables.
- Memory: the output (stdout and stderr together) is read as it comes into a tail buffer
  of TAIL_BYTES; a command that prints more than OUTPUT_LIMIT bytes in all is killed, so
  a check that floods (``yes``) costs neither memory nor a CPU for long.
- Time: one deadline covers the run, the kill and the reap.  At the deadline the command's
  process group is killed; a process that still has not exited KILL_GRACE later (stuck in
  uninterruptible sleep: a hung NFS or FUSE server) is *abandoned*: the run returns at once,
  reported as such, and the process is reaped whenever it finally exits.  Nothing waits
  for it: there is no thread per command at all, the event loop watches each process
  through a pidfd (polling waitpid only where the kernel has no pidfd_open).
- Processes: each command runs in a session and process group of its own, and the whole
  group is killed when the command ends, whatever the outcome.  Descendants that left the
  group (``setsid``) are found because the daemon is a child subreaper
  (:func:`become_subreaper`): orphans are re-parented to us, and every child of ours that
  is not a command we started is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import time
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Set

from .config import ResourceConfig
from .model import Device

log = logging.getLogger(__name__)

# What we keep of the output for the message (its end says most: the error).
TAIL_BYTES = 4096
# What a command may print in all before it is killed as broken.
OUTPUT_LIMIT = 1024 * 1024
# How much of the tail goes into a log line or a gRPC error.
DETAIL_CHARS = 300
# After SIGKILL, how long a process may take to exit before it is abandoned.
KILL_GRACE = 1.0
# Abandoned processes (each holds a pidfd until it exits); past this, no new command starts.
MAX_ABANDONED = 64
_READ_CHUNK = 65536
_POLL_INTERVAL = 0.02  # only without pidfd_open
# When, after a command ended, to look for its stray descendants (they are re-parented to us
# when their parent exits, which may be a moment after the command itself did; a sweep that
# killed some looks again, for what those left).
_SWEEPS = (0.0, 0.1)

PR_SET_CHILD_SUBREAPER = 36


class Result(NamedTuple):
    ok: bool
    timed_out: bool
    detail: str
    abandoned: bool = False  # did not exit after SIGKILL: reaped later, when it does
    duration: float = 0.0
    pid: int = 0


def become_subreaper() -> bool:
    """Make orphaned descendants of our commands our children, so that none escapes (``setsid``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _base_env() -> Dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}


def _pidfd(pid: int) -> Optional[int]:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:  # ENOSYS (kernel < 5.3), or a seccomp filter
        return None


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    text = "".join(ch if ch.isprintable() or ch == "\n" else "\ufffd" for ch in text)
    return text.replace("\n", " | ")[-DETAIL_CHARS:]


class _Process:
    """What the runner needs of a child: its PID, its output pipe, its exit status once reaped."""

    def __init__(self, pid: int, out_fd: int) -> None:
        self.pid = pid
        self.out_fd = out_fd
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        """Reap the child if it exited; its exit code (negative: killed by that signal)."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 255  # reaped elsewhere: the status is lost
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _inheritable_fds() -> List[int]:
    """Descriptors above 2 without FD_CLOEXEC (Python makes its own non-inheritable; a library might not)."""
    out: List[int] = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    out.append(fd)
            except OSError:
                continue
    return out


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> _Process:
    """Start ``argv`` in a session of its own, stdin /dev/null, stdout and stderr into one pipe.

    posix_spawn (vfork underneath) rather than fork: a fork copies the daemon's page tables, which
    costs ~1.7 ms of CPU per command on Python 3.9 (EL9) against ~0.1 ms.  Raises OSError when the
    program cannot be executed, ValueError for an embedded NUL.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_DUP2, write_fd, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in (read_fd, write_fd)]
    try:
        pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=actions, setsid=True)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return _Process(pid, read_fd)


class _Run:
    """One command in flight: its process, its pipe, its exit."""

    def __init__(self, runner: Runner, proc: _Process, argv: Sequence[str]) -> None:
        self.runner = runner
        self.loop = runner.loop
        self.proc = proc
        self.argv = argv
        self.tail = bytearray()
        self.total = 0
        self.flooded = False
        self.eof = asyncio.Event()
        self.exited = asyncio.Event()
        self.out_fd: Optional[int] = proc.out_fd
        os.set_blocking(proc.out_fd, False)
        self.loop.add_reader(self.out_fd, self._read)
        self.pidfd = _pidfd(proc.pid)
        self._poll: Optional[asyncio.TimerHandle] = None
        if self.pidfd is not None:
            self.loop.add_reader(self.pidfd, self._check_exit)
        else:
            self._poll = self.loop.call_later(_POLL_INTERVAL, self._check_exit)

    def _read(self) -> None:
        assert self.out_fd is not None
        try:
            data = os.read(self.out_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_output()
            return
        self.total += len(data)
        self.tail += data
        if len(self.tail) > TAIL_BYTES:
            del self.tail[:-TAIL_BYTES]
        if self.total > OUTPUT_LIMIT and not self.flooded:
            self.flooded = True
            self.kill()
            self._close_output()

    def _close_output(self) -> None:
        if self.out_fd is not None:
            self.loop.remove_reader(self.out_fd)
            os.close(self.out_fd)
            self.out_fd = None
        self.eof.set()

    def _check_exit(self) -> None:
        self._poll = None
        try:
            # WNOWAIT: look without reaping, so the group can be killed while its leader's PID
            # (the group's ID) still cannot be given to another process.
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            exited = True
        else:
            exited = info is not None
        if not exited:
            if self.pidfd is None:
                self._poll = self.loop.call_later(_POLL_INTERVAL, self._check_exit)
            return
        self.kill()  # what the command left in its process group
        if self.proc.poll() is None:  # pragma: no cover - waitid said it exited
            self.proc.returncode = 255
        self._stop_watching_exit()
        self.exited.set()
        self.runner._reaped(self)

    def _stop_watching_exit(self) -> None:
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def kill(self) -> None:
        """SIGKILL the command's process group (its leader is not reaped yet, so the group is still ours)."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Runner:
    """Runs commands on one asyncio event loop; see the module docstring for the bounds."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None, reap_strays: bool = False,
                 max_abandoned: int = MAX_ABANDONED) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.reap_strays = reap_strays
        self.max_abandoned = max_abandoned
        self.running: Set[_Run] = set()
        self.abandoned: Dict[int, _Run] = {}
        self.strays_killed = 0
        self._sweeps: List[asyncio.TimerHandle] = []
        self._closed = False

    async def run(self, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Result:
        """Run ``argv`` with ``env`` added to a minimal environment; ok is exit status 0."""
        started = time.monotonic()
        deadline = started + timeout
        if self._closed:
            return Result(False, False, "the daemon is stopping")
        if len(self.abandoned) >= self.max_abandoned:
            return Result(False, False, f"not started: {len(self.abandoned)} earlier commands are stuck in "
                          "uninterruptible sleep and were abandoned")
        full_env = _base_env()
        full_env.update(env)
        try:
            proc = spawn(argv, full_env)
        except OSError as exc:
            return Result(False, False, f"cannot run {argv[0]}: {exc.strerror or exc}")
        except ValueError as exc:  # an embedded NUL byte (the config refuses those)
            return Result(False, False, f"cannot run {argv[0]!r}: {exc}")
        run = _Run(self, proc, argv)
        self.running.add(run)
        try:
            return await self._wait(run, deadline, timeout, started)
        finally:
            self.running.discard(run)

    async def _wait(self, run: _Run, deadline: float, timeout: float, started: float) -> Result:
        timed_out = False
        try:
            await asyncio.wait_for(run.exited.wait(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            timed_out = True
            run.kill()
            try:
                await asyncio.wait_for(run.exited.wait(), KILL_GRACE)
            except asyncio.TimeoutError:
                return self._abandon(run, timeout, started)
        # The command exited: what is left of its output arrives at once, unless a descendant
        # that left the group still holds the pipe (it is being killed by the sweep).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.eof.wait(), 0.1)
        run._close_output()
        duration = time.monotonic() - started
        argv0 = run.argv[0]
        text = _printable(bytes(run.tail))
        if run.flooded:
            return Result(False, False, f"{argv0} printed more than {OUTPUT_LIMIT // 1048576} MiB and was killed: "
                          f"...{text[-100:]}", duration=duration)
        if timed_out:
            return Result(False, True, f"{argv0} did not finish within {timeout:g} s", duration=duration)
        code = run.proc.returncode
        if code is None:  # the runner was closed: the daemon is stopping
            return Result(False, False, f"{argv0} was killed: the daemon is stopping", duration=duration)
        if code == 0:
            return Result(True, False, text, duration=duration)
        status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return Result(False, False, f"{argv0} failed with {status}" + (f": {text}" if text else ""),
                      duration=duration)

    def _abandon(self, run: _Run, timeout: float, started: float) -> Result:
        run._close_output()
        self.abandoned[run.proc.pid] = run
        log.warning("%s (pid %d) did not exit within %g s of SIGKILL (uninterruptible sleep?); abandoned, "
                    "it is reaped when it exits (%d abandoned)", run.argv[0], run.proc.pid, KILL_GRACE,
                    len(self.abandoned))
        return Result(False, True, f"{run.argv[0]} did not finish within {timeout:g} s and did not exit after "
                      "SIGKILL (stuck in uninterruptible sleep)", abandoned=True,
                      duration=time.monotonic() - started, pid=run.proc.pid)

    async def wait_abandoned(self, pid: int) -> None:
        """Return once the abandoned command ``pid`` has exited and was reaped (or the runner closed)."""
        run = self.abandoned.get(pid)
        if run is not None:
            await run.exited.wait()

    def _reaped(self, run: _Run) -> None:
        """Called once a command's leader has exited and was reaped."""
        if self.abandoned.pop(run.proc.pid, None) is not None:
            log.info("abandoned command %s (pid %d) exited at last", run.argv[0], run.proc.pid)
        if self.reap_strays:
            self._schedule_sweeps()

    # --- stray descendants ----------------------------------------------------------------

    def _schedule_sweeps(self) -> None:
        if self._sweeps or self._closed:
            return  # sweeps are scheduled already; they cover this command too
        self._sweeps = [self.loop.call_later(delay, self._sweep, i == len(_SWEEPS) - 1)
                        for i, delay in enumerate(_SWEEPS)]

    def _sweep(self, last: bool = False) -> None:
        if last:
            self._sweeps = []
        killed = kill_strays({r.proc.pid for r in self.running} | set(self.abandoned))
        self.strays_killed += killed
        if killed and last:
            self._schedule_sweeps()  # reap what was just killed, and what it left

    def close(self) -> None:
        """End every command still running (their process groups) and what they left behind."""
        self._closed = True
        for handle in self._sweeps:
            handle.cancel()
        self._sweeps = []
        for run in list(self.running) + list(self.abandoned.values()):
            run.kill()
            run._close_output()
            run._stop_watching_exit()
            run.exited.set()
        if self.reap_strays:
            kill_strays({r.proc.pid for r in self.running} | set(self.abandoned))

    def stats(self) -> Dict[str, int]:
        return {"running": len(self.running), "abandoned": len(self.abandoned), "strays_killed": self.strays_killed}


def children() -> Set[int]:
    """Our child processes (of every thread), from /proc/self/task/*/children."""
    out: Set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                out.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def kill_strays(known: Set[int]) -> int:
    """SIGKILL and reap every child of ours that is not a command in ``known``; return how many.

    Only meaningful in the daemon process (a subreaper that starts no other children).  A
    child cannot be replaced by another process under the same PID until we reap it, so
    killing by PID here is race-free.
    """
    killed = 0
    for pid in children() - known:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    if killed:
        log.info("killed %d process(es) that commands left behind", killed)
    # Reap what has exited, ours or re-parented; never block, never touch the commands.
    for pid in children() - known:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        except OSError as exc:  # pragma: no cover
            if exc.errno != errno.ECHILD:
                raise
    return killed


def health_command_args(res: ResourceConfig, dev: Device) -> tuple:
    """``health_command`` for one device: its ID as the last argument, the rest in UDP_* variables."""
    return (res.health_command + (dev.id,), {
        "UDP_RESOURCE": res.name, "UDP_DEVICE_ID": dev.id, "UDP_DEVNODES": " ".join(dev.devnodes),
        "UDP_SYSPATH": dev.sys_path})


def run_health_command(res: ResourceConfig, dev: Device) -> Result:
    """Run one health check outside the daemon (``list``), with the same bounds."""
    argv, env = health_command_args(res, dev)
    return run_sync(argv, env, res.health_timeout)


def run_sync(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Result:
    """:meth:`Runner.run` for callers without an event loop of their own."""
    async def main() -> Result:
        runner = Runner(asyncio.get_running_loop())
        try:
            return await runner.run(argv, env, timeout)
        finally:
            runner.close()

    return asyncio.run(main())
