"""The socket directory renamed, removed, or replaced by a file or a symlink (issue 10, findings 3, 4 and 9):
never a loop, a traceback or a socket outside it; one WARNING per event; registered again at the end."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import stat
from typing import Callable, Dict

import pytest

from ..conftest import wait_until
from .helpers import MEM, MEM_CONF, make_stale_socket, our_sockets, wait_log

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def exchange(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE): the directory is replaced in one step."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"renameat2 {a} {b}: {os.strerror(err)}")


def _rmtree(path: str) -> bool:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False  # the daemon put a new socket in while it was being emptied
    return True


def warnings(log: str) -> int:
    return sum(1 for line in log.splitlines() if " WARNING " in line)


def test_renamed_removed_and_replaced_ten_times_each_while_the_kubelet_restarts(tmp_path, start_daemon, kubelet,
                                                                             kubelet_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    parent = os.path.dirname(kubelet_dir)
    aside = os.path.join(parent, "aside")

    def logged(text: str, since: int) -> None:
        """Wait until the daemon logged ``text`` after offset ``since`` of its log."""
        wait_until(lambda: text in daemon.log()[since:], what=f"{text!r} in the daemon log")

    def rename() -> None:
        mark = len(daemon.log())
        os.rename(kubelet_dir, aside)  # mv DIR DIR.old: the daemon makes a new DIR and serves there
        logged("is usable: serving and registering", mark)
        shutil.rmtree(aside)

    def remove() -> None:
        mark = len(daemon.log())
        wait_until(lambda: _rmtree(kubelet_dir), what=f"{kubelet_dir} removed")
        logged("is usable: serving and registering", mark)

    def replaced_by(make: Callable[[str], None], what: str) -> Callable[[], None]:
        def replace() -> None:
            make(aside)
            mark = len(daemon.log())
            exchange(kubelet_dir, aside)  # the path is now the file or symlink; "aside" our directory
            logged(what, mark)
            mark = len(daemon.log())
            exchange(kubelet_dir, aside)  # the directory is back
            logged("is usable: serving and registering", mark)
            os.unlink(aside)
        return replace

    target_file = tmp_path / "a-file"
    target_file.write_text("not a directory")

    def make_file(path: str) -> None:
        with open(path, "w") as f:
            f.write("not a directory")

    events: Dict[str, Callable[[], None]] = {
        "rename": rename,
        "remove": remove,
        "file": replaced_by(make_file, "is a regular file, not a directory"),
        "symlink to a file": replaced_by(lambda p: os.symlink(str(target_file), p), "is a symbolic link"),
        "symlink to a directory": replaced_by(lambda p: os.symlink(str(outside), p), "is a symbolic link"),
    }
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    registrations = 1
    happened = 0
    for event in events.values():
        for _ in range(10):
            event()
            happened += 1
            kubelet.restart()
            registrations += 1
            kubelet.wait_live(MEM, count=registrations, devices=3, timeout=20)
    log = daemon.log()
    assert "Traceback" not in log
    directory = sum(1 for line in log.splitlines() if " WARNING socket directory: " in line)
    assert directory == happened, f"{directory} WARNING lines about the directory for {happened} events"
    # Each round is two events: the directory's, and a kubelet restart (whose stream end is a WARNING,
    # and whose Register can be refused while the stand-in stops).
    assert warnings(log) <= 2 * happened, f"{warnings(log)} WARNING lines for {2 * happened} events"
    assert os.listdir(outside) == [], "a file was created outside the socket directory"
    assert set(os.listdir(parent)) - {"a-file", "elsewhere", "etc0"} == {"dp"}
    assert our_sockets(kubelet_dir) == [kubelet.endpoints(MEM)[-1]]
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("kind", ["file", "symlink to a file", "symlink to a directory"])
def test_not_a_directory_at_start_waits_for_one(tmp_path, start_daemon, kind):
    """Finding 4 at start: no traceback, no exit, no socket anywhere; served once a directory is there."""
    kubelet_dir = str(tmp_path / "sd")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if kind == "file":
        (tmp_path / "sd").write_text("x")
    elif kind == "symlink to a file":
        (tmp_path / "f").write_text("x")
        os.symlink(str(tmp_path / "f"), kubelet_dir)
    else:
        os.symlink(str(outside), kubelet_dir)
    daemon = start_daemon(MEM_CONF, directory=kubelet_dir)
    wait_log(daemon, "waiting for a directory there")
    assert daemon.proc.poll() is None and os.listdir(outside) == []
    os.unlink(kubelet_dir)  # the path missing: the daemon makes the directory itself
    os.makedirs(kubelet_dir, exist_ok=True)
    wait_log(daemon, "is usable: serving and registering")
    wait_until(lambda: len(our_sockets(kubelet_dir)) == 1, what="a socket in the directory")
    log = daemon.log()
    assert "Traceback" not in log and warnings(log) == 1


def test_sockets_are_0600_whatever_the_umask(start_daemon, kubelet, kubelet_dir):
    """Finding 9: under umask 000 the sockets were 0777 and any user could Allocate."""
    daemon = start_daemon(MEM_CONF, wrapper=["sh", "-c", 'umask 000 && exec "$@"', "sh"])
    kubelet.wait_live(MEM, devices=3)
    [name] = our_sockets(kubelet_dir)
    assert stat.S_IMODE(os.lstat(os.path.join(kubelet_dir, name)).st_mode) == 0o600
    assert daemon.proc.poll() is None


def test_start_up_clean_up_removes_only_stale_sockets(start_daemon, kubelet, kubelet_dir):
    """Finding 9: a live socket of another instance stays; a stale one of ours (nobody listens) goes."""
    stale = os.path.join(kubelet_dir, "udevdp-example.com_mem-1-1.sock")
    make_stale_socket(stale)
    live_path = os.path.join(kubelet_dir, "udevdp-example.com_other-2-1.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(live_path)
    live.listen(8)
    try:
        start_daemon(MEM_CONF)
        kubelet.wait_live(MEM, devices=3)
        assert not os.path.exists(stale)
        assert os.path.exists(live_path)
    finally:
        live.close()
