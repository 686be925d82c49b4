"""commands.py: prestart and health commands, without a shell, with a timeout that kills the process group."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.conftest import wait_until
from udev_device_plugin import commands
from udev_device_plugin.commands import Result

SH = "/bin/sh"


def _gone(pid: int) -> bool:
    """The process no longer runs: absent, or a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


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
    assert commands.run([SH, "-c", script], {}, 10) == expected


def test_arguments_are_not_given_to_a_shell(tmp_path):
    marker = tmp_path / "marker"
    got = commands.run(["/bin/echo", "a b", f"$(touch {marker})", "*"], {}, 10)
    assert got == Result(True, False, f"a b $(touch {marker}) *")
    assert not marker.exists()


def test_environment_is_minimal_plus_given(monkeypatch):
    monkeypatch.setenv("SECRET_OF_THE_DAEMON", "leak")
    got = commands.run([SH, "-c", 'echo "$UDP_DEVICE_IDS|$LANG|${SECRET_OF_THE_DAEMON-unset}|$PATH"'],
                       {"UDP_DEVICE_IDS": "a0,a1"}, 10)
    assert got.ok
    ids, lang, secret, path = got.detail.split("|")
    assert (ids, lang, secret) == ("a0,a1", "C.UTF-8", "unset")
    assert path == os.environ["PATH"]


def test_output_is_cut_to_its_tail():
    got = commands.run([sys.executable, "-c", "print('x' * 1000 + 'END')"], {}, 10)
    assert got.ok
    assert len(got.detail) == 300 and got.detail.endswith("xEND")


def test_missing_binary(tmp_path):
    missing = str(tmp_path / "no-such-check")
    assert commands.run([missing, "a0"], {}, 10) == Result(False, False,
                                                           f"cannot run {missing}: No such file or directory")


def test_not_executable(tmp_path):
    script = tmp_path / "check"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    got = commands.run([str(script)], {}, 10)
    assert got == Result(False, False, f"cannot run {script}: Permission denied")


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    # The shell's child sleeps on; only killing the group ends it.
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    start = time.monotonic()
    got = commands.run([SH, "-c", script], {}, 1.0)
    elapsed = time.monotonic() - start
    assert got == Result(False, True, f"{SH} did not finish within 1 s")
    assert 1.0 <= elapsed < 5, elapsed
    grandchild = int(pidfile.read_text())
    wait_until(lambda: _gone(grandchild), timeout=5, what=f"grandchild {grandchild} to be killed")


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
        got = commands.run([sys.executable, "-c", code], {}, 1.0)
        elapsed = time.monotonic() - start
        assert got == Result(False, True, f"{sys.executable} did not finish within 1 s")
        assert elapsed < 5, elapsed
    finally:
        wait_until(lambda: pidfile.exists() and pidfile.read_text() != "", timeout=5, what="the escaped pid")
        escaped = int(pidfile.read_text())
        os.kill(escaped, signal.SIGKILL)
        wait_until(lambda: _gone(escaped), timeout=5, what="the escaped sleep to end")
