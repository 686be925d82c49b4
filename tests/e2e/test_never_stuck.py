"""Never silently stuck (issue 9): every lost stream is recovered, the RPCs never starve, and every status
tells the truth.  The real daemon against the stand-in kubelet, in each release's behaviour where it matters."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import List, Tuple

import grpc
import pytest

from tests.standin import BEHAVIOURS
from udev_device_plugin import api, events

from ..conftest import wait_until
from ..journalwire import Journal
from .helpers import MEM, MEM_CONF, cli, our_sockets, rewrite_config, thread_census, threads_bounded, wait_log


def inspect(kubelet_dir: str) -> dict:
    """inspect's JSON by resource; retried while a socket is being replaced (none answers for a moment)."""
    got: List[dict] = []

    def answered() -> bool:
        out = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
        if out.returncode == 0:
            got.append({r["resource"]: r for r in json.loads(out.stdout)["resources"]})
        return bool(got)

    wait_until(answered, what=f"a socket in {kubelet_dir} to answer inspect")
    return got[-1]


def resources_conf(count: int, extra: str = "") -> str:
    return "".join(f"[resource example.com/r{i}]\nsubsystem = mem\nkernel = null\n{extra}" for i in range(count))


@pytest.mark.parametrize("kubelet_behaviour", BEHAVIOURS)
def test_a_stream_the_kubelet_ends_is_followed_by_a_new_registration(kubelet, start_daemon, kubelet_dir):
    """Finding 1: the kubelet never reconnects; we log at WARNING and register again on a fresh socket."""
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    first = kubelet.endpoints(MEM)[-1]
    for n in range(2, 5):
        kubelet.drop(MEM)
        kubelet.wait_live(MEM, count=n, devices=3)
    endpoints = kubelet.endpoints(MEM)
    assert first not in endpoints[1:] and len(set(endpoints)) == len(endpoints)
    wait_log(daemon, "WARNING example.com/mem: the kubelet ended the ListAndWatch stream", count=3)
    [row] = inspect(kubelet_dir).values()
    assert row["registered"] and row["streams_lost"] == 3 and row["endpoint"] == endpoints[-1]
    assert our_sockets(kubelet_dir) == [endpoints[-1]]
    assert kubelet.allocatable(MEM) == 3


def test_without_the_kubelets_stream_nothing_says_registered(kubelet, start_daemon, kubelet_dir, notifications):
    daemon = start_daemon(MEM_CONF, env={"NOTIFY_SOCKET": notifications.path})
    kubelet.wait_live(MEM, devices=3)
    assert inspect(kubelet_dir)[MEM]["registered"]
    kubelet.stop()  # streams end, kubelet.sock goes away
    wait_until(lambda: not inspect(kubelet_dir)[MEM]["registered"], what="inspect to say not registered")
    # It waits for the kubelet once the old connection is gone (draining, at most a second).
    wait_until(lambda: inspect(kubelet_dir)[MEM]["state"] == "waiting", what="inspect to say it waits")
    row = inspect(kubelet_dir)[MEM]
    assert "kubelet.sock" in row["last_error"] and row["stream_since"] == 0
    text = cli("inspect", "--kubelet-dir", kubelet_dir).stdout
    assert f"{MEM}: NOT registered: waiting since " in text
    wait_until(lambda: any("0/1 resource(s) registered" in line or "waiting for the kubelet" in line
                           for line in notifications.lines() if line.startswith("STATUS=")),
               what="STATUS= to say it waits")
    # SIGUSR1 has nothing to register with, and says so.
    os.kill(daemon.pid, signal.SIGUSR1)
    wait_log(daemon, "nothing to do")
    kubelet.start()
    kubelet.wait_live(MEM, count=2, devices=3)
    assert inspect(kubelet_dir)[MEM]["registered"]


@pytest.mark.parametrize("kubelet_behaviour", BEHAVIOURS)
def test_kubelet_sock_attribute_changes_register_nothing(kubelet, start_daemon, kubelet_dir):
    """Finding 3: chmod, chown, restorecon or touch of kubelet.sock, then the path unit's SIGUSR1: a no-op."""
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    for n, mode in enumerate((0o600, 0o660, 0o755), 1):
        kubelet.touch_socket(mode=mode, uid=0, gid=0)
        os.kill(daemon.pid, signal.SIGUSR1)
        wait_log(daemon, "nothing to do", count=n)
    assert len(kubelet.requests) == 1 and kubelet.connected(MEM) and not kubelet.stopped(MEM)


