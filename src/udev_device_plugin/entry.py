"""The ``udev-device-plugin`` executable: ``serve`` without the CLI framework, everything else through cli.py.

The daemon's start is on every node's boot path and every kubelet restart's recovery path: ``serve``
imports only what serving needs (no click, no inspection, no json), so that the first Register goes
out as soon as the interpreter, grpc, protobuf and pyudev are loaded.  Its two options are parsed
here by hand, as click would (``--opt VALUE`` and ``--opt=VALUE``); ``serve --help`` and every other
command go to the click CLI.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

# gRPC's core logs connection chatter at INFO on stderr; our own log says what matters.
# Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

DEFAULT_CONFIG = "/etc/udev-device-plugin/udev-device-plugin.conf"
_SERVE_OPTIONS = ("--config", "--kubelet-dir")


def serve_options(args: List[str]) -> Optional[Dict[str, str]]:
    """``serve``'s options, or None when they need the full CLI (help, or anything it would refuse)."""
    out: Dict[str, str] = {}
    i = 0
    while i < len(args):
        name, sep, value = args[i].partition("=")
        if name not in _SERVE_OPTIONS or name in out:
            return None
        if not sep:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        out[name] = value
        i += 1
    return out


def main() -> None:
    args = sys.argv[1:]
    options = serve_options(args[1:]) if args[:1] == ["serve"] else None
    if options is not None:
        from .daemon import serve

        sys.exit(serve(options.get("--config", DEFAULT_CONFIG), options.get("--kubelet-dir")))
    from .cli import main as cli_main

    cli_main()
