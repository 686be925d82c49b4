"""The ``udev-device-plugin`` executable: ``serve`` without the CLI framework, everything else through cli.py.

The daemon's start is on every node's boot path and every kubelet restart's recovery path: ``serve``
imports only what serving needs (no click, no inspection, no json), so that the first Register goes
out as soon as the interpreter, grpc, protobuf and pyudev are loaded.  Its two options are parsed
here by hand, as click would (``--opt VALUE`` and ``--opt=VALUE``); ``serve --help`` and every other
command go to the click CLI.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Dict, Iterable, List, MutableMapping, Optional, Tuple

# gRPC's core logs connection chatter at INFO on stderr; our own log says what matters.
# Must be set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The daemon's servers run on gRPC core's own (iomgr) listener, not its EventEngine listener:
# grpc.aio's completion-queue thread then reads and writes the sockets itself, where the
# EventEngine hands every read and write to threads of its own first.  Measured with
# `make bench` on grpcio 1.85: up to a fifth less server CPU per Allocate.
# It is the listener the distributions' grpcio runs anyway: EventEngine's is off by default
# in 1.59 (EL10's pins) and absent from 1.46 (EL9's).  Set only on the releases where the
# switch is known, the newest of them tested here: on a release that no longer knows it
# gRPC would log an error at every start.  An admin's own GRPC_EXPERIMENTS is left alone.
GRPC_EXPERIMENTS = "-event_engine_listener"
GRPC_EXPERIMENTS_RELEASES = ((1, 59), (1, 85))

# gRPC's client channels start a "backup poller" (a timer every 5 s, kept after the channel is
# closed) for polling engines where no thread might poll a connection.  On Linux (epoll1, or the
# EventEngine) every connection is polled anyway, grpc.aio's poller thread included; the timer
# only wakes the process: after our first Register it split gRPC's timer list so that its timer
# thread woke twice a second instead of once, for as long as the daemon runs (measured with
# `make bench` on grpcio 1.85, with the listener above).  0 turns it off; grpcio 1.46 to 1.85 read
# it, and a release that does not ignores it.  An admin's own value is left alone.
BACKUP_POLL = "GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS"


def grpcio_release() -> Optional[Tuple[int, int]]:
    """The installed grpcio's (major, minor), read without importing grpc (which reads its settings
    once, at import); None when it cannot be told."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("grpc")
    except (ImportError, ValueError):
        return None
    return release_in(spec.submodule_search_locations or []) if spec is not None else None


def release_in(locations: Iterable[str]) -> Optional[Tuple[int, int]]:
    """The (major, minor) in the first ``_grpcio_metadata.py`` (grpcio's version file) of ``locations``."""
    for location in locations:
        try:
            with open(os.path.join(location, "_grpcio_metadata.py"), encoding="utf-8") as f:
                found = re.search(r"(\d+)\.(\d+)", f.read(4096))
        except (OSError, UnicodeDecodeError):
            continue
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


def grpc_settings(environ: MutableMapping[str, str], release: Optional[Tuple[int, int]]) -> Dict[str, str]:
    """Set in ``environ`` what the daemon's gRPC runs with, for grpcio ``release``; return what was set."""
    settings: Dict[str, str] = {}
    if BACKUP_POLL not in environ:
        settings[BACKUP_POLL] = "0"
    first, last = GRPC_EXPERIMENTS_RELEASES
    if "GRPC_EXPERIMENTS" not in environ and release is not None and first <= release <= last:
        settings["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
    environ.update(settings)
    return settings

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
        grpc_settings(os.environ, grpcio_release())
        from .daemon import serve

        sys.exit(serve(options.get("--config", DEFAULT_CONFIG), options.get("--kubelet-dir")))
    from .cli import main as cli_main

    cli_main()