def test_forty_resources_and_a_rogue_client_holding_two_hundred_streams(kubelet, start_daemon, kubelet_dir):
    """Finding 2: streams pin no thread.  40 resources register and answer Allocate; a local client
    holding 200 idle streams (and trying for more) starves nothing; a kubelet restart re-registers all."""
    names = [f"example.com/r{i}" for i in range(40)]
    daemon = start_daemon(resources_conf(40))
    for name in names:
        kubelet.wait_live(name, devices=1, timeout=30)
    threads = thread_census(daemon.pid)

    channels: List[grpc.Channel] = []
    streams = []
    refused = 0
    try:
        sockets = [os.path.join(kubelet_dir, kubelet.endpoints(n)[-1]) for n in names]
        for i in range(200):
            if i % 40 == 0:
                channels = channels + [grpc.insecure_channel("unix:" + p) for p in sockets]
            stream = api.Stub(channels[i]).ListAndWatch(api.Empty())
            next(stream)  # it is open and got its list
            streams.append(stream)
        # One socket more: past the per-socket limit, streams are refused, not queued.
        for _ in range(10):
            extra = api.Stub(channels[0]).ListAndWatch(api.Empty())
            streams.append(extra)  # held: a stream dropped here would be cancelled
            try:
                next(extra)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
        assert refused == 8  # the kubelet's + 5 rogue ones held: at most 8 per socket
        for name in names:
            response = kubelet.allocate(name, ["null"], wait=10)
            assert response.container_responses[0].devices[0].host_path == "/dev/null"
        assert threads_bounded(daemon.pid, threads)  # 200 more streams, not one thread more

        kubelet.restart()
        for name in names:
            kubelet.wait_live(name, count=2, devices=1, timeout=30)
        # The rogue streams were on the old sockets: ended with them (OK, or the refused ones' error).
        for stream in streams:
            with contextlib.suppress(grpc.RpcError):
                for _ in stream:
                    pass
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()
    assert "Traceback" not in daemon.log()


def test_fifty_re_registrations_with_the_1_25_handler_end_live_and_healthy(kubelet_dir, start_daemon):
    """kubernetes#121994: with clients keyed by resource name, an old stream's late end disconnects the
    new registration.  Re-registering every way we do — SIGHUP changing the options, a Register retry
    after a dropped stream, a kubelet restart, kubelet.sock recreated, and SIGUSR1 after a chmod (which
    must not re-register at all) — leaves every resource with a live stream and healthy devices."""
    from .helpers import RecordingKubelet

    two = "[resource example.com/a]\nsubsystem = mem\nkernel = null zero\n" \
          "[resource example.com/b]\nsubsystem = mem\nkernel = full\n"
    with RecordingKubelet(kubelet_dir, behaviour="1.25") as kubelet:
        daemon = start_daemon(two)
        for name in ("example.com/a", "example.com/b"):
            kubelet.wait_live(name, devices=None)
        prestart = False
        done = 0
        for i in range(50):
            before = {n: len(kubelet.endpoints(n)) for n in ("example.com/a", "example.com/b")}
            way = i % 5
            if way == 0:
                prestart = not prestart
                rewrite_config(daemon, two.replace("kernel = full\n", "kernel = full\nprestart_command = /bin/true\n")
                               if prestart else two)
                os.kill(daemon.pid, signal.SIGHUP)
                want = {"example.com/a": before["example.com/a"], "example.com/b": before["example.com/b"] + 1}
            elif way == 1:
                kubelet.refuse = 1  # the retry after the drop is refused once, then accepted
                kubelet.drop("example.com/a")
                want = {"example.com/a": before["example.com/a"] + 1, "example.com/b": before["example.com/b"]}
            elif way == 2:
                kubelet.restart()
                want = {n: c + 1 for n, c in before.items()}
            elif way == 3:
                kubelet.recreate_socket()  # not a restart: our streams live on; registering again is harmless
                want = {n: c + 1 for n, c in before.items()}
            else:
                kubelet.touch_socket(mode=0o600)
                os.kill(daemon.pid, signal.SIGUSR1)
                want = dict(before)
                done += 1
                wait_log(daemon, "nothing to do", count=done)
            for name, count in want.items():
                devices = 2 if name == "example.com/a" else 1
                kubelet.wait_live(name, count=count, devices=devices, timeout=20)
            assert {n: len(kubelet.endpoints(n)) for n in want} == want, f"round {i} (way {way})"
        for name, devices in (("example.com/a", 2), ("example.com/b", 1)):
            assert kubelet.live(name, devices=devices) and not kubelet.stopped(name)
            assert kubelet.allocatable(name) == devices
        assert sorted(our_sockets(kubelet_dir)) == sorted(kubelet.clients[n].endpoint for n in want)
        assert "Traceback" not in daemon.log()


def test_socket_names_are_never_offered_twice_across_reloads(kubelet, start_daemon, kubelet_dir):
    """Finding 6: a reload that rebuilds the kubelet side (its settings changed) keeps counting socket names."""
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    for n, timeout in enumerate(("3", "4", "5"), 2):
        rewrite_config(daemon, f"[plugin]\nregister_timeout = {timeout}\n" + MEM_CONF)
        os.kill(daemon.pid, signal.SIGHUP)
        kubelet.wait_live(MEM, count=n, devices=3)
    endpoints = kubelet.endpoints(MEM)
    assert len(endpoints) == 4 and len(set(endpoints)) == 4


