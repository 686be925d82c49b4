"""What ``list`` and ``inspect`` show: plain dicts, printed as text or JSON."""

from __future__ import annotations

import os
import stat
import time
from typing import Any, Callable, Dict, List

import grpc

from . import api, cdi, commands, config, sharing
from .kubelet import SOCKET_PREFIX


def discover(cfg: config.Config) -> List[Dict[str, Any]]:
    """Scan every resource as the daemon would, health_command included.

    Per device: ``devnodes`` (its own, its VFIO group's, the descendants' its resource grants),
    ``grants`` (what an Allocate of it hands out: those and the resource's extra_devnodes) and
    ``withheld`` (descendants' nodes that child_devnodes leaves out, with their subsystem); with
    ``replicas``, the IDs the kubelet would see of it (``advertised_ids``), and with ``cdi``, their
    CDI devices (``cdi_devices``).
    """
    import pyudev

    from . import discovery

    context = pyudev.Context()
    rows = []
    for res in cfg.resources:
        withheld: Dict[str, List[str]] = {}
        devices, problems = discovery.scan_resource(context, res, withheld=withheld)
        out = []
        for dev in devices.values():
            health, reason = dev.health, dev.reason
            if dev.healthy and res.health_command:
                result = commands.run_health_command(res, dev)
                if not result.ok:
                    health, reason = "Unhealthy", f"health_command: {result.detail}"
            grants = list(dict.fromkeys(dev.devnodes + res.extra_devnodes))
            ids = sharing.replica_ids(dev.id, res.replicas)
            out.append({"id": dev.id, "devnodes": list(dev.devnodes), "grants": grants,
                        "withheld": withheld.get(dev.sys_path, []), "numa_nodes": list(dev.numa_nodes),
                        "health": health, "reason": reason, "syspath": dev.sys_path,
                        "advertised_ids": list(ids),
                        "cdi_devices": [f"{res.cdi_kind}={cdi.device_name(i)}" for i in ids]
                        if res.cdi and dev.devnodes else []})
        rows.append({"resource": res.name, "devices": out, "problems": problems, "replicas": res.replicas,
                     "replica_policy": res.replica_policy, "cdi_kind": res.cdi_kind})
    return rows


def device_line(dev: Dict[str, Any]) -> str:
    """One device as ``list`` and ``inspect`` print it: ID, health, NUMA, the nodes it grants."""
    numa = ",".join(map(str, dev["numa_nodes"])) or "-"
    nodes = dev.get("grants", dev["devnodes"])
    line = f"{dev['id']:<16} {dev['health']:<9} numa={numa:<3} {' '.join(nodes) or '(no device node)'}"
    if dev.get("reason"):
        line += f"  ({dev['reason']})"
    if dev.get("withheld"):
        line += f"  [not granted, see child_devnodes: {', '.join(dev['withheld'])}]"
    return line


def _some(items: List[str], shown: int = 4) -> str:
    if len(items) <= shown + 1:
        return " ".join(items)
    return " ".join(items[:shown]) + f" ... {items[-1]}"


def sharing_lines(dev: Dict[str, Any]) -> List[str]:
    """What ``list`` and ``inspect`` print under a device: its replicas and CDI devices, grouped."""
    lines = []
    ids = dev.get("advertised_ids", [])
    if len(ids) > 1 or (ids and ids != [dev["id"]]):
        lines.append(f"{len(ids)} replicas: {_some(ids)}")
    elif not ids:
        lines.append("not advertised (the ListAndWatch message would pass the kubelet's 4 MiB)")
    names = dev.get("cdi_devices", [])
    if len(names) == 1:
        lines.append(f"CDI device: {names[0]}")
    elif names:
        lines.append(f"{len(names)} CDI devices: {_some(names, 2)}")
    return lines


def our_sockets(kubelet_dir: str) -> List[str]:
    try:
        names = sorted(os.listdir(kubelet_dir))
    except OSError:
        return []
    out = []
    for name in names:
        path = os.path.join(kubelet_dir, name)
        try:
            if name.startswith(SOCKET_PREFIX) and stat.S_ISSOCK(os.lstat(path).st_mode):
                out.append(path)
        except OSError:
            continue
    return out


