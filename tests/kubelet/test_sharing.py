"""Sharing through the real kubelet v1.20.2: one device advertised as replicas, two pods running on it at
once, each seeing the node as on the host and its own replica in the kubelet's checkpoint; a third pod,
with no replica left, refused at admission; a device turning unhealthy takes every replica out of the
kubelet's allocatable devices."""

from __future__ import annotations

from . import helpers as h
from . import node as nodelib


def test_two_pods_share_one_device(node, start_daemon, pods, say):
    started = h.now()
    start_daemon(h.config(h.mem_section("zero", "replicas = 2\nreplica_policy = spread")))
    h.ready(node, {h.MEM: ["zero::0", "zero::1"]}, started)

    pods.extend(["share-a", "share-b"])
    names = [node.add_pod("share-a", {h.MEM: 1}), node.add_pod("share-b", {h.MEM: 1})]
    running = [node.wait_running(name) for name in names]
    kind, major, minor = nodelib.host_numbers("/dev/zero")
    for name in names:
        seen = node.report(name)
        # {ids} names the device, not the replica; the node is the host's, and it opens.
        assert seen.env["EXAMPLE_MEM_DEVICES"] == "zero", seen.env
        assert seen.devices.get("/dev/udevdp/zero") == (kind, major, minor, "opens"), seen.devices
    given = [node.allocated(h.uid(pod), h.MEM) for pod in running]
    assert sorted(given) == [["zero::0"], ["zero::1"]], given
    say(f"two pods run on /dev/zero at once, holding replicas {given[0][0]} and {given[1][0]}")

    pods.append("share-c")
    refused = node.wait_failed(node.add_pod("share-c", {h.MEM: 1}))
    assert h.MEM in h.status_text(refused), h.status_text(refused)
    say(f"a third pod, with no replica left, is refused: {h.status_text(refused)}")
    node.delete_pods(["share-a", "share-b", "share-c"])


def test_an_unhealthy_device_takes_every_replica(node, start_daemon, tmp_path, say):
    flag = tmp_path / "sick"
    section = h.mem_section("null zero", "replicas = 3\n"
                            f"health_command = /bin/sh -c 'test ! -e {flag} -o \"$0\" != null'\n"
                            "health_interval = 0.5\nhealth_timeout = 0.4")
    started = h.now()
    start_daemon(h.config(section))
    every = [f"{d}::{k}" for d in ("null", "zero") for k in range(3)]
    h.ready(node, {h.MEM: every}, started)
    flag.write_text("")
    h.healthy(node, h.MEM, [f"zero::{k}" for k in range(3)])
    flag.unlink()
    h.healthy(node, h.MEM, every)
    say("null's health check failing took null::0-2 out of the kubelet's healthy devices, and back")
