"""A real systemd in a container, for integration tests (root only).

A Debian root filesystem is built once with debootstrap and cached under
:data:`CACHE_DIR`, keyed by suite, mirror and package list.  Each
:class:`Container` boots a throw-away copy of it (an overlay over the cache, or a
plain copy where overlayfs is unavailable) with ``systemd-nspawn``, so a test
never dirties the cache.  Commands run inside through ``nsenter``.

Typical use::

    from tests.integration.container import Container, wait_for

    with Container("udp-test") as ct:            # builds the rootfs on first use (~1-2 min)
        ct.install_rpm("dist/udev-device-plugin-0.1.0-1.noarch.rpm")
        ct.systemctl("start", "udev-device-plugin")
        wait_for(lambda: ct.unit_property("udev-device-plugin", "ActiveState") == "active",
                 30, "daemon active")
        print(ct.run("journalctl", "-u", "udev-device-plugin").stdout)

The pieces, all documented below: :func:`require_host`, :func:`rootfs`,
:class:`Container` (``start``/``stop``/context manager, ``run``, ``sh``,
``systemctl``, ``unit_property``, ``journal``, ``write_file``, ``read_file``,
``copy_in``, ``host_path``, ``install_rpm``, ``remove_rpm``) and :func:`wait_for`.

How the boot works on these hosts (no systemd as PID 1, no machined, no system
bus; see docs in shared/TESTING.md): nspawn runs with ``--register=no
--keep-unit`` from a cgroup of its own (created here in the ``unified`` and
``name=systemd`` hierarchies, so the ``payload``/``supervisor`` cgroups it makes
are removed with it); the container's PID 1 is found as the nspawn child named
``systemd``.  ``stop`` ends every process this module started inside, halts the
container, and removes the cgroups, the nspawn propagation directory, the
overlay mount and the scratch copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

CACHE_DIR = os.environ.get("UDP_TEST_CACHE_DIR", "/var/cache/udev-device-plugin-tests")
SUITE = "bookworm"
MIRROR = os.environ.get("UDP_TEST_MIRROR", "http://deb.debian.org/debian")

#: What the cached rootfs holds: a bootable minimal Debian plus exactly the
#: RPM's Requires from Debian packages (a realistic "distro stack"), so a
#: dependency the spec forgot shows up as a failure.  No python3-sdnotify on
#: purpose: RHEL 9 has none, so the RPM does not require it and the daemon
#: must reach systemd through its built-in sd_notify fallback.
#: procps gives /bin/kill (ExecReload=); rpm lets the RPM's scriptlets talk to
#: this container's systemd (host-side ``rpm --root`` scriptlets would run in a
#: chroot where systemctl refuses to act); man-db lets ``systemd-analyze verify``
#: check that the units' Documentation=man: pages are installed.
PACKAGES: Tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "procps", "rpm", "man-db",
    "python3", "python3-grpcio", "python3-protobuf", "python3-pyudev", "python3-click",
)

#: Host commands this module needs, with the Debian package providing each.
HOST_TOOLS: Dict[str, str] = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
    "mount": "mount",
}

CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_CGROUP_HIERARCHIES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup")

T = TypeVar("T")


class HostNotReady(RuntimeError):
    """The host lacks something a container needs; the message says what and how to get it."""


def require_host() -> None:
    """Raise :class:`HostNotReady` unless this host can build and boot containers."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (debootstrap, nspawn, overlay mounts)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append("missing tools; install them with: apt-get install -y " + " ".join(missing))
    if not os.path.isdir("/sys/fs/cgroup"):
        problems.append("no /sys/fs/cgroup")
    if problems:
        raise HostNotReady("; ".join(problems))


