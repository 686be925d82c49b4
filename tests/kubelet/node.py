"""A real node for the tests and the benchmark: containerd 1.6 + runc and a kubelet v1.20.2, standalone
(static pods, no API server), in a private mount namespace of their own.

Layout (``base`` is a short directory the caller owns; UNIX socket paths are limited to 107 bytes)::

    base/dp          bind-mounted on /var/lib/kubelet/device-plugins (1.20 hard-codes that path); the
                     daemon runs outside the namespace with --kubelet-dir base/dp
    base/varlib      bind-mounted on /var/lib   (so the mount point above exists without touching the host)
    base/varlog      bind-mounted on /var/log   (the kubelet's /var/log/pods and /var/log/containers)
    base/run         bind-mounted on /run       (containerd's shim sockets and runc state)
    base/kroot       the kubelet's --root-dir
    base/c           containerd's root, state, socket and config
    base/manifests   --pod-manifest-path: one JSON file per static pod
    base/sysctl      files bind-mounted over the sysctls the kubelet would otherwise set on the host

The kubelet sets six sysctls when they differ from what it wants (``setupKernelTunables``, fatal if a
write fails); files with those values are bind-mounted over the ones that differ, inside the namespace
only, so the host's values are never changed.  Every process runs detached (not a child of the test
process, as the project's udevd does) and is watched through a pidfd; :meth:`Node.close` ends each of
them, every process left in the namespace (containerd shims), and the cgroups the containers had.
"""

from __future__ import annotations

import calendar
import ctypes
import glob
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from . import images

NODE_NAME = "udevdp-node"  # --hostname-override; static pods are named "<pod>-udevdp-node"
NAMESPACE = "default"
CRI_NAMESPACE = "k8s.io"
# Where containerd puts each container's cgroup when the kubelet (cgroups-per-qos=false) names no parent.
CGROUP_PARENT = "k8s.io"
KUBELET_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
# The values the kubelet 1.20 insists on (pkg/kubelet/cm/container_manager_linux.go setupKernelTunables).
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Debian packages providing what the node runs: program -> package.
TOOLS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "runc": "runc",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ss": "iproute2",
}
# Every process of a node carries this in its environment (containerd's shims inherit it), so a run
# killed before its teardown can be cleaned up by the next one: see clean_leftovers().
MARKER = "UDP_KUBELET_TEST_NODE"
KUBELET_START_TIMEOUT = 60.0  # about 6-9 s here
POD_TIMEOUT = 60.0

# What every test container prints, then it waits for SIGTERM.  One line per fact, prefixed, so the
# test reads the pod's own view: each device node in /dev (type, major:minor, whether it opens),
# its environment, its mounts, the device cgroup's list, and probes of nodes it was not given.
REPORT_SCRIPT = r"""
for f in /dev/* /dev/*/*; do
  [ -L "$f" ] && continue
  if [ -c "$f" ]; then t=c; elif [ -b "$f" ]; then t=b; else continue; fi
  if ( : < "$f" ) 2>/dev/null; then a=opens; else a=denied; fi
  echo "DEV $f $t $(stat -c '%t %T' "$f") $a"
done
env | sed 's/^/ENV /'
sed 's/^/MOUNT /' /proc/self/mountinfo
sed 's/^/CGROUP /' /sys/fs/cgroup/devices/devices.list 2>/dev/null
for p in $PROBES; do
  set -- $(echo "$p" | tr : ' ')
  rm -f /tmp/probe
  if ! mknod /tmp/probe "$1" "$2" "$3" 2>/dev/null; then echo "PROBE $p nomknod"; continue; fi
  if ( : < /tmp/probe ) 2>/dev/null; then echo "PROBE $p opens"; else echo "PROBE $p denied"; fi
done
for f in $FILES; do echo "FILE $f $(cat "$f" 2>&1)"; done
echo "END"
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
"""


class NodeError(RuntimeError):
    """The node could not be started or did something unexpected; the message says what."""


