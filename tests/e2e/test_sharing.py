"""Sharing end to end: the real daemon with ``replicas`` and the stand-in kubelet.  Each device is advertised as
N IDs with its health, Allocate of several replicas gives the device once and refuses unknown replica IDs by
name, preferred allocations spread or pack, reloads follow, and list/inspect group the replicas by device."""

from __future__ import annotations

import json
import os
import signal
from typing import Dict

import grpc
import pytest

from .helpers import MEM, MEM_CONF, cli, config_path, rewrite_config, rpc_error, wait_log
from .test_allocate import specs

SHARED = MEM_CONF + "replicas = 4\n"


def replicas(ids, n) -> Dict[str, str]:
    return {f"{i}::{k}": "Healthy" for i in ids for k in range(n)}


def test_each_device_is_advertised_as_its_replicas(kubelet, start_daemon):
    start_daemon(SHARED)
    kubelet.wait_live(MEM, devices=12)
    assert kubelet.health(MEM) == replicas(["full", "null", "zero"], 4)
    assert (kubelet.capacity(MEM), kubelet.allocatable(MEM)) == (12, 12)


def test_allocate_gives_a_device_once_and_refuses_unknown_replicas(kubelet, start_daemon):
    start_daemon(SHARED + "env =\n    IDS={ids}\n    COUNT={count}\n    NODES={devnodes}\n")
    kubelet.wait_live(MEM, devices=12)
    first, second = kubelet.allocate(MEM, ["null::0", "null::3", "zero::1"], ["null::2"]).container_responses
    assert specs(first) == [("/dev/null", "/dev/null", "rw"), ("/dev/zero", "/dev/zero", "rw")]
    assert dict(first.envs) == {"IDS": "null,zero", "COUNT": "2", "NODES": "/dev/null,/dev/zero"}
    # Another container gets another replica of the same device: shared.
    assert specs(second) == [("/dev/null", "/dev/null", "rw")] and second.envs["IDS"] == "null"

    for ids, named in ((["null"], "'null'"), (["null::4"], "'null::4'"), (["zero::0", "zero::x"], "'zero::x'")):
        code, details = rpc_error(kubelet.allocate, MEM, ids)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details and MEM in details, (ids, details)
        assert "'zero::0'" not in details


def test_an_unhealthy_device_takes_all_its_replicas(kubelet, start_daemon):
    # /dev/null is 1:3; the rule fails zero (1:5) and full (1:7).
    start_daemon(SHARED + "health.attribute.dev = 1:3\n")
    kubelet.wait_live(MEM)
    assert kubelet.health(MEM) == {**replicas(["null"], 4), **{i: "Unhealthy" for i in replicas(["full", "zero"], 4)}}
    assert kubelet.allocatable(MEM) == 4
    code, details = rpc_error(kubelet.allocate, MEM, ["zero::2"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'zero::2'" in details


@pytest.mark.parametrize("policy, expected", [
    ("spread", ["full::0", "null::0", "zero::0", "full::1"]),
    ("pack", ["full::0", "full::1", "full::2", "full::3"]),
])
def test_preferred_allocation_policy(kubelet, start_daemon, policy, expected):
    start_daemon(SHARED + f"replica_policy = {policy}\n")
    kubelet.wait_live(MEM, devices=12)
    available = sorted(replicas(["full", "null", "zero"], 4), reverse=True)
    assert kubelet.preferred(MEM, available, [], 4) == expected
    # With a replica of zero chosen already (an init container's), spread goes elsewhere, pack stays.
    got = kubelet.preferred(MEM, available, ["zero::3"], 2)
    assert got == (["zero::3", "full::0"] if policy == "spread" else ["zero::3", "zero::0"])


def test_prestart_gets_the_devices_once(kubelet, start_daemon, tmp_path):
    out = tmp_path / "prestart.out"
    script = tmp_path / "prestart.sh"
    script.write_text(f'echo "$* $UDP_DEVICE_IDS $UDP_DEVNODES $UDP_REPLICA_IDS" > {out}\n')
    start_daemon(SHARED + f"prestart_command = /bin/sh {script}\n")
    kubelet.wait_live(MEM, devices=12)
    kubelet.prestart(MEM, ["null::1", "null::2", "zero::0"])
    assert out.read_text() == "null zero null,zero /dev/null,/dev/zero null::1,null::2,zero::0\n"
    code, details = rpc_error(kubelet.prestart, MEM, ["null::9"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'null::9'" in details


def test_reload_changes_the_replicas_without_registering_again(kubelet, start_daemon):
    daemon = start_daemon(SHARED)
    kubelet.wait_live(MEM, devices=12)
    rewrite_config(daemon, MEM_CONF.replace("null zero full", "null zero") + "replicas = 2\n")
    os.kill(daemon.pid, signal.SIGHUP)
    assert kubelet.wait_for(lambda: kubelet.health(MEM) == replicas(["null", "zero"], 2), 10), kubelet.health(MEM)
    # Back to one: the plain IDs.
    rewrite_config(daemon, MEM_CONF)
    os.kill(daemon.pid, signal.SIGHUP)
    assert kubelet.wait_for(lambda: kubelet.health(MEM) == {"full": "Healthy", "null": "Healthy", "zero": "Healthy"},
                            10), kubelet.health(MEM)
    wait_log(daemon, "configuration reloaded", count=2)
    assert len(kubelet.endpoints(MEM)) == 1 and kubelet.connected(MEM)
    assert specs(kubelet.allocate(MEM, ["zero"]).container_responses[0]) == [("/dev/zero", "/dev/zero", "rw")]


def test_list_and_inspect_group_replicas_by_device(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(SHARED + "replica_policy = pack\n")
    kubelet.wait_live(MEM, devices=12)
    data = json.loads(cli("inspect", "--kubelet-dir", kubelet_dir, "--json").stdout)
    [row] = data["resources"]
    assert (row["replicas"], row["replica_policy"]) == (4, "pack")
    assert {d["id"]: d["advertised_ids"] for d in row["devices"]} == {
        i: [f"{i}::{k}" for k in range(4)] for i in ("full", "null", "zero")}
    text = cli("inspect", "--kubelet-dir", kubelet_dir).stdout
    assert "shared: 4 replicas per device, preferred allocations pack" in text
    assert "      4 replicas: null::0 null::1 null::2 null::3" in text

    listed = cli("list", "--config", config_path(daemon), "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)["resources"]
    assert row["replicas"] == 4 and {d["id"]: d["advertised_ids"] for d in row["devices"]} == {
        i: [f"{i}::{k}" for k in range(4)] for i in ("full", "null", "zero")}
    assert "      4 replicas: zero::0 zero::1 zero::2 zero::3" in cli("list", "--config", config_path(daemon)).stdout