def wait_for(predicate: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; return that.

    Raises ``TimeoutError`` naming ``what`` (and the last exception the
    predicate raised, if any) when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


# --- the cached root filesystem ---------------------------------------------------------------

def _cache_key(suite: str, mirror: str, packages: Iterable[str]) -> str:
    text = json.dumps([suite, mirror, sorted(set(packages))])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rootfs(packages: Sequence[str] = PACKAGES, suite: str = SUITE, mirror: str = MIRROR,
           cache_dir: str = CACHE_DIR, log: Callable[[str], None] = print) -> str:
    """Return the path of a cached Debian rootfs holding ``packages``; build it if missing.

    Built with ``debootstrap --variant=minbase --include=...`` into a temporary
    directory and renamed into place when complete, under an exclusive lock, so
    concurrent sessions build it once and a failed build leaves nothing
    half-made behind.  The result must be treated as read-only.
    """
    require_host()
    os.makedirs(cache_dir, exist_ok=True)
    key = _cache_key(suite, mirror, packages)
    path = os.path.join(cache_dir, f"rootfs-{suite}-{key}")
    with open(os.path.join(cache_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(path, ".complete")):
            return path
        tmp = tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir)
        try:
            log(f"container: building rootfs {path} with debootstrap ({suite}, {len(packages)} packages)")
            started = time.monotonic()
            cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(sorted(set(packages))),
                   suite, tmp, mirror]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise HostNotReady(f"debootstrap failed ({proc.returncode}); last output:\n{proc.stdout[-3000:]}")
            # Boot faster and quieter: nothing in a test container needs these.
            for unit in ("systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
                         "e2scrub_all.timer", "fstrim.timer"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(tmp, "etc/systemd/system/timers.target.wants", unit))
            with open(os.path.join(tmp, ".complete"), "w") as f:
                f.write(json.dumps({"suite": suite, "packages": sorted(set(packages))}) + "\n")
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
            log(f"container: rootfs built in {time.monotonic() - started:.0f}s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- cgroups for nspawn ------------------------------------------------------------------------

def _cgroup_dirs(name: str) -> List[str]:
    """One directory per writable hierarchy this host has (v2 unified and/or v1 name=systemd)."""
    dirs: List[str] = []
    for root in _CGROUP_HIERARCHIES:
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            if root == "/sys/fs/cgroup" and dirs:
                continue
            dirs.append(os.path.join(root, name))
    return dirs


def _rmdir_tree(path: str) -> None:
    """Remove an (empty of processes) cgroup directory and its children, deepest first."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(dirpath, d))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _cgroup_empty(path: str) -> bool:
    return not _cgroup_pids(path)


def _cgroup_pids(path: str) -> List[int]:
    pids: List[int] = []
    for dirpath, _, filenames in os.walk(path):
        if "cgroup.procs" in filenames:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f if line.strip())
    return pids


# --- the container -----------------------------------------------------------------------------

Cmd = Union[str, Sequence[str]]


class Container:
    """A booted throw-away copy of the cached rootfs; use as a context manager.

    ``name`` must be unique among running containers on the host.
    ``binds``: ``(host_path, container_path, read_only)`` triples passed to
    nspawn (``--bind``/``--bind-ro``).  ``packages``: the rootfs package list
    (default :data:`PACKAGES`; a different list builds another cached rootfs).
    ``log``: where progress lines go (default ``print``).
    """

    def __init__(self, name: str, packages: Sequence[str] = PACKAGES,
                 binds: Sequence[Tuple[str, str, bool]] = (), log: Callable[[str], None] = print) -> None:
        self.name = name
        self.packages = tuple(packages)
        self.binds = tuple(binds)
        self.log = log
        self.root = ""            # the booted root directory on the host
        self.leader = 0           # the container's PID 1, as a host PID
        self._workdir = ""
        self._overlay = False
        self._nspawn: Optional[subprocess.Popen[bytes]] = None
        self._cgroups: List[str] = []
        self._console = ""

    # -- lifecycle

    def __enter__(self) -> Container:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        """Prepare a scratch root over the cached rootfs and boot it; return when systemd is up."""
        lower = rootfs(self.packages, log=self.log)
        self._workdir = tempfile.mkdtemp(prefix=f"udp-ct-{self.name}-", dir="/var/tmp")
        self.root = os.path.join(self._workdir, "root")
        try:
            self._prepare_root(lower)
            self._boot(timeout)
        except BaseException:
            self.stop()
            raise

    def _prepare_root(self, lower: str) -> None:
        os.makedirs(self.root)
        upper, work = os.path.join(self._workdir, "upper"), os.path.join(self._workdir, "work")
        os.makedirs(upper)
        os.makedirs(work)
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                               f"lowerdir={lower},upperdir={upper},workdir={work}", self.root],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0:
            self._overlay = True
        else:
            self.log(f"container: overlay mount failed ({proc.stdout.strip()}); copying the rootfs instead")
            os.rmdir(self.root)
            subprocess.run(["cp", "-a", "--reflink=auto", lower, self.root], check=True)

    def _boot(self, timeout: float) -> None:
        self._cgroups = _cgroup_dirs(f"udp-test-{self.name}")
        for d in self._cgroups:
            os.makedirs(d, exist_ok=True)
        cgroups = list(self._cgroups)

        def into_own_cgroup() -> None:  # runs in the child between fork and exec
            for d in cgroups:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write("0")

        cmd = ["systemd-nspawn", "-q", "-b", "-D", self.root, "-M", self.name, "--register=no",
               "--keep-unit", "--private-network", "--link-journal=no", "--console=passive"]
        for host, inside, ro in self.binds:
            cmd.append(f"--bind{'-ro' if ro else ''}={host}:{inside}")
        self._console = os.path.join(self._workdir, "console.log")
        started = time.monotonic()
        with open(self._console, "wb") as console:
            self._nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                            preexec_fn=into_own_cgroup)

        def leader() -> int:
            self._check_nspawn_alive()
            assert self._nspawn is not None
            for pid in _children(self._nspawn.pid):
                if _comm(pid) == "systemd":
                    return pid
            return 0

        self.leader = wait_for(leader, timeout, "the container's systemd to start")

        def booted() -> bool:
            self._check_nspawn_alive()
            state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            return state in ("running", "degraded")

        wait_for(booted, timeout, "the container to finish booting", interval=0.05)
        self.log(f"container: {self.name} booted in {time.monotonic() - started:.1f}s (PID 1 = host PID {self.leader})")

    def _check_nspawn_alive(self) -> None:
        if self._nspawn is not None and self._nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited with {self._nspawn.returncode}; console:\n{self.console()}")

    def console(self) -> str:
        """The container's console output so far (boot messages, failures)."""
        with contextlib.suppress(OSError), open(self._console, errors="replace") as f:
            return f.read()[-5000:]
        return ""

    def stop(self, timeout: float = 20) -> None:
        """Halt the container and remove every trace of it; safe to call twice."""
        if self._nspawn is not None:
            if self._nspawn.poll() is None:
                self._nspawn.send_signal(signal.SIGTERM)
                try:
                    self._nspawn.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.log(f"container: {self.name} did not halt in {timeout:g}s; killing it")
                    self._kill_cgroups()
                    self._nspawn.kill()
                    self._nspawn.wait(10)
            self._nspawn = None
        self.leader = 0
        self._kill_cgroups()
        for d in self._cgroups:
            _rmdir_tree(d)
        self._cgroups = []
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}")
        if self._workdir:
            if self._overlay:
                subprocess.run(["umount", self.root], check=False)
                self._overlay = False
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = ""

    def _kill_cgroups(self) -> None:
        for d in self._cgroups:
            for pid in _cgroup_pids(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for d in self._cgroups:
            with contextlib.suppress(TimeoutError):
                wait_for(functools.partial(_cgroup_empty, d), 10, f"processes in {d} to end")

    # -- running things inside

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, input: Optional[str] = None,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (an argv) inside the container with a clean environment; capture text output.

        With ``check`` a non-zero exit raises ``subprocess.CalledProcessError``
        whose message includes stdout and stderr.
        """
        if not self.leader:
            raise RuntimeError("container is not running")
        envv = [f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=cat", "SYSTEMD_COLORS=0"]
        envv += [f"{k}={v}" for k, v in (env or {}).items()]
        argv = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *envv, *cmd]
        # A session of its own, so a timeout kills nsenter's forked child too:
        # a leftover process would be frozen by the container's shutdown.
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                              start_new_session=True) as p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                raise
        proc = subprocess.CompletedProcess(list(cmd), p.returncode, out, err)
        if check and proc.returncode != 0:
            raise _CommandFailed(proc.returncode, list(cmd), proc.stdout, proc.stderr)
        return proc

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container (``/bin/sh -ec``)."""
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of a unit, e.g. ``ActiveState``, ``MainPID``, ``NRestarts``, ``StatusText``."""
        return self.run("systemctl", "show", "-P", prop, unit).stdout.rstrip("\n")

    def journal(self, *args: str) -> List[Dict[str, object]]:
        """Journal entries as dicts (``journalctl -o json ARGS``), oldest first."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    # -- files

    def host_path(self, path: str) -> str:
        """Where a path inside the running container is on the host (through its PID 1's root)."""
        if not self.leader:
            raise RuntimeError("container is not running")
        return f"/proc/{self.leader}/root/{path.lstrip('/')}"

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create or replace a file inside the container (parents are created)."""
        host = self.host_path(path)
        os.makedirs(os.path.dirname(host), exist_ok=True)
        with open(host, "w") as f:
            f.write(text)
        os.chmod(host, mode)

    def read_file(self, path: str) -> str:
        with open(self.host_path(path)) as f:
            return f.read()

    def copy_in(self, src: str, dest: str) -> None:
        """Copy a host file or directory to ``dest`` inside the container."""
        host = self.host_path(dest)
        os.makedirs(os.path.dirname(host.rstrip("/")), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, host, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, host)

    # -- packages

    def install_rpm(self, rpm_path: str, upgrade: bool = True) -> subprocess.CompletedProcess[str]:
        """Install (``rpm -U``, or ``-i``) an RPM inside the container, scriptlets included.

        rpm runs inside, so ``%post``/``%preun``/``%postun`` reach this
        container's systemd.  ``--nodeps``: the dependencies are Debian
        packages, which rpm's database does not know; ``--force-debian``
        silences Debian's rpm warning.
        """
        inside = "/var/tmp/" + os.path.basename(rpm_path)
        self.copy_in(rpm_path, inside)
        return self.run("rpm", "-U" if upgrade else "-i", "--nodeps", "--force-debian", inside, timeout=120)

    def remove_rpm(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.run("rpm", "-e", "--nodeps", name, timeout=120)


class _CommandFailed(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (f"{' '.join(self.cmd)} exited with {self.returncode}\n"
                f"--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}")


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return []
        raise


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""