def inspect(kubelet_dir: str, timeout: float, registry_dir: str = "") -> Dict[str, Any]:
    """Ask each of our sockets, as the kubelet would, for its options, and for its registration and devices.

    The sockets in ``kubelet_dir`` and, given one, in the plugin watcher's ``registry_dir``.  No
    ListAndWatch: a stream opened here could be taken for the kubelet's.
    """
    report: Dict[str, Any] = {"kubelet_dir": kubelet_dir, "resources": [], "unanswered": []}
    paths = our_sockets(kubelet_dir)
    if registry_dir:
        report["plugins_registry_dir"] = registry_dir
        paths += our_sockets(registry_dir)
    for path in paths:
        channel = grpc.insecure_channel("unix:" + path)
        try:
            stub = api.Stub(channel)
            options = stub.GetDevicePluginOptions(api.Empty(), timeout=timeout)
            status = stub.GetStatus(api.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            report["unanswered"].append({"socket": path, "error": f"{exc.code().name}: {exc.details()}"})
            continue
        finally:
            channel.close()
        report["resources"].append({
            "resource": status.resource_name,
            "socket": path,
            "registered": status.registered,
            "state": status.state,
            "since": status.since,
            "stream_since": status.stream_since,
            "endpoint": status.endpoint,
            "streams_lost": status.streams_lost,
            "registered_via": status.registered_via,
            "last_error": status.last_error,
            "registrations": status.registrations,
            "pid": status.pid,
            "version": status.version,
            "options": {"pre_start_required": options.pre_start_required,
                        "get_preferred_allocation_available": options.get_preferred_allocation_available},
            "devices": [{"id": d.id, "health": d.health, "numa_nodes": list(d.numa_nodes), "reason": d.reason,
                         "devnodes": list(d.devnodes), "advertised_ids": list(d.advertised_ids),
                         "cdi_devices": list(d.cdi_devices)} for d in status.devices],
            "replicas": status.replicas,
            "replica_policy": status.replica_policy,
            "cdi_kind": status.cdi_kind,
            "cdi_spec": status.cdi_spec,
            "cdi_error": status.cdi_error,
        })
    return report


def resource_lines(res: Dict[str, Any]) -> List[str]:
    """A resource's sharing and CDI settings, where they are not the defaults."""
    lines = []
    if res.get("replicas", 1) > 1:
        lines.append(f"shared: {res['replicas']} replicas per device, preferred allocations {res['replica_policy']}")
    if res.get("cdi_kind"):
        line = f"CDI kind {res['cdi_kind']}"
        if res.get("cdi_spec"):
            line += f", spec {res['cdi_spec']}"
        if res.get("cdi_error"):
            line += f" NOT WRITTEN: {res['cdi_error']}"
        lines.append(line)
    return lines


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def print_inspect(report: Dict[str, Any], echo: Callable[[str], None]) -> None:
    for res in report["resources"]:
        via = f" through the {res['registered_via'].replace('-', ' ')}" if res.get("registered_via") else ""
        if res["registered"]:
            state = f"registered{via}; stream connected since {_when(res['stream_since'])}"
        else:
            state = f"NOT registered: {res['state'] or 'unknown'} since {_when(res['since'])}"
            if res["last_error"]:
                state += f" ({res['last_error']})"
        opts = res["options"]
        echo(f"{res['resource']}: {state}; pid {res['pid']}; socket {res['socket']}")
        echo(f"  registrations accepted: {res['registrations']}; streams the kubelet ended: {res['streams_lost']}")
        echo(f"  options: pre_start_required={opts['pre_start_required']} "
             f"get_preferred_allocation_available={opts['get_preferred_allocation_available']}")
        for line in resource_lines(res):
            echo("  " + line)
        for dev in res["devices"]:
            echo("  " + device_line(dev))
            for line in sharing_lines(dev):
                echo("      " + line)
    for item in report["unanswered"]:
        echo(f"{item['socket']}: no answer ({item['error']})")
