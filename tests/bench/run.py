"""``make bench``: print every figure the issues ask for, from one run on this machine."""

from __future__ import annotations

import importlib
import os
import platform
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported

import grpc  # noqa: E402


def report(name: str, value: float, unit: str) -> None:
    print(f"{name:<96} {value:>10.3f} {unit}", flush=True)


def main() -> int:
    print(f"# udev-device-plugin benchmark on {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, grpcio {grpc.__version__}", flush=True)
    parts = sys.argv[1:] or ["core", "hotplug", "sharing", "metrics"]
    for part in parts:
        print(f"## {part}", flush=True)
        module = importlib.import_module(f"tests.bench.{part}")
        module.run(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
