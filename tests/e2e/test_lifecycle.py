"""Signals (TERM, INT, HUP), leftovers of earlier runs, and what the daemon may touch on disk."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import threading

import grpc
import pytest

from udev_device_plugin import entry

from ..conftest import wait_until
from .helpers import (
    LOOP,
    LOOP_CONF,
    MEM,
    MEM_CONF,
    make_stale_socket,
    our_sockets,
    rewrite_config,
    wait_log,
)

ZERO = "example.com/zero"
ZERO_CONF = f"""\
[resource {ZERO}]
subsystem = mem
kernel = zero
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_stop(kubelet, start_daemon, kubelet_dir, sig):
    daemon = start_daemon(MEM_CONF + LOOP_CONF)
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live(LOOP, devices=8)
    assert len(our_sockets(kubelet_dir)) == 2

    assert daemon.stop(sig, timeout=5) == 0
    assert our_sockets(kubelet_dir) == []
    assert os.listdir(kubelet_dir) == ["kubelet.sock"]  # the kubelet's socket is not ours to remove
    # The kubelet saw our streams end: capacity stays, nothing allocatable.
    assert kubelet.wait_for(lambda: not kubelet.connected(MEM) and not kubelet.connected(LOOP), 10)
    assert kubelet.allocatable(MEM) == kubelet.allocatable(LOOP) == 0
    assert f"{signal.Signals(sig).name} received: stopping" in daemon.log()


