"""Build a real kubelet v1.20.2 once per machine, into a cache outside the repository.

Debian bookworm's source package ``kubernetes`` (1.20.5+really1.20.2) carries the whole tree with
``vendor/``; Debian's ``golang-go`` (1.19) builds its kubelet in a GOPATH layout in about 3 minutes on
2 cores (TESTING.md, "A real kubelet and container runtime").  The result is kept in
:data:`CACHE_DIR` and rebuilt only when missing or not the expected version.

``python -m tests.kubelet.build`` builds (or checks) it by hand and prints the binary's path.
Every problem raises :class:`BuildError` with a message naming what is missing and how to get it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from typing import List, Optional

VERSION = "v1.20.2"
CACHE_DIR = os.environ.get("UDEV_DP_KUBELET_CACHE", f"/var/cache/udev-device-plugin-test/kubelet-{VERSION[1:]}")
SOURCE_PACKAGE = "kubernetes"
# The deb-src entry `apt-get source kubernetes` needs; written only when no deb-src line offers the package.
SOURCES_FILE = "/etc/apt/sources.list.d/udev-device-plugin-test-src.sources"
SOURCES_TEXT = """\
# Added by udev-device-plugin's tests/kubelet/build.py: `apt-get source kubernetes` for the real-kubelet tests.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# Debian packages the build needs: program -> package.
BUILD_TOOLS = {"go": "golang-go", "dpkg-source": "dpkg-dev", "apt-get": "apt"}
BUILD_TIMEOUT = 1800.0  # seconds for the whole go build (about 3 minutes on 2 cores)


class BuildError(RuntimeError):
    """The kubelet could not be built or a prerequisite is missing; the message says which."""


def kubelet_path() -> str:
    return os.path.join(CACHE_DIR, "kubelet")


def _run(argv: List[str], log: Optional[str] = None, timeout: float = 600.0, cwd: Optional[str] = None,
         env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``argv``; with ``log``, append its output there.  Raise BuildError naming the command on failure."""
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=timeout, cwd=cwd, env=env)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{out.stdout}\n")
    if out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-30:])
        raise BuildError(f"`{' '.join(argv)}` exited {out.returncode}" + (f" (full log: {log})" if log else "")
                         + f":\n{tail}")
    return out


def built_version(path: str) -> Optional[str]:
    """The version ``path --version`` reports ("v1.20.2"), or None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    return words[-1] if out.returncode == 0 and words else None


def missing_tools() -> List[str]:
    return [f"{tool} (apt-get install {package})" for tool, package in BUILD_TOOLS.items()
            if shutil.which(tool) is None]


def _ensure_deb_src(log: str) -> None:
    """Make `apt-get source kubernetes` possible: add bookworm's deb-src entries when none offers it."""
    check = subprocess.run(["apt-cache", "showsrc", SOURCE_PACKAGE], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if check.returncode == 0 and "Package:" in check.stdout:
        return
    with open(SOURCES_FILE, "w") as f:
        f.write(SOURCES_TEXT)
    _run(["apt-get", "update", "-q"], log, timeout=600)


def build() -> str:
    """Return the path of a kubelet v1.20.2, building it first when the cache lacks one."""
    path = kubelet_path()
    if built_version(path) == VERSION:
        return path
    if os.geteuid() != 0:
        raise BuildError("building the kubelet needs root (apt-get source, the cache in /var/cache)")
    missing = missing_tools()
    if missing:
        raise BuildError("cannot build the kubelet: missing " + ", ".join(missing))
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(os.path.join(CACHE_DIR, ".lock"), "w") as lock:
        # One build at a time per machine; a second caller waits and then finds the binary.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if built_version(path) == VERSION:
            return path
        _build_locked(path)
    return path


def _build_locked(path: str) -> None:
    log = os.path.join(CACHE_DIR, "build.log")
    work = os.path.join(CACHE_DIR, "build")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(log, "w") as f:
        f.write(f"# kubelet {VERSION} build, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    started = time.monotonic()
    try:
        _ensure_deb_src(log)
        download = os.path.join(work, "download")
        os.makedirs(download)
        _run(["apt-get", "source", "-q", SOURCE_PACKAGE], log, timeout=900, cwd=download)
        trees = [d for d in os.listdir(download)
                 if d.startswith(f"{SOURCE_PACKAGE}-") and os.path.isdir(os.path.join(download, d))]
        if len(trees) != 1:
            raise BuildError(f"`apt-get source {SOURCE_PACKAGE}` unpacked {trees or 'nothing'} in {download}; "
                             f"expected one {SOURCE_PACKAGE}-* tree (full log: {log})")
        gopath = os.path.join(work, "gopath")
        tree = os.path.join(gopath, "src", "k8s.io", "kubernetes")
        os.makedirs(os.path.dirname(tree))
        os.rename(os.path.join(download, trees[0]), tree)
        if not os.path.isdir(os.path.join(tree, "vendor")):
            raise BuildError(f"the {SOURCE_PACKAGE} source tree has no vendor/ directory ({tree}); "
                             "this build needs bookworm's 1.20.2 package")
        env = dict(os.environ, GO111MODULE="off", GOPATH=gopath, GOCACHE=os.path.join(work, "gocache"),
                   GOFLAGS="", CGO_ENABLED="1")
        # Without the version stamp the binary reports v0.0.0-master; the tests check what they run.
        version_pkg = "k8s.io/kubernetes/vendor/k8s.io/component-base/version"
        ldflags = f"-s -w -X {version_pkg}.gitVersion={VERSION} -X {version_pkg}.gitTreeState=clean"
        tmp = path + ".new"
        _run(["go", "build", "-o", tmp, "-ldflags", ldflags, "k8s.io/kubernetes/cmd/kubelet"], log,
             timeout=BUILD_TIMEOUT, cwd=tree, env=env)
        got = built_version(tmp)
        if got != VERSION:
            raise BuildError(f"the built kubelet reports version {got!r}, expected {VERSION} (full log: {log})")
        os.rename(tmp, path)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"`{' '.join(map(str, exc.cmd))}` did not finish in {exc.timeout:g} s (log: {log})") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(log, "a") as f:
        f.write(f"# built {path} in {time.monotonic() - started:.0f} s\n")


def main() -> int:
    try:
        print(build())
    except BuildError as exc:
        print(f"kubelet build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