def test_signals_in_the_exit_window_do_not_kill_the_daemon(kubelet, start_daemon):
    """Finding 6: SIGHUP and SIGUSR1 arriving while the daemon stops must not end it by their default action."""
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    daemon.proc.send_signal(signal.SIGTERM)
    while daemon.proc.poll() is None:
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            try:
                daemon.proc.send_signal(sig)
            except ProcessLookupError:
                break
    assert daemon.stop() == 0


# As systemd's sandbox builds it: the tree read-only (ProtectSystem=strict), the socket directory a
# read-write bind mount of itself (ReadWritePaths=), in a mount namespace of the daemon's own.
SANDBOX = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && mount --bind "$0" "$0" '
           '&& mount -o remount,bind,rw "$0" && shift && exec "$@"')


@pytest.mark.parametrize("removed", ["the directory", "its parent"])
def test_a_directory_removed_outside_the_sandbox_exits_for_a_restart(tmp_path, start_daemon, removed):
    """Finding 5: removed on the host, the socket directory is gone for the kubelet but not from the
    sandboxed daemon's view (the bind mount keeps the deleted directory), and a new one cannot be made
    (read-only).  Only a restart, with a new mount namespace, helps: exit non-zero, naming why."""
    base = tmp_path / "root"
    kubelet_dir = str(base / "k" / "dp")  # short: a socket path must fit in 107 bytes
    os.makedirs(kubelet_dir)
    wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", SANDBOX, kubelet_dir, str(base)]
    daemon = start_daemon(MEM_CONF, directory=kubelet_dir, wrapper=wrapper)
    wait_log(daemon, "ready:")
    victim = kubelet_dir if removed == "the directory" else os.path.dirname(kubelet_dir)
    # The daemon answers its socket's deletion with a new one: remove until the directory is gone.
    wait_until(lambda: subprocess.run(["rm", "-rf", victim], capture_output=True).returncode == 0,
               what=f"{victim} removed")
    assert daemon.proc.wait(10) == 1
    log = daemon.log()
    # Linux (since 3.18) detaches a mount whose directory is deleted in another namespace, so the
    # daemon finds the read-only tree where its directory was; older kernels kept showing the deleted
    # directory.  Either way it says why it exits.
    assert "read-only file system here" in log or "was deleted, yet this process still sees it" in log, log
    assert "Traceback" not in log


def test_daemon_threads_are_bounded_whatever_the_load(kubelet, start_daemon, kubelet_dir):
    """The daemon runs on one event loop: gRPC's own few threads and nothing per call, stream or command."""
    daemon = start_daemon(MEM_CONF + "prestart_command = /bin/sh -c 'sleep 0.3'\n")
    kubelet.wait_live(MEM, devices=3)
    threads = thread_census(daemon.pid)
    callers = [subprocess.Popen([sys.executable, "-c", PRESTART_CALLER, os.path.join(kubelet_dir, our_sockets(
        kubelet_dir)[0])]) for _ in range(4)]
    for caller in callers:
        assert caller.wait(60) == 0
    assert threads_bounded(daemon.pid, threads), (threads, thread_census(daemon.pid))


PRESTART_CALLER = """
import sys, threading, grpc
from udev_device_plugin import api
channel = grpc.insecure_channel("unix:" + sys.argv[1])
stub = api.Stub(channel)
errors = []
def call():
    try:
        stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=["null"]), timeout=30)
    except grpc.RpcError as exc:
        errors.append(exc)
threads = [threading.Thread(target=call) for _ in range(10)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
"""


def test_a_journal_that_does_not_read_stalls_nothing(kubelet, start_daemon, tmp_path):
    """More journal entries at start than the journal's socket takes unread (net.unix.max_dgram_qlen):
    every resource still registers and answers, and once the journal reads again it gets every
    entry.  A blocking send would stop the daemon at the first entry the socket refuses."""
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        queue = int(f.read())
    count = max(8, (queue + 50) // 4 + 1)  # each resource: an ADDED entry per device (3), one REGISTERED
    journal = Journal(str(tmp_path / "journal.sock"))  # read only when asked, below
    try:
        conf = resources_conf(count).replace("kernel = null", "kernel = null zero full")
        start_daemon("[plugin]\nevents = journal\n" + conf, env={events.JOURNAL_SOCKET_ENV: journal.path})
        for i in range(count):
            kubelet.wait_live(f"example.com/r{i}", devices=3, timeout=30)
        assert kubelet.allocate(f"example.com/r{count - 1}", ["zero"]).container_responses
        want = sorted((f"example.com/r{i}", d) for i in range(count) for d in ("full", "null", "zero"))

        def added() -> List[Tuple[str, str]]:
            return sorted((e["RESOURCE"], e["DEVICE_ID"]) for e in journal.find(EVENT="ADDED"))

        wait_until(lambda: added() == want, timeout=30, what=f"the journal to get {len(want)} ADDED entries")
    finally:
        journal.close()
