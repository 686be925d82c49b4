"""``make bench``: print every figure the issues ask for, from one run on this machine."""

from __future__ import annotations

import compileall
import importlib
import os
import platform
import sys

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc is imported
# An installed package has its bytecode (the RPM and pip compile it): so do the daemons measured here,
# whatever this shell says, or every start figure would include compiling the package.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")
compileall.compile_dir(SRC, quiet=1)

PARTS = [
    "start",    # serve -> first Register; imports (issue 13)
    "calls",    # Allocate p50/p99 and CPU per call, 1 and 40 resources, 200 held streams; RSS; idle (9, 13)
    "scale",    # 1,000 and 10,000 loop devices: rescans, start -> list, RSS, hotplug add/remove (13)
    "health",   # 200 devices' health checks on time or said to fall behind (10)
    "core",     # kubelet restarts -> re-registration; 200 concurrent callers; fds and threads after (2, 9)
    "hotplug",  # udev event -> ListAndWatch, bursts, mock PCI cards (umockdev)
    "sharing",  # replicas = 100, CDI specs (12)
    "metrics",  # scrapes and their cost to Allocate (12)
    "kubelet",  # the real kubelet 1.20: restart -> Register, hotplug -> "State pushed" (11)
]

import grpc  # noqa: E402


def report(name: str, value: float, unit: str) -> None:
    print(f"{name:<96} {value:>10.3f} {unit}", flush=True)


def main() -> int:
    print(f"# udev-device-plugin benchmark on {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, grpcio {grpc.__version__}", flush=True)
    parts = sys.argv[1:] or PARTS
    for part in parts:
        print(f"## {part} (load average {os.getloadavg()[0]:.2f})", flush=True)
        module = importlib.import_module(f"tests.bench.{part}")
        module.run(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
