"""Build the project's RPM for integration tests (``make rpm`` into a directory of the caller's)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "udev-device-plugin"


def version() -> str:
    """The package version: ``__version__`` of the source tree (its one source)."""
    with open(os.path.join(ROOT, "src", "udev_device_plugin", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("no __version__ in src/udev_device_plugin/__init__.py")


def build_rpm(outdir: str, release: str = "1", check: bool = False) -> str:
    """Run ``make rpm`` with ``RPM_RELEASE=release`` into ``outdir``; return the RPM's path.

    ``check=False`` skips the spec's %check (the unit tests run on their own in CI).
    Raises ``subprocess.CalledProcessError`` with rpmbuild's output on failure.
    """
    os.makedirs(outdir, exist_ok=True)
    cmd = ["make", "-C", ROOT, "--no-print-directory", "rpm", f"RPM_RELEASE={release}",
           f"RPM_OUTDIR={outdir}", f"RPM_TOPDIR={os.path.join(outdir, 'rpmbuild')}"]
    if not check:
        cmd.append("RPMBUILD_OPTS=--without check")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout)
    path = os.path.join(outdir, f"{NAME}-{version()}-{release}.noarch.rpm")
    if not os.path.exists(path):
        raise RuntimeError(f"make rpm succeeded but {path} is missing; output:\n{proc.stdout[-3000:]}")
    return path