def problems() -> List[str]:
    """What this machine lacks to run the node (each with the package that provides it)."""
    found = []
    if os.geteuid() != 0:
        found.append("the real-kubelet tests need root (mount namespaces, containerd, runc)")
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            found.append(f"{tool} is missing: apt-get install {package}")
    if not os.access(images.BUSYBOX, os.X_OK):
        found.append(f"{images.BUSYBOX} is missing: apt-get install busybox-static")
    if not hasattr(os, "pidfd_open"):
        found.append("os.pidfd_open is missing (Python 3.9+ on Linux 5.3+)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something true and return that; NodeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class Process:
    """A detached process (re-parented to PID 1, so not this process's child), watched by a pidfd."""

    def __init__(self, argv: List[str], log_path: str, env: Optional[Dict[str, str]] = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.started = time.time()
        out = subprocess.run(["/bin/sh", "-c", 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!', "sh",
                              log_path] + argv, stdout=subprocess.PIPE, text=True, check=True, env=env)
        self.pid = int(out.stdout.strip())
        try:
            self.pidfd: Optional[int] = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.pidfd = None  # already gone

    def alive(self) -> bool:
        if self.pidfd is None:
            return False
        return not select.select([self.pidfd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        """True when the process has ended within ``timeout`` seconds."""
        if self.pidfd is None:
            return True
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def send(self, sig: int) -> None:
        if self.pidfd is not None and self.alive():
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Send ``sig``; SIGKILL after ``timeout`` seconds; return once it is gone."""
        self.send(sig)
        if not self.wait(timeout):
            self.send(signal.SIGKILL)
            self.wait(10.0)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


# --- the kubelet's log (klog) -----------------------------------------------------------------

KLOG = re.compile(r"^([IWEF])(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6})\s+\d+ (\S+?):\d+\] (.*)$")


class LogLine(NamedTuple):
    time: float  # wall time (time.time() scale); the kubelet runs with TZ=UTC
    level: str
    source: str  # e.g. "manager.go"
    text: str


def parse_klog(text: str, year: Optional[int] = None) -> List[LogLine]:
    year = year or time.gmtime().tm_year
    out = []
    for raw in text.splitlines():
        m = KLOG.match(raw)
        if not m:
            continue
        level, mon, day, hh, mm, ss, us, source, message = m.groups()
        t = calendar.timegm((year, int(mon), int(day), int(hh), int(mm), int(ss), 0, 0, 0)) + int(us) / 1e6
        out.append(LogLine(t, level, source, message))
    return out


def registration_line(resource: str) -> str:
    return f'Got registration request from device plugin with resource name "{resource}"'


def state_pushed_line(resource: str) -> str:
    return f"State pushed for device plugin {resource}"


def stream_ended_line(resource: str) -> str:
    return f"listAndWatch ended unexpectedly for device plugin {resource}"


SERVING_LINE = "Serving device plugin registration server on"


class Kubelet:
    """One run of the kubelet (a restart is a new run, with its own log file)."""

    def __init__(self, process: Process, run: int) -> None:
        self.process = process
        self.run = run
        self._parsed: List[LogLine] = []
        self._offset = 0

    def lines(self) -> List[LogLine]:
        """Every line so far (read incrementally: at --v=4 the log grows by megabytes)."""
        try:
            with open(self.process.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return list(self._parsed)
        end = data.rfind(b"\n") + 1  # only whole lines
        if end:
            self._parsed.extend(parse_klog(data[:end].decode(errors="replace")))
            self._offset += end
        return list(self._parsed)

    def find(self, text: str, after: float = 0.0) -> List[LogLine]:
        return [line for line in self.lines() if text in line.text and line.time >= after]

    def first(self, text: str, after: float = 0.0) -> Optional[LogLine]:
        found = self.find(text, after)
        return found[0] if found else None

    def served_at(self) -> Optional[float]:
        """When this run served kubelet.sock (its log's time), or None before that."""
        line = self.first(SERVING_LINE)
        return line.time if line else None


# --- pods -------------------------------------------------------------------------------------

class Report(NamedTuple):
    """What a test container saw: its device nodes, environment, mounts, device cgroup, probes, files."""

    devices: Dict[str, Tuple[str, int, int, str]]  # path -> (type "c"/"b", major, minor, "opens"/"denied")
    env: Dict[str, str]
    mounts: List[str]  # /proc/self/mountinfo lines
    cgroup: List[str]  # devices.list lines
    probes: Dict[str, str]  # "b:7:151" -> "opens" / "denied" / "nomknod"
    files: Dict[str, str]

    def mount_points(self) -> List[str]:
        return [line.split()[4] for line in self.mounts if len(line.split()) > 4]


def parse_report(lines: Iterable[str]) -> Report:
    devices: Dict[str, Tuple[str, int, int, str]] = {}
    env: Dict[str, str] = {}
    mounts: List[str] = []
    cgroup: List[str] = []
    probes: Dict[str, str] = {}
    files: Dict[str, str] = {}
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "DEV":
            path, kind_, major, minor, access = rest.split()
            devices[path] = (kind_, int(major, 16), int(minor, 16), access)
        elif kind == "ENV":
            key, _, value = rest.partition("=")
            env[key] = value
        elif kind == "MOUNT":
            mounts.append(rest)
        elif kind == "CGROUP":
            cgroup.append(rest)
        elif kind == "PROBE":
            probe, result = rest.split()
            probes[probe] = result
        elif kind == "FILE":
            path, _, value = rest.partition(" ")
            files[path] = value
    return Report(devices, env, mounts, cgroup, probes, files)


def pod_manifest(name: str, limits: Dict[str, int], probes: Iterable[str] = (), files: Iterable[str] = (),
                 script: str = REPORT_SCRIPT) -> Dict[str, Any]:
    """A static pod: host network, the local image never pulled, one container asking for ``limits``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "hostNetwork": True,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "c",
                "image": images.APP_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "env": [{"name": "PROBES", "value": " ".join(probes)},
                        {"name": "FILES", "value": " ".join(files)}],
                "resources": {"limits": {k: str(v) for k, v in limits.items()}},
            }],
        },
    }


def host_numbers(path: str) -> Tuple[str, int, int]:
    """("c" or "b", major, minor) of a device node on the host."""
    import stat as stat_mod
    st = os.stat(path)
    kind = "c" if stat_mod.S_ISCHR(st.st_mode) else "b" if stat_mod.S_ISBLK(st.st_mode) else "?"
    return kind, os.major(st.st_rdev), os.minor(st.st_rdev)


# --- the node ---------------------------------------------------------------------------------

class Node:
    """containerd + a kubelet in a private mount namespace, rooted at ``base``."""

    def __init__(self, base: str, kubelet_binary: str) -> None:
        self.base = base
        self.kubelet_binary = kubelet_binary
        self.dp = os.path.join(base, "dp")
        self.manifests = os.path.join(base, "manifests")
        self.kroot = os.path.join(base, "kroot")
        self.cdir = os.path.join(base, "c")
        self.csock = os.path.join(self.cdir, "containerd.sock")
        self.varlog = os.path.join(base, "varlog")
        self.cgroup_parents_before = set(glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}"))
        self.container_ids: set = set()
        self.holder: Optional[Process] = None
        self.containerd: Optional[Process] = None
        self.kubelet: Optional[Kubelet] = None
        self.runs: List[Kubelet] = []
        self.ports = {"port": 0, "read-only-port": 0, "healthz-port": 0}
        self.mnt_ns: Optional[str] = None
        self.kubelet_start_seconds: List[float] = []

    # -- start -------------------------------------------------------------------------------

    def start(self) -> Node:
        missing = problems()
        if missing:
            raise NodeError("cannot run a real node here: " + "; ".join(missing))
        clean_leftovers()
        for d in ("dp", "manifests", "kroot", "varlib", "varlog", "run", "sysctl", "c", "c/cni-bin",
                  "c/cni-conf", "volume-plugins", "certs", "images", "share"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        self._start_holder()
        self._start_containerd()
        for archive in images.build_all(os.path.join(self.base, "images")):
            self.ctr("images", "import", archive, timeout=120)
        self.start_kubelet()
        return self

    def _start_holder(self) -> None:
        """A process that owns the mount namespace; everything else enters it with nsenter."""
        binds = [(os.path.join(self.base, "varlib"), "/var/lib"), (self.varlog, "/var/log"),
                 (os.path.join(self.base, "run"), "/run")]
        # -n: no utab entries (util-linux would create /run/mount on the host before /run is ours).
        script = ["set -e", "mount -n --make-rprivate /"]
        script += [f"mount -n --bind '{src}' '{dst}'" for src, dst in binds]
        script += [f"mkdir -p {KUBELET_PLUGIN_DIR}", f"mount -n --bind '{self.dp}' {KUBELET_PLUGIN_DIR}"]
        for key, value in KUBELET_SYSCTLS.items():
            with open(f"/proc/sys/{key}") as f:
                if f.read().strip() == value:
                    continue
            fake = os.path.join(self.base, "sysctl", key.replace("/", "."))
            with open(fake, "w") as f:
                f.write(value + "\n")
            script.append(f"mount -n --bind '{fake}' /proc/sys/{key}")
        script += ["echo ready", "exec sleep infinity"]
        log = os.path.join(self.base, "holder.log")
        self.holder = Process(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                               "\n".join(script)], log, self.env())
        holder = self.holder
        wait_for(lambda: "ready" in holder.log() or not holder.alive(), 10, "the namespace holder")
        if not holder.alive():
            raise NodeError(f"the mount namespace could not be set up:\n{holder.tail()}")
        self.mnt_ns = os.readlink(f"/proc/{holder.pid}/ns/mnt")

    def env(self) -> Dict[str, str]:
        return dict(os.environ, **{MARKER: self.base})

    def enter(self) -> List[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--"]

    def _containerd_config(self) -> str:
        c = self.cdir
        return f"""version = 2
root = "{c}/root"
state = "{c}/state"
# Plugins that would touch paths outside the test directory or probe for kernel features.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.csock}"
[ttrpc]
  address = "{self.csock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: without this runc fails every sandbox (oom_score_adj -998).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{c}/cni-bin"
    conf_dir = "{c}/cni-conf"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # CRI passes a container's annotations (the device plugin's among them) into the OCI spec
      # only when the runtime allows them.
      container_annotations = ["example.com/*"]
"""

    def _start_containerd(self) -> None:
        config = os.path.join(self.cdir, "config.toml")
        with open(config, "w") as f:
            f.write(self._containerd_config())
        containerd = Process(self.enter() + ["containerd", "--config", config],
                             os.path.join(self.base, "containerd.log"), self.env())
        self.containerd = containerd
        wait_for(lambda: not containerd.alive() or self._ctr_ok(), 30, "containerd to serve its socket")
        if not containerd.alive():
            raise NodeError(f"containerd exited:\n{containerd.tail()}")

    def _ctr_ok(self) -> bool:
        if not os.path.exists(self.csock):
            return False
        return subprocess.run(self.enter() + ["ctr", "--address", self.csock, "version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10).returncode == 0

    def ctr(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        # Inside the namespace: ctr keeps its fifos under /run/containerd, which must not be the host's.
        out = subprocess.run(self.enter() + ["ctr", "--address", self.csock, "--namespace", CRI_NAMESPACE]
                             + list(args),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} exited {out.returncode}: {out.stdout}")
        return out.stdout

    def kubelet_argv(self) -> List[str]:
        p = self.ports
        return [
            self.kubelet_binary, "--v=4",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.csock}",
            f"--pod-manifest-path={self.manifests}", "--file-check-frequency=1s",
            "--fail-swap-on=false", "--cgroups-per-qos=false", "--enforce-node-allocatable=",
            "--cgroup-driver=cgroupfs",
            "--make-iptables-util-chains=false",
            "--address=127.0.0.1", f"--port={p['port']}", f"--read-only-port={p['read-only-port']}",
            "--healthz-bind-address=127.0.0.1", f"--healthz-port={p['healthz-port']}",
            f"--root-dir={self.kroot}", f"--cert-dir={os.path.join(self.base, 'certs')}",
            f"--volume-plugin-dir={os.path.join(self.base, 'volume-plugins')}",
            f"--hostname-override={NODE_NAME}",
            # The images were imported, not pulled: never collect them.
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
        ]

    def start_kubelet(self) -> Kubelet:
        """Start a kubelet run; return once it serves kubelet.sock and answers /healthz."""
        assert self.kubelet is None or not self.kubelet.process.alive(), "a kubelet is already running"
        for key in self.ports:
            self.ports[key] = free_port()
        run = len(self.runs) + 1
        env = dict(self.env(), TZ="UTC")  # its log's timestamps, parsed as UTC
        started = time.monotonic()
        process = Process(self.enter() + self.kubelet_argv(), os.path.join(self.base, f"kubelet-{run}.log"), env)
        kubelet = Kubelet(process, run)
        self.kubelet = kubelet
        self.runs.append(kubelet)
        wait_for(lambda: not process.alive() or (kubelet.served_at() and self._healthz()), KUBELET_START_TIMEOUT,
                 f"kubelet run {run} to serve {KUBELET_PLUGIN_DIR}/kubelet.sock and /healthz")
        if not process.alive():
            raise NodeError(f"the kubelet exited during start:\n{process.tail()}")
        self.kubelet_start_seconds.append(time.monotonic() - started)
        return kubelet

    def stop_kubelet(self, sig: int = signal.SIGTERM) -> None:
        if self.kubelet is not None:
            self.kubelet.process.stop(sig)

    def restart_kubelet(self) -> Kubelet:
        self.stop_kubelet()
        return self.start_kubelet()

    def _get(self, path: str) -> Optional[bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['read-only-port']}{path}", timeout=5) as r:
                return bytes(r.read())
        except (urllib.error.URLError, OSError):
            return None

    def _healthz(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['healthz-port']}/healthz", timeout=5) as r:
                return bool(r.read() == b"ok")
        except (urllib.error.URLError, OSError):
            return False

    # -- what the kubelet holds ----------------------------------------------------------------

    def checkpoint(self) -> Dict[str, Any]:
        """The device manager's checkpoint: {"registered": {resource: [ids]}, "pods": [entries]}."""
        try:
            with open(os.path.join(self.dp, "kubelet_internal_checkpoint")) as f:
                data = json.load(f)["Data"]
        except (OSError, ValueError, KeyError):
            return {"registered": {}, "pods": []}
        return {"registered": {k: sorted(v) for k, v in (data.get("RegisteredDevices") or {}).items()},
                "pods": data.get("PodDeviceEntries") or []}

    def healthy_devices(self, resource: str) -> List[str]:
        """The devices of ``resource`` the kubelet last recorded as healthy (its checkpoint)."""
        return list(self.checkpoint()["registered"].get(resource, []))

    def allocated(self, uid: str, resource: str) -> List[str]:
        ids: List[str] = []
        for entry in self.checkpoint()["pods"]:
            if entry.get("PodUID") == uid and entry.get("ResourceName") == resource:
                for group in (entry.get("DeviceIDs") or {}).values():
                    ids.extend(group)
        return sorted(ids)

    # -- pods ------------------------------------------------------------------------------------

    def add_pod(self, name: str, limits: Dict[str, int], **kw: Any) -> str:
        """Write a static pod's manifest; return the pod's name as the kubelet knows it."""
        path = os.path.join(self.manifests, f"{name}.json")
        tmp = os.path.join(self.manifests, f".{name}.json.tmp")  # dot files are ignored by the kubelet
        with open(tmp, "w") as f:
            json.dump(pod_manifest(name, limits, **kw), f)
        os.rename(tmp, path)
        return f"{name}-{NODE_NAME}"

    def remove_pod(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.manifests, f"{name}.json"))
        except FileNotFoundError:
            pass

    def pod_names(self) -> List[str]:
        return sorted(f[:-len(".json")] for f in os.listdir(self.manifests) if f.endswith(".json"))

    def pods(self) -> Optional[Dict[str, Dict[str, Any]]]:
        """Every pod the kubelet has, by name, as its read-only port reports them (None when down)."""
        raw = self._get("/pods")
        if raw is None:
            return None
        return {p["metadata"]["name"]: p for p in (json.loads(raw).get("items") or [])}

    def pod(self, full_name: str) -> Optional[Dict[str, Any]]:
        return (self.pods() or {}).get(full_name)

    def wait_pod(self, full_name: str, accept: Callable[[Dict[str, Any]], bool], what: str,
                 timeout: float = POD_TIMEOUT) -> Dict[str, Any]:
        def check() -> Optional[Dict[str, Any]]:
            pod = self.pod(full_name)
            return pod if pod is not None and accept(pod) else None
        try:
            return wait_for(check, timeout, f"pod {full_name} {what}")  # type: ignore[no-any-return]
        except NodeError as exc:
            raise NodeError(f"{exc}; last status: {json.dumps((self.pod(full_name) or {}).get('status'))}") \
                from None

    def wait_running(self, full_name: str, timeout: float = POD_TIMEOUT) -> Dict[str, Any]:
        pod = self.wait_pod(full_name, lambda p: phase(p) in ("Running", "Failed", "Succeeded")
                            and (phase(p) != "Running" or bool(container_id(p))), "to run", timeout)
        if phase(pod) != "Running":
            raise NodeError(f"pod {full_name} is {phase(pod)}, not Running: {json.dumps(pod.get('status'))}")
        return pod

    def wait_failed(self, full_name: str, timeout: float = POD_TIMEOUT) -> Dict[str, Any]:
        """Wait for the kubelet to refuse a pod at admission; return the pod (status phase Failed)."""
        pod = self.wait_pod(full_name, lambda p: phase(p) in ("Running", "Failed"), "to be refused", timeout)
        if phase(pod) != "Failed":
            raise NodeError(f"pod {full_name} was admitted, expected a refusal: {json.dumps(pod.get('status'))}")
        return pod

    def log_path(self, full_name: str) -> Optional[str]:
        found = glob.glob(os.path.join(self.varlog, "pods", f"{NAMESPACE}_{full_name}_*", "c", "*.log"))
        return sorted(found)[-1] if found else None

    def output(self, full_name: str) -> List[str]:
        """The container's stdout lines (the CRI log format's payloads)."""
        path = self.log_path(full_name)
        if path is None:
            return []
        lines = []
        with open(path, errors="replace") as f:
            for raw in f:
                parts = raw.rstrip("\n").split(" ", 3)
                if len(parts) == 4:
                    lines.append(parts[3])
        return lines

    def report(self, full_name: str, timeout: float = POD_TIMEOUT) -> Report:
        """What the pod's container saw (waits for it to finish printing)."""
        lines = wait_for(lambda: (lambda out: out if "END" in out else None)(self.output(full_name)), timeout,
                         f"pod {full_name}'s report in its log")
        return parse_report(lines)

    def exec(self, full_name: str, argv: List[str]) -> str:
        """Run ``argv`` in the pod's running container (``ctr tasks exec``) and return its output."""
        pod = self.pod(full_name)
        cid = container_id(pod) if pod else ""
        if not cid:
            raise NodeError(f"pod {full_name} has no running container to exec in")
        exec_id = f"t{time.monotonic_ns()}"
        return self.ctr("tasks", "exec", "--exec-id", exec_id, cid, *argv)

    def delete_pods(self, names: Iterable[str], timeout: float = POD_TIMEOUT) -> None:
        """Remove the pods' manifests and wait until the kubelet no longer lists them."""
        names = list(names)
        for name in names:
            self.remove_pod(name)
        full = {f"{n}-{NODE_NAME}" for n in names}
        wait_for(lambda: (lambda pods: pods is not None and not full & set(pods))(self.pods()), timeout,
                 f"the kubelet to drop pods {sorted(full)}")

    # -- a stream the kubelet ends ---------------------------------------------------------------

    def kubelet_connections(self, socket_path: str) -> List[int]:
        """The kubelet's file descriptors connected to the UNIX socket at ``socket_path``."""
        assert self.kubelet is not None
        out = subprocess.run(["ss", "-xpnH"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=10, check=True).stdout
        peers = set()
        rows = []
        for line in out.splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            rows.append(f)
            # The daemon binds through its directory descriptor (/proc/self/fd/N/NAME): match the name.
            if f[4] == socket_path or f[4].endswith("/" + os.path.basename(socket_path)):
                peers.add(f[7])  # the peer's inode
        fds = []
        for f in rows:
            if f[5] in peers:
                for pid, fd in re.findall(r"pid=(\d+),fd=(\d+)", " ".join(f[8:])):
                    if int(pid) == self.kubelet.process.pid:
                        fds.append(int(fd))
        return fds

    def cut_kubelet_connections(self, socket_path: str) -> int:
        """Shut down the kubelet's end of every connection to ``socket_path``; return how many.

        pidfd_getfd(2) gives this process the kubelet's own socket; shutdown(2) on it ends the
        connection for the kubelet: its ListAndWatch Recv fails, and it takes the path a broken
        stream takes in its code (endpoint stopped, resource unhealthy, connection closed), while
        the kubelet itself keeps running and kubelet.sock stays the same.
        """
        assert self.kubelet is not None and self.kubelet.process.pidfd is not None
        libc = ctypes.CDLL(None, use_errno=True)
        fds = self.kubelet_connections(socket_path)
        for fd in fds:
            got = libc.syscall(438, self.kubelet.process.pidfd, fd, 0)  # SYS_pidfd_getfd
            if got < 0:
                err = ctypes.get_errno()
                raise NodeError(f"pidfd_getfd(kubelet, {fd}) failed: {os.strerror(err)}")
            s = socket.socket(fileno=got)
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        return len(fds)

    # -- teardown --------------------------------------------------------------------------------

    def namespace_pids(self) -> List[int]:
        """Processes in the node's mount namespace (the holder, containerd, kubelet, shims)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == self.mnt_ns:
                    found.append(int(entry))
            except OSError:
                continue
        return found

    def cgroup_dirs(self) -> List[str]:
        """The cgroups of this node's containers (named by container ID, in every hierarchy)."""
        return sorted(d for d in glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}/*")
                      if os.path.isdir(d) and os.path.basename(d) in self.container_ids)

    def close(self) -> List[str]:
        """Stop everything, even half-started; return the problems met (for the caller to report)."""
        problems_met: List[str] = []

        def attempt(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - teardown goes on and reports
                problems_met.append(f"{what}: {exc}")

        names = self.pod_names() if os.path.isdir(self.manifests) else []
        if names and self.kubelet is not None and self.kubelet.process.alive():
            attempt("deleting pods", lambda: self.delete_pods(names, timeout=30))
        if self.kubelet is not None:
            attempt("stopping the kubelet", lambda: self.kubelet.process.stop())  # type: ignore[union-attr]
        if self.containerd is not None and self.containerd.alive():
            def remove_containers() -> None:
                self.container_ids.update(self.ctr("containers", "ls", "-q", check=False).split())
                for task in self.ctr("tasks", "ls", "-q", check=False).split():
                    self.ctr("tasks", "delete", "--force", task, check=False)
                ids = self.ctr("containers", "ls", "-q", check=False).split()
                if ids:
                    self.ctr("containers", "rm", *ids, check=False)
            attempt("removing containers", remove_containers)
            attempt("stopping containerd", lambda: self.containerd.stop())  # type: ignore[union-attr]
        # Whatever is left in the namespace (shims whose task was not deleted) and in the pods' cgroups.
        if self.mnt_ns is not None:
            holder = self.holder.pid if self.holder else -1
            for pid in self.namespace_pids() + self._cgroup_pids():
                if pid != holder:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if self.holder is not None:
            attempt("ending the mount namespace", lambda: self.holder.stop())  # type: ignore[union-attr]
        if self.mnt_ns is not None:
            attempt("waiting for the namespace to empty",
                    lambda: wait_for(lambda: not self.namespace_pids(), 15, "every process of the namespace to end"))
        attempt("removing the pods' cgroups", self._remove_cgroups)
        return problems_met

    def _cgroup_pids(self) -> List[int]:
        pids: List[int] = []
        for d in self.cgroup_dirs():
            for procs in glob.glob(os.path.join(d, "**", "cgroup.procs"), recursive=True):
                try:
                    with open(procs) as f:
                        pids.extend(int(p) for p in f.read().split())
                except OSError:
                    continue
        return pids

    def _remove_cgroups(self) -> None:
        for d in self.cgroup_dirs():
            wait_for(lambda d=d: _rmdir(d), 10, f"cgroup {d} to be removable")  # type: ignore[misc]
        # The parent only when this node created it (a containerd of the host's may share it).
        for d in set(glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}")) - self.cgroup_parents_before:
            if not [e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))]:
                _rmdir(d)


def marked_processes() -> Dict[int, str]:
    """PID -> node base directory, for every running process of a node (ours or a killed run's)."""
    found = {}
    needle = MARKER.encode() + b"="
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(needle):
                found[int(entry)] = item[len(needle):].decode(errors="replace")
    return found


def clean_leftovers() -> List[str]:
    """End what a test run killed before its teardown left behind: its node processes (holder, containerd,
    kubelet, shims) and its containers (found by the IDs in that containerd's root), then their cgroups.
    Returns the base directories cleaned."""
    procs = {pid: base for pid, base in marked_processes().items() if pid != os.getpid()}
    bases = sorted(set(procs.values()))
    ids: set = set()
    for base in bases:
        cri = os.path.join(base, "c", "root", "io.containerd.grpc.v1.cri")
        for kind in ("containers", "sandboxes"):
            try:
                ids.update(os.listdir(os.path.join(cri, kind)))
            except OSError:
                pass
    cgroups = [d for d in glob.glob(f"/sys/fs/cgroup/*/{CGROUP_PARENT}/*") if os.path.basename(d) in ids]
    pids = set(procs)
    for d in cgroups:
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not (set(marked_processes()) & pids), 15, "a killed run's node processes to end")
    for d in cgroups:
        wait_for(lambda d=d: _rmdir(d), 10, f"cgroup {d} to be removable")  # type: ignore[misc]
    if cgroups:  # their parent too, once it holds no other container's cgroup
        for parent in {os.path.dirname(d) for d in cgroups}:
            if not [e for e in os.listdir(parent) if os.path.isdir(os.path.join(parent, e))]:
                _rmdir(parent)
    return bases


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def phase(pod: Dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase", ""))


def container_status(pod: Dict[str, Any]) -> Dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return dict(statuses[0]) if statuses else {}


def container_id(pod: Dict[str, Any]) -> str:
    cs = container_status(pod)
    if "running" not in (cs.get("state") or {}):
        return ""
    return str(cs.get("containerID", "")).split("://", 1)[-1]


def waiting(pod: Dict[str, Any]) -> Tuple[str, str]:
    """(reason, message) of the container's waiting state, or ("", "")."""
    w = (container_status(pod).get("state") or {}).get("waiting") or {}
    return str(w.get("reason", "")), str(w.get("message", ""))
