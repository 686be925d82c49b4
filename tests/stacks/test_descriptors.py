"""api/descriptors.py is what ``make proto`` (packaging/gen-api-descriptors.py) writes from the
.proto files now: nobody edited one without the other.  Needs grpcio-tools: newest stack only."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT

SHIPPED = os.path.join(ROOT, "src", "udev_device_plugin", "api", "descriptors.py")


def test_descriptors_are_what_make_proto_writes(tmp_path) -> None:
    out = str(tmp_path / "descriptors.py")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "gen-api-descriptors.py"), out],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"gen-api-descriptors.py failed:\n{proc.stdout}{proc.stderr}"
    with open(out, encoding="utf-8") as f:
        fresh = f.read()
    with open(SHIPPED, encoding="utf-8") as f:
        shipped = f.read()
    assert fresh == shipped, ("src/udev_device_plugin/api/descriptors.py is not what the .proto files give: "
                              "run `make proto` and commit the result")
