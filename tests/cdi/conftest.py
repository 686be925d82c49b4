"""Fixtures for the CDI tests: Debian's podman 4.3 as the real consumer of our spec files, with a busybox
image built here (no registry) in a private store, and the real-udev fixtures of tests/hotplug.

podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi (no setting moves them), so the daemon
under test writes into /var/run/cdi, with resource names of this run only; these tests need root and
run under the shared lock (make test-cdi)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tarfile
from typing import Iterator, List

import pytest

from tests.hotplug.conftest import loops, udevd  # noqa: F401  (fixtures: a real udevd, loop devices)

CDI_DIR = "/var/run/cdi"
BUSYBOX = "/bin/busybox"
IMAGE = "localhost/udp-cdi-busybox:test"
APPLETS = ("sh", "ls", "stat", "cat", "test", "head", "wc", "echo", "env")


class Podman:
    """podman with a store of its own (vfs: no mounts left behind), no network, no registry."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = ["podman", "--root", os.path.join(root, "storage"), "--runroot", os.path.join(root, "run"),
                     "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def run(self, devices: List[str], script: str) -> subprocess.CompletedProcess:
        """``sh -c script`` in a throw-away container with these CDI devices.  The ulimits: root here lacks
        CAP_SYS_RESOURCE, and podman's defaults (1048576) are above this machine's hard limits."""
        argv = ["run", "--rm", "--pull=never", "--network=none", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=4096:4096"]
        for device in devices:
            argv += ["--device", device]
        return self(*argv, IMAGE, "sh", "-c", script)


@pytest.fixture(scope="session")
def podman(tmp_path_factory) -> Iterator[Podman]:
    problems = []
    if os.geteuid() != 0:
        problems.append("the CDI tests need root (podman as root, /var/run/cdi)")
    if shutil.which("podman") is None:
        problems.append("podman is missing: apt-get install podman (Debian's 4.3 reads CDI specs)")
    if not os.access(BUSYBOX, os.X_OK):
        problems.append(f"{BUSYBOX} is missing: apt-get install busybox-static (the test image is built from it)")
    if problems:
        pytest.fail("cannot run the CDI tests: " + "; ".join(problems), pytrace=False)
    root = str(tmp_path_factory.mktemp("podman"))
    tool = Podman(root)
    rootfs = os.path.join(root, "rootfs.tar")
    with tarfile.open(rootfs, "w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        for name in APPLETS:
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    done = tool("import", rootfs, IMAGE)
    if done.returncode != 0:
        pytest.fail(f"podman import of the busybox image failed: {done.stderr}", pytrace=False)
    try:
        yield tool
    finally:
        tool("rmi", "--all", "--force")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cdi_vendor() -> str:
    """A resource domain of this test only, so that nothing else in /var/run/cdi clashes with it."""
    return f"udp-{secrets.token_hex(4)}.example.com"


@pytest.fixture
def system_cdi_dir(cdi_vendor) -> Iterator[str]:
    """/var/run/cdi, checked before and after: no spec of ours may be there but this test's (a daemon started
    with a CDI resource removes what it takes for an earlier run's leftovers)."""
    existing = [n for n in os.listdir(CDI_DIR) if n.startswith("udev-device-plugin-")] if os.path.isdir(CDI_DIR) \
        else []
    if existing:
        pytest.fail(f"{CDI_DIR} holds udev-device-plugin specs of another daemon ({', '.join(existing)}); "
                    "a test daemon would remove them: stop that daemon first", pytrace=False)
    yield CDI_DIR
    left = [n for n in os.listdir(CDI_DIR) if cdi_vendor in n] if os.path.isdir(CDI_DIR) else []
    for name in left:
        os.unlink(os.path.join(CDI_DIR, name))
    assert not left, f"specs left in {CDI_DIR}: {left}"
