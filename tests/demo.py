"""README's first command (`make demo`): the real daemon, as a subprocess, against the stand-in kubelet
in a temporary directory, printing what a kubelet would see.

    python -m tests.demo [--config FILE]     # from the repository root, in the project's venv
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

if __name__ == "__main__":
    # gRPC's core logs connection chatter at INFO; must be set before grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import udev_device_plugin  # noqa: E402
from udev_device_plugin import config  # noqa: E402

from .standin import StandInKubelet  # noqa: E402

Echo = Callable[[str], None]
# The shipped example: resources that match on any Linux machine.
EXAMPLE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(udev_device_plugin.__file__)), "example.conf")
EXIT_CONFIG = 78


def run_demo(config_path: str, kubelet_dir: str, echo: Echo) -> int:
    cfg = config.load(config_path)
    names = [r.name for r in cfg.resources]
    echo(f"== stand-in kubelet on {kubelet_dir}/kubelet.sock")
    kubelet = StandInKubelet(kubelet_dir).start()
    cmd = [sys.executable, "-m", "udev_device_plugin", "serve", "--config", config_path,
           "--kubelet-dir", kubelet_dir]
    echo("== starting: " + " ".join(cmd))
    started = time.monotonic()
    daemon = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        if not kubelet.wait_for(lambda: all(n in kubelet.devices for n in names), timeout=30):
            echo("!! the daemon did not register every resource within 30 s; its log:")
            daemon.terminate()
            echo(daemon.communicate(timeout=10)[1])
            return 1
        echo(f"== registered {len(names)} resource(s) in {(time.monotonic() - started) * 1000:.0f} ms "
             "(process start included)")
        for reg in kubelet.registrations:
            echo(f"  Register: resource={reg['resource']} endpoint={reg['endpoint']}")
        echo("== what the kubelet sees (ListAndWatch): capacity / allocatable, devices")
        for name in names:
            opts = kubelet.client(name).options
            echo(f"  {name}: {kubelet.capacity(name)} / {kubelet.allocatable(name)}"
                 f"  (preferred allocation: {bool(opts and opts.get_preferred_allocation_available)},"
                 f" prestart: {bool(opts and opts.pre_start_required)})")
            for dev in sorted(kubelet.devices[name].values(), key=lambda d: d["id"]):
                numa = ",".join(map(str, dev["numa_nodes"])) or "none"
                echo(f"    {dev['id']:<12} {dev['health']:<9} NUMA {numa}")
        target = next((n for n in names if kubelet.allocatable(n)), None)
        if target is not None:
            healthy = sorted(d["id"] for d in kubelet.devices[target].values() if d["health"] == "Healthy")
            want = min(2, len(healthy))
            chosen = kubelet.preferred(target, healthy, [], want)
            echo(f"== GetPreferredAllocation({target}, {want} of {healthy}) -> {chosen}")
            answer = kubelet.allocate(target, chosen).container_responses[0]
            echo(f"== Allocate({target}, {chosen}):")
            for spec in answer.devices:
                echo(f"    device {spec.host_path} -> {spec.container_path} ({spec.permissions})")
            for mount in answer.mounts:
                echo(f"    mount {mount.host_path} -> {mount.container_path}{' ro' if mount.read_only else ''}")
            for key, value in sorted(answer.envs.items()):
                echo(f"    env {key}={value}")
            for key, value in sorted(answer.annotations.items()):
                echo(f"    annotation {key}={value}")
        echo("== restarting the stand-in kubelet (it deletes every socket, as a kubelet does)")
        before = len(kubelet.registrations)
        kubelet.stop()
        t0 = time.monotonic()
        kubelet.start()
        if kubelet.wait_for(lambda: len(kubelet.registrations) >= before + len(names), timeout=10):
            echo(f"  every resource registered again {(time.monotonic() - t0) * 1000:.1f} ms after the new "
                 "kubelet.sock appeared")
        else:
            echo("!! the daemon did not register again within 10 s")
            return 1
        echo("== stopping the daemon (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        _, log = daemon.communicate(timeout=10)
        left = [n for n in os.listdir(kubelet_dir) if n != "kubelet.sock"]
        echo(f"  exit status {daemon.returncode}; sockets left behind: {left or 'none'}")
        echo("== the daemon's log")
        for line in log.splitlines():
            echo("  | " + line)
        return 0 if daemon.returncode == 0 else 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        kubelet.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=(
        "Run the daemon against a stand-in kubelet in a temporary directory and show what a kubelet sees."))
    parser.add_argument("--config", default=EXAMPLE_CONFIG,
                        help="Config to serve (default: the shipped example, which matches on any Linux machine).")
    args = parser.parse_args(argv)
    try:
        config.load(args.config)
    except config.ConfigError as exc:
        for message in exc.messages:
            print(message, file=sys.stderr)
        print(f"invalid configuration: {len(exc.messages)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    with tempfile.TemporaryDirectory(prefix="udev-device-plugin-demo-") as tmp:
        return run_demo(args.config, os.path.join(tmp, "device-plugins"), lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
