"""Container images built here, offline: a docker-archive tar of one layer holding a static busybox.

No registry is reachable from these machines, so the pause image and the pods' image are made from
Debian's ``busybox-static`` (``/bin/busybox``) and loaded with ``ctr -n k8s.io images import``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from typing import List

BUSYBOX = "/bin/busybox"
PAUSE_IMAGE = "localhost/udevdp-test-pause:1"
APP_IMAGE = "localhost/udevdp-test-busybox:1"
# The pause container's process: PID 1 of the sandbox, ending on SIGTERM/SIGINT (PID 1 has no default
# handlers, so a bare `sleep` would ignore them and wait for SIGKILL).
PAUSE_COMMAND = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]


class ImageError(RuntimeError):
    """An image could not be built; the message says what is missing."""


def _applets() -> List[str]:
    if not os.access(BUSYBOX, os.X_OK):
        raise ImageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    out = subprocess.run([BUSYBOX, "--list"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=30)
    if out.returncode != 0:
        raise ImageError(f"{BUSYBOX} --list failed: {out.stdout}")
    with open(BUSYBOX, "rb") as f:
        head = f.read(4096)
    # A dynamically linked busybox would find no libc in the image.
    if b"ld-linux" in head or b"/lib64/ld" in head:
        raise ImageError(f"{BUSYBOX} is dynamically linked: apt-get install busybox-static")
    return [a for a in out.stdout.split() if a != "busybox" and "/" not in a]


def _layer() -> bytes:
    """An uncompressed layer tar: /bin/busybox, a symlink per applet, and the usual empty directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def directory(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        for name in ("bin", "dev", "etc", "proc", "sys", "run", "var"):
            directory(name)
        directory("tmp", 0o1777)
        with open(BUSYBOX, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in _applets():
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return buf.getvalue()


def docker_archive(path: str, tags: List[str], cmd: List[str]) -> None:
    """Write a docker-archive (``docker save`` format) tar at ``path`` naming the image ``tags``."""
    layer = _layer()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "udev-device-plugin tests/kubelet/images.py"}],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id[len("sha256:"):] + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": [layer_name]}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in ((layer_name, layer), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))


def build_all(directory: str) -> List[str]:
    """Write the pause and the app image archives into ``directory``; return their paths."""
    pause = os.path.join(directory, "pause.tar")
    app = os.path.join(directory, "busybox.tar")
    docker_archive(pause, [PAUSE_IMAGE], PAUSE_COMMAND)
    docker_archive(app, [APP_IMAGE], ["/bin/sh"])
    return [pause, app]
