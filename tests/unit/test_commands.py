"""commands.py: prestart and health commands, without a shell, with one deadline that covers the kill,
bounded output, and the whole process group (and, in the daemon, every stray descendant) ended."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import process_gone, wait_until
from udev_device_plugin import commands
from udev_device_plugin.commands import Result

SH = "/bin/sh"


def run(argv, env, timeout):
    """The runner on an event loop of its own; the result without its timing fields."""
    got = commands.run_sync(argv, env, timeout)
    return Result(got.ok, got.timed_out, got.detail)


@pytest.mark.parametrize("script, expected", [
    ("exit 0", Result(True, False, "")),
    ("echo ready", Result(True, False, "ready")),
    ("echo one; echo two >&2; echo", Result(True, False, "one | two")),
    ("exit 3", Result(False, False, f"{SH} failed with exit status 3")),
    ("echo out; echo err >&2; exit 1", Result(False, False, f"{SH} failed with exit status 1: out | err")),
    ("kill -TERM $$", Result(False, False, f"{SH} failed with killed by signal {int(signal.SIGTERM)}")),
    ("cat", Result(True, False, "")),  # stdin is /dev/null, not the daemon's
])
def test_exit_status_and_output(script, expected):
    assert run([SH, "-c", script], {}, 10) == expected


def test_arguments_are_not_given_to_a_shell(tmp_path):
    marker = tmp_path / "marker"
    got = run(["/bin/echo", "a b", f"$(touch {marker})", "*"], {}, 10)
    assert got == Result(True, False, f"a b $(touch {marker}) *")
    assert not marker.exists()


def test_environment_is_minimal_plus_given(monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_DAEMON", "leak")
    got = run([SH, "-c", 'echo "$UDP_DEVICE_IDS|$LANG|${SECRET_OF_THE_DAEMON-unset}|$PATH"'],
                       {"UDP_DEVICE_IDS": "a0,a1"}, 10)
    assert got.ok
    ids, lang, secret, path = got.detail.split("|")
    assert (ids, lang, secret) == ("a0,a1", "C.UTF-8", "unset")
    assert path == os.environ["PATH"]


def test_output_is_cut_to_its_tail():
    got = run([sys.executable, "-c", "print('x' * 1000 + 'END')"], {}, 10)
    assert got.ok
    assert len(got.detail) == 300 and got.detail.endswith("xEND")


def test_missing_binary(tmp_path):
    missing = str(tmp_path / "no-such-check")
    assert run([missing, "a0"], {}, 10) == Result(False, False, f"cannot run {missing}: No such file or directory")


def test_not_executable(tmp_path):
    script = tmp_path / "check"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    got = run([str(script)], {}, 10)
    assert got == Result(False, False, f"cannot run {script}: Permission denied")


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    # The shell's child sleeps on; only killing the group ends it.
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    got = run([SH, "-c", script], {}, 1.0)
    elapsed = time.monotonic() - start
    assert got == Result(False, True, f"{SH} did not finish within 1 s")
    assert 1.0 <= elapsed < 5, elapsed
    grandchild = int(pidfile.read_text())
    wait_until(lambda: process_gone(grandchild), timeout=5, what=f"grandchild {grandchild} to be killed")


def test_timeout_returns_even_when_a_descendant_escaped_the_group(tmp_path):
    """A descendant in a session of its own survives the kill and holds the output pipe: run() must
    still return, shortly after the timeout."""
    pidfile = tmp_path / "escaped.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen(['sleep', '20'], start_new_session=True)\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(300)\n")
    try:
        start = time.monotonic()
        got = run([sys.executable, "-c", code], {}, 1.0)
        elapsed = time.monotonic() - start
        assert got == Result(False, True, f"{sys.executable} did not finish within 1 s")
        assert elapsed < 5, elapsed
    finally:
        wait_until(lambda: pidfile.exists() and pidfile.read_text() != "", timeout=5, what="the escaped pid")
        escaped = int(pidfile.read_text())
        os.kill(escaped, signal.SIGKILL)
        wait_until(lambda: process_gone(escaped), timeout=5, what="the escaped sleep to end")


def test_a_flood_of_output_is_cut_off_and_killed():
    """A check that prints without end (``yes``) is killed once it printed OUTPUT_LIMIT: the runner keeps
    only a tail, so neither memory nor a CPU goes to it for long."""
    start = time.monotonic()
    got = commands.run_sync(["/usr/bin/yes", "flood"], {}, 30)
    assert not got.ok and not got.timed_out
    assert "printed more than" in got.detail and got.detail.endswith("flood")
    assert time.monotonic() - start < 10  # killed, not timed out after 30 s


def test_output_on_stdout_and_stderr_interleaved_keeps_the_tail_only():
    code = "import sys\nfor i in range(20000):\n    print(i, file=sys.stdout if i % 2 else sys.stderr, flush=True)\n"
    got = commands.run_sync([sys.executable, "-c", code], {}, 30)
    assert got.ok and got.detail.endswith("19998 | 19999") and len(got.detail) <= commands.DETAIL_CHARS


def test_control_characters_do_not_reach_the_message():
    got = commands.run_sync(["/usr/bin/printf", "bad\\033[31m\\000news\\n"], {}, 10)
    assert got.ok and "\033" not in got.detail and "\0" not in got.detail and got.detail.endswith("news")


def test_a_nul_byte_in_an_argument_is_an_error_not_a_crash():
    got = commands.run_sync(["/bin/echo", "a\0b"], {}, 10)
    assert not got.ok and "cannot run" in got.detail


def test_processes_a_command_detached_are_ended_in_the_daemon(tmp_path):
    """In the daemon (a child subreaper), descendants that left the command's session with setsid are
    killed once the command ends.  Run in a process of its own: the sweep kills every child of the
    process that is not a command, which here would be pytest's."""
    pids = tmp_path / "pids"
    script = f"""
import asyncio, sys
from udev_device_plugin import commands
assert commands.become_subreaper()
async def main():
    runner = commands.Runner(asyncio.get_running_loop(), reap_strays=True)
    got = await runner.run(["/bin/sh", "-c", "for i in 1 2 3; do setsid sleep 300 & echo $! >> {pids}; done"], {{}}, 10)
    assert got.ok, got
    for _ in range(500):
        if runner.strays_killed >= 3 and not commands.children():
            break
        await asyncio.sleep(0.01)
    print(runner.strays_killed, sorted(commands.children()))
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    killed, children = out.stdout.split(" ", 1)
    assert int(killed) >= 3 and children.strip() == "[]"
    for pid in map(int, pids.read_text().split()):
        wait_until(lambda pid=pid: process_gone(pid), timeout=5, what=f"stray {pid} to be gone")


def test_too_many_abandoned_commands_refuse_new_ones():
    async def main():
        runner = commands.Runner(asyncio.get_running_loop(), max_abandoned=0)
        try:
            return await runner.run(["/bin/true"], {}, 5)
        finally:
            runner.close()

    got = asyncio.run(main())
    assert not got.ok and "uninterruptible sleep" in got.detail
