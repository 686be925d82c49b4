"""The test side of umockdev: drives ``umockdev_driver.py`` (Debian's python3 with PyGObject, under
umockdev-wrapper) and builds the wrapper command that runs a process inside the testbed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "umockdev_driver.py")
GUARD = os.path.join(HERE, "preloaded.py")
SYSTEM_PYTHON = "/usr/bin/python3"
WRAPPER = "umockdev-wrapper"


def problem() -> Optional[str]:
    """Why the umockdev tests cannot run here, or None."""
    if shutil.which(WRAPPER) is None:
        return "umockdev-wrapper is missing: apt-get install umockdev"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('UMockdev', '1.0'); "
                            "from gi.repository import UMockdev"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if probe.returncode != 0:
        return (f"{SYSTEM_PYTHON} cannot load UMockdev through GObject introspection: "
                f"apt-get install python3-gi gir1.2-umockdev-1.0 ({probe.stdout.strip().splitlines()[-1:]})")
    return None


class MockDevError(RuntimeError):
    pass


class Testbed:
    """One umockdev testbed, owned by a driver process; :meth:`close` removes it."""

    def __init__(self) -> None:
        # stderr to a file: a chatty driver must not block on a full pipe.
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([WRAPPER, SYSTEM_PYTHON, DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, bufsize=1)
        first = self.proc.stdout.readline() if self.proc.stdout else ""
        if not first:
            self.proc.wait()
            raise MockDevError(f"umockdev driver did not start: {self.stderr()}")
        self.dir: str = json.loads(first)["dir"]

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise MockDevError(f"umockdev driver died during {op}: {self.stderr()}")
        answer = json.loads(line)
        if "error" in answer:
            raise MockDevError(answer["error"])
        return answer["ok"]

    def stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read().strip()

    # --- the commands ---------------------------------------------------------

    def add(self, subsystem: str, name: str, parent: Optional[str] = None, attributes: Optional[Dict[str, Any]] = None,
            properties: Optional[Dict[str, Any]] = None, node: Optional[str] = None) -> str:
        return str(self.call("add", subsystem=subsystem, name=name, parent=parent, attributes=attributes or {},
                             properties=properties or {}, node=node))

    def add_pci(self, address: str, vendor: str, device: str, numa_node: int, **attributes: Any) -> str:
        attrs = {"vendor": vendor, "device": device, "numa_node": numa_node, "enable": 1, **attributes}
        return self.add("pci", address, None, attrs, {"PCI_ID": f"{vendor[2:]}:{device[2:]}".upper()})

    def add_accel(self, parent: str, index: int) -> str:
        """A DRM-accel style child with a char device node /dev/accel/accel<index>."""
        return self.add("accel", f"accel{index}", parent, {"dev": f"261:{index}"},
                        {"MAJOR": 261, "MINOR": index}, node=f"/dev/accel/accel{index}")

    def add_raw(self, subsystem: str, name: bytes, parent: Optional[str] = None,
                attributes: Optional[Dict[str, bytes]] = None, properties: Optional[Dict[str, bytes]] = None) -> bytes:
        """A device whose name, attributes and properties are any bytes (no event): its sys_path, bytes."""
        path = self.call("add_raw", subsystem=subsystem, name=name.decode("latin-1"), parent=parent,
                         attributes={k: v.decode("latin-1") for k, v in (attributes or {}).items()},
                         properties={k: v.decode("latin-1") for k, v in (properties or {}).items()})
        return str(path).encode("latin-1")

    def iommu_group(self, path: str, group: int) -> None:
        self.call("iommu_group", path=path, group=group)

    def add_many(self, count: int) -> int:
        return int(self.call("add_many", count=count))

    def set(self, path: str, name: str, value: Any) -> None:
        self.call("set", path=path, name=name, value=value)

    def uevent(self, path: str, action: str) -> None:
        self.call("uevent", path=path, action=action)

    def remove(self, path: str) -> None:
        self.call("remove", path=path)

    def bind(self, path: str, driver: str) -> None:
        self.call("bind", path=path, driver=driver)

    def unbind(self, path: str) -> None:
        self.call("unbind", path=path)

    def node(self, node: str, present: bool) -> None:
        self.call("node", node=node, present=present)

    # --- running processes inside it --------------------------------------------

    def env(self) -> Dict[str, str]:
        return {"UMOCKDEV_DIR": self.dir}

    def wrapper(self) -> List[str]:
        """Prefix for a command to run in the testbed; it refuses to run without the preload."""
        return [WRAPPER, sys.executable, GUARD]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.errors.close()
