"""Configs and waits the real-kubelet scenarios share (and the benchmark)."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional

from tests.hotplug import realudev

from . import node as nodelib
from .node import LogLine, Node, NodeError, wait_for

MEM = "example.com/mem"
LOOP = realudev.LOOP_RESOURCE  # example.com/loop, kernel loop1[0-9][0-9]
REGISTER_TIMEOUT = 30.0

HEADER = """
[plugin]
log_level = debug
events = stderr
"""
# /dev/null, /dev/zero and /dev/full are in every container already: ours go to /dev/udevdp/<name>
# so the container's view shows what the allocation added.
MEM_SECTION = """
[resource example.com/mem]
subsystem = mem
kernel = {kernel}
container_path = /dev/udevdp/{{name}}
env = EXAMPLE_MEM_DEVICES={{ids}}
annotations = example.com/mem-devnodes={{devnodes}}
{extra}
"""
LOOP_SECTION = """
[resource example.com/loop]
subsystem = block
kernel = loop1[0-9][0-9]
devtype = disk
env = EXAMPLE_LOOP_DEVICES={ids}
{extra}
"""


def mem_section(kernel: str = "null zero full", extra: str = "") -> str:
    return MEM_SECTION.format(kernel=kernel, extra=extra)


def loop_section(extra: str = "") -> str:
    return LOOP_SECTION.format(ids="{ids}", extra=extra)


def config(*sections: str) -> str:
    return HEADER + "".join(sections)


def registered(node: Node, resource: str, after: float, timeout: float = REGISTER_TIMEOUT,
               daemon_log: Optional[str] = None) -> LogLine:
    """The current kubelet run's first Register for ``resource`` at or after wall time ``after``."""
    assert node.kubelet is not None
    kubelet = node.kubelet
    try:
        return wait_for(lambda: kubelet.first(nodelib.registration_line(resource), after), timeout,  # type: ignore
                        f"kubelet run {kubelet.run} to receive Register for {resource}")
    except NodeError as exc:
        raise NodeError(f"{exc}" + (f"\ndaemon log:\n{tail(daemon_log)}" if daemon_log else "")) from None


def pushed(node: Node, resource: str, after: float, timeout: float = REGISTER_TIMEOUT) -> LogLine:
    """The current run's first "State pushed" (a ListAndWatch message received) at or after ``after``."""
    assert node.kubelet is not None
    kubelet = node.kubelet
    return wait_for(lambda: kubelet.first(nodelib.state_pushed_line(resource), after), timeout,  # type: ignore
                    f"kubelet run {kubelet.run} to receive a ListAndWatch message for {resource}")


def ready(node: Node, resources: Mapping[str, Iterable[str]], after: float,
          daemon_log: Optional[str] = None) -> Dict[str, LogLine]:
    """Wait until the kubelet has a Register and a ListAndWatch message after ``after`` for each resource
    and records the given devices as healthy; return each resource's Register line."""
    lines = {}
    for resource, ids in resources.items():
        lines[resource] = registered(node, resource, after, daemon_log=daemon_log)
        pushed(node, resource, lines[resource].time)
        healthy(node, resource, ids)
    return lines


def stream_ended(node: Node, resource: str, after: float, timeout: float = 10.0) -> LogLine:
    """The current run's first "listAndWatch ended unexpectedly" for ``resource`` at or after ``after``."""
    assert node.kubelet is not None
    kubelet = node.kubelet
    return wait_for(lambda: kubelet.first(nodelib.stream_ended_line(resource), after), timeout,  # type: ignore
                    f"kubelet run {kubelet.run} to log the end of the {resource} stream")


def healthy(node: Node, resource: str, ids: Iterable[str], timeout: float = REGISTER_TIMEOUT) -> None:
    """Wait until the kubelet's checkpoint records exactly ``ids`` as the healthy devices of ``resource``."""
    want = sorted(ids)
    try:
        wait_for(lambda: node.healthy_devices(resource) == want, timeout,
                 f"the kubelet's checkpoint to list {resource} = {want} as healthy")
    except NodeError as exc:
        raise NodeError(f"{exc}; it lists {node.healthy_devices(resource)}") from None


def tail(text: Optional[str], lines: int = 30) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def uid(pod: Dict) -> str:
    return str(pod["metadata"]["uid"])


def status_text(pod: Dict) -> str:
    status = pod.get("status") or {}
    return f"{status.get('reason', '')}: {status.get('message', '')}"


def oci_annotations(node: Node, container: str) -> Dict[str, str]:
    """The OCI spec annotations containerd gave a container (``ctr containers info``)."""
    info = json.loads(node.ctr("containers", "info", container))
    return dict(info.get("Spec", {}).get("annotations") or {})


def daemon_sockets(node: Node, resource: str) -> List[str]:
    """Paths of the daemon's sockets for ``resource`` now in the device-plugins directory."""
    prefix = "udevdp-" + resource.replace("/", "_") + "-"
    return sorted(os.path.join(node.dp, f) for f in os.listdir(node.dp) if f.startswith(prefix))


def current_endpoint(node: Node, resource: str) -> str:
    """The host path of the socket the current kubelet run last registered for ``resource``."""
    assert node.kubelet is not None
    found = [line for line in node.kubelet.lines() if line.text.startswith("Registered endpoint")
             and f" {resource} " in line.text]
    if not found:
        raise NodeError(f"kubelet run {node.kubelet.run} has registered no endpoint for {resource}")
    for word in found[-1].text.split():
        if word.startswith(nodelib.KUBELET_PLUGIN_DIR + "/"):
            return os.path.join(node.dp, os.path.basename(word))
    raise NodeError(f"no socket path in {found[-1].text!r}")


def now() -> float:
    return time.time()


def cli_inspect(node: Node, resource: str = MEM) -> Dict:
    """``udev-device-plugin inspect --json``'s row for ``resource``, over both of the node's socket directories."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "udev_device_plugin", "inspect", "--kubelet-dir", node.dp,
                          "--plugins-registry-dir", os.path.join(node.kroot, "plugins_registry"), "--json"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise NodeError(f"inspect failed: {out.stderr}")
    rows = {r["resource"]: r for r in json.loads(out.stdout)["resources"]}
    return rows[resource]