def test_stop_while_a_prestart_command_runs(kubelet, start_daemon, kubelet_dir, tmp_path):
    """A PreStartContainer call in progress does not hold the exit past 5 s."""
    started = tmp_path / "started"
    daemon = start_daemon(MEM_CONF.replace("kernel = null zero full", "kernel = null")
                          + f"prestart_command = /bin/sh -c 'echo $$ > {started}.tmp; mv {started}.tmp {started}; "
                          "exec sleep 25'\nprestart_timeout = 29\n")
    kubelet.wait_live(MEM, devices=1)
    errors = []

    def call():
        try:
            kubelet.prestart(MEM, ["null"])
        except grpc.RpcError as exc:
            errors.append(exc.code())

    caller = threading.Thread(target=call)
    caller.start()
    try:
        wait_until(started.exists, what="the prestart command to start")
        assert daemon.stop(signal.SIGTERM, timeout=5) == 0
        assert our_sockets(kubelet_dir) == []
    finally:
        if started.exists():  # the command runs in its own session: end it whatever happened
            try:
                os.killpg(int(started.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        caller.join(30)
    # The call ends with the server (grpc.aio reports the cancelled call as CANCELLED or UNAVAILABLE).
    assert errors in ([grpc.StatusCode.UNAVAILABLE], [grpc.StatusCode.CANCELLED])


def test_sighup_reload(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(MEM_CONF + LOOP_CONF)
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live(LOOP, devices=8)
    [mem_endpoint] = kubelet.endpoints(MEM)
    [loop_endpoint] = kubelet.endpoints(LOOP)

    # mem unchanged, loop removed, zero added.
    rewrite_config(daemon, MEM_CONF + ZERO_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    kubelet.wait_live(ZERO, devices=1)
    wait_log(daemon, "configuration reloaded: 2 resource(s)")
    assert kubelet.wait_for(lambda: not kubelet.connected(LOOP), 10)
    assert kubelet.endpoints(MEM) == [mem_endpoint] and kubelet.connected(MEM)
    assert kubelet.client(MEM).endpoint == mem_endpoint
    assert sorted(our_sockets(kubelet_dir)) == sorted([mem_endpoint, kubelet.endpoints(ZERO)[0]])
    assert loop_endpoint not in our_sockets(kubelet_dir)
    assert kubelet.allocatable(LOOP) == 0
    assert kubelet.allocate(MEM, ["full"]).container_responses[0].devices[0].host_path == "/dev/full"

    # An invalid config is logged, naming the key, and the running one is kept.
    rewrite_config(daemon, MEM_CONF + "colour = blue\n" + LOOP_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "keeping the running configuration")
    assert "colour" in daemon.log()
    assert len(kubelet.requests) == 3
    assert kubelet.connected(MEM) and kubelet.connected(ZERO) and not kubelet.connected(LOOP)
    assert kubelet.allocate(ZERO, ["zero"]).container_responses[0].devices[0].host_path == "/dev/zero"

    # A drop-in brings loop back.  A resource whose selection or templates changed keeps its socket and
    # its registration (the kubelet reads those through ListAndWatch and Allocate): a needless
    # re-registration is what kubelets 1.25-1.35 turn into a lost stream (kubernetes#121994).
    conf_d = os.path.join(os.path.dirname(daemon.cmd[daemon.cmd.index("--config") + 1]), "conf.d")
    os.mkdir(conf_d)
    with open(os.path.join(conf_d, "50-loop.conf"), "w") as f:
        f.write(LOOP_CONF)
    rewrite_config(daemon, MEM_CONF + "permissions = r\n" + ZERO_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    kubelet.wait_live(LOOP, count=2, devices=8)
    wait_log(daemon, "configuration reloaded: 3 resource(s)")
    wait_log(daemon, f"{MEM}: configuration changed; devices rescanned, registration kept")
    assert kubelet.endpoints(MEM) == [mem_endpoint] and kubelet.connected(MEM)
    assert len(kubelet.endpoints(ZERO)) == 1
    assert kubelet.allocate(MEM, ["null"]).container_responses[0].devices[0].permissions == "r"
    assert len(kubelet.requests) == 4

    # What the kubelet reads at registration (pre_start_required) changed: registered again, on a fresh socket.
    rewrite_config(daemon, MEM_CONF + "permissions = r\nprestart_command = /bin/true\n" + ZERO_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    kubelet.wait_live(MEM, count=2, devices=3)
    assert kubelet.endpoints(MEM)[-1] != mem_endpoint
    assert kubelet.client(MEM).options.pre_start_required
    assert len(kubelet.requests) == 5

    # The same config again: nothing re-registers.
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "configuration reloaded: 3 resource(s)", count=3)
    assert len(kubelet.requests) == 5
    assert len(our_sockets(kubelet_dir)) == 3


def test_stale_socket_of_a_killed_daemon_is_removed(kubelet, start_daemon, kubelet_dir):
    first = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    [stale] = our_sockets(kubelet_dir)
    first.proc.kill()
    first.stop()
    assert our_sockets(kubelet_dir) == [stale]  # kill -9 leaves it

    start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, count=2, devices=3)
    new = kubelet.endpoints(MEM)[-1]
    assert our_sockets(kubelet_dir) == [new]


def test_symlinks_and_foreign_files_are_never_followed_or_removed(kubelet, start_daemon, kubelet_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim_file = outside / "victim"
    victim_file.write_text("keep me\n")
    victim_socket = outside / "victim.sock"
    make_stale_socket(str(victim_socket))
    victim_inode = os.lstat(victim_socket).st_ino

    # Entries named like ours that are not our sockets: symlinks to a socket and to a file elsewhere,
    # a regular file, a directory.
    planted = {
        "udevdp-example.com_mem-1-1.sock": str(victim_socket),
        "udevdp-example.com_mem-1-2.sock": str(victim_file),
    }
    for name, target in planted.items():
        os.symlink(target, os.path.join(kubelet_dir, name))
    with open(os.path.join(kubelet_dir, "udevdp-notes.sock"), "w") as f:
        f.write("not a socket\n")
    os.mkdir(os.path.join(kubelet_dir, "udevdp-dir.sock"))

    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    [first] = kubelet.endpoints(MEM)

    # Symlinks at the very names the daemon will use next, for its next socket.
    pid, seq = daemon.pid, int(first.rsplit("-", 1)[1].split(".")[0])
    for offset, target in ((1, victim_file), (2, victim_socket)):
        os.symlink(str(target), os.path.join(kubelet_dir, f"udevdp-example.com_mem-{pid}-{seq + offset}.sock"))
    os.unlink(os.path.join(kubelet_dir, first))
    kubelet.wait_live(MEM, count=2, devices=3)
    assert daemon.stop() == 0

    assert victim_file.read_text() == "keep me\n"
    assert stat.S_ISSOCK(os.lstat(victim_socket).st_mode) and os.lstat(victim_socket).st_ino == victim_inode
    for name, target in planted.items():
        assert os.readlink(os.path.join(kubelet_dir, name)) == target
    assert os.readlink(os.path.join(kubelet_dir, f"udevdp-example.com_mem-{pid}-{seq + 1}.sock")) == str(victim_file)
    assert os.path.isfile(os.path.join(kubelet_dir, "udevdp-notes.sock"))
    assert os.path.isdir(os.path.join(kubelet_dir, "udevdp-dir.sock"))
    assert our_sockets(kubelet_dir) == []


AUDIT_HOOK = '''\
"""Loaded into the daemon by the test (PYTHONPATH): log every filesystem write Python makes."""
import os
import sys

_log = open(os.environ["UDP_TEST_AUDIT_LOG"], "a", buffering=1)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir": 1, "os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.link": 2, "os.chmod": 1,
                "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.mkfifo": 1, "os.mknod": 1, "shutil.rmtree": 1}


# Where the call takes a directory descriptor, the position of its argument (per path argument).
_DIR_FD = {"os.remove": (1,), "os.rmdir": (1,), "os.mkdir": (2,), "os.chmod": (2,), "os.rename": (2, 3),
           "os.chown": (3,), "os.mknod": (3,), "os.mkfifo": (2,), "os.utime": (3,)}


def _note(event, path, dir_fd=None):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.fsdecode(path)
        if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        # realpath: /proc/self/fd/N/name names a file in the directory N is open on.
        _log.write(f"{event} {os.path.realpath(path)}\\n")


def _hook(event, args):
    try:
        if event == "open":
            path, _mode, flags = args
            if not isinstance(path, int) and flags is not None and flags & _WRITE:
                _note("open", path)
        elif event in _PATH_EVENTS:
            fds = _DIR_FD.get(event, ())
            for i, path in enumerate(args[:_PATH_EVENTS[event]]):
                _note(event, path, args[fds[i]] if i < len(fds) and fds[i] < len(args) else None)
        elif event == "os.symlink":
            _note(event, args[1])
        elif event == "socket.bind" and isinstance(args[1], (str, bytes)) and args[1][:1] not in ("\\0", b"\\0"):
            _note(event, args[1])
    except Exception:
        pass


sys.addaudithook(_hook)
'''


def test_no_writes_outside_kubelet_dir(kubelet, start_daemon, kubelet_dir, tmp_path):
    """Every write Python makes in the daemon (open for writing, mkdir, unlink, rename, chmod, bind ...)
    is under kubelet_dir, through start, registration, a kubelet restart, RPCs, reload and stop.  (gRPC
    creates the plugin sockets in C, unaudited, at the paths the daemon names: checked by the tests that
    list the directory.)"""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    audit = tmp_path / "audit.log"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")])),
           "UDP_TEST_AUDIT_LOG": str(audit), "PYTHONDONTWRITEBYTECODE": "1"}
    # A stale socket for the daemon to remove: proof that the hook sees its writes.
    make_stale_socket(os.path.join(kubelet_dir, "udevdp-example.com_mem-1-1.sock"))
    daemon = start_daemon(MEM_CONF + "prestart_command = /bin/true\n"
                          "health_command = /bin/sh -c 'test \"$0\" != full'\n" + LOOP_CONF, env=env)
    kubelet.wait_live(MEM)
    kubelet.wait_live(LOOP, devices=8)
    kubelet.wait_for(lambda: kubelet.health(MEM).get("full") == "Unhealthy", 10)
    kubelet.allocate(MEM, ["null"])
    kubelet.prestart(MEM, ["null"])
    kubelet.preferred(LOOP, ["loop1", "loop2"], [], 1)
    kubelet.restart()
    kubelet.wait_live(MEM, count=2)
    os.kill(daemon.pid, signal.SIGUSR1)
    rewrite_config(daemon, MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_log(daemon, "configuration reloaded")
    kubelet.wait_live(MEM, count=3)  # the changed resource registered again
    assert daemon.stop() == 0

    writes = audit.read_text().splitlines()
    assert f"os.remove {kubelet_dir}/udevdp-example.com_mem-1-1.sock" in writes
    outside = [w for w in writes
               if not (w.split(" ", 1)[1] + "/").startswith(kubelet_dir + "/") and w != "open /dev/null"]
    assert outside == []


def test_kubelet_dir_removed_and_recreated(kubelet, start_daemon, kubelet_dir):
    """The whole directory goes away (a kubelet reinstalled): the daemon recreates it and serves again."""
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    kubelet.stop()
    # The daemon answers its socket's deletion with a new socket, which can land in the directory
    # while rmtree empties it (rmdir then fails ENOTEMPTY): remove until the directory is gone.
    wait_until(lambda: _removed(kubelet_dir), what=f"{kubelet_dir} removed")
    wait_log(daemon, "was removed")
    wait_log(daemon, "is usable: serving and registering")
    wait_until(lambda: os.path.isdir(kubelet_dir) and our_sockets(kubelet_dir), what="a socket in the new directory")
    kubelet.start()
    kubelet.wait_live(MEM, count=2, devices=3)
    assert our_sockets(kubelet_dir) == [kubelet.endpoints(MEM)[-1]]


def _removed(path: str) -> bool:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


@pytest.mark.parametrize("admins", [None, ("-event_engine_client", "5000")], ids=["ours", "the admin's"])
def test_the_start_line_names_grpcio_and_the_settings_it_runs_with(kubelet, start_daemon, admins):
    """``serve`` chooses gRPC core's own listener where its grpcio knows the switch and turns the client
    channels' backup poller off (entry.py), says so in its first line, and leaves an admin's own
    GRPC_EXPERIMENTS and backup poll interval as they are."""
    env = {"GRPC_EXPERIMENTS": admins[0], entry.BACKUP_POLL: admins[1]} if admins is not None else {}
    daemon = start_daemon(MEM_CONF, env=env)
    kubelet.wait_live(MEM, devices=3)
    release = tuple(int(part) for part in grpc.__version__.split(".")[:2])
    first, last = entry.GRPC_EXPERIMENTS_RELEASES
    if admins is not None:
        experiments, poll = admins
    else:
        experiments, poll = ("-event_engine_listener" if first <= release <= last else None), "0"
    settings = (f"GRPC_EXPERIMENTS={experiments} " if experiments else "") + f"{entry.BACKUP_POLL}={poll}"
    line = next(line for line in daemon.log().splitlines() if "udev-device-plugin starting:" in line)
    assert line.endswith(f"; grpcio {grpc.__version__} ({settings})")
