"""Print one stack's versions and fail unless they are the ones asked for (run by ``make test``).

    python tests/stacks/report.py NAME [--backend python|upb|cpp] [--absent PACKAGE] [--present PACKAGE]
                                  [PACKAGE==VERSION ...]

Runs with the stack's own interpreter, from the source tree.  Prints one line such as
``[stack el9] python 3.9.18, grpcio 1.46.5, protobuf 3.14.0 (python backend), pyudev 0.22.0,
click 8.0.3, sdnotify 0.3.2`` and exits 1, naming each difference, when an installed version is
not its pin, a package that must be absent is installed (or present is not), protobuf's backend is not the one
expected, or the API does not load.
"""

from __future__ import annotations

import platform
import sys
from typing import Dict, List, Optional

PACKAGES = ("grpcio", "protobuf", "pyudev", "click", "sdnotify", "prometheus_client")


def installed(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: List[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    backend_wanted = None
    pins: Dict[str, str] = {}
    absent: List[str] = []
    present: List[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--backend" and args:
            backend_wanted = args.pop(0)
        elif arg == "--absent" and args:
            absent.append(args.pop(0))
        elif arg == "--present" and args:
            present.append(args.pop(0))
        elif "==" in arg:
            package, version = arg.split("==", 1)
            pins[package.lower()] = version
        else:
            print(f"report.py: bad argument {arg!r}: expected --backend KIND, --absent PACKAGE, --present PACKAGE "
                  "or PACKAGE==VERSION", file=sys.stderr)
            return 2
    from google.protobuf.internal import api_implementation

    backend = api_implementation.Type()
    versions = {package: installed(package) for package in PACKAGES}
    shown = ", ".join(f"{package} {versions[package] or '(none)'}" + (f" ({backend} backend)" if package ==
                      "protobuf" else "") for package in PACKAGES)
    print(f"[stack {name}] python {platform.python_version()} ({sys.executable}), {shown}", flush=True)
    problems = [f"{package} is {versions.get(package) or 'not installed'}, the stack pins {version}"
                for package, version in pins.items() if installed(package) != version]
    problems += [f"{package} {installed(package)} is installed, and the stack has none" for package in absent
                 if installed(package)]
    problems += [f"{package} is not installed, and the stack has it" for package in present if not installed(package)]
    if problems:
        problems.append("rebuild the venv: rm -rf it and run make again")
    if backend_wanted and backend != backend_wanted:
        problems.append(f"protobuf's backend is {backend}, expected {backend_wanted}")
    try:
        from udev_device_plugin import api

        api.Stub  # noqa: B018 - the import is the check
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"udev_device_plugin.api does not load: {exc!r}")
    for problem in problems:
        print(f"[stack {name}] {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
