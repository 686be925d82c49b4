"""Serve, then Register: what reaches the kubelet, on this machine's mem and loop devices."""

from __future__ import annotations

import json
import os
import re
import time

from udev_device_plugin import api

from .helpers import (
    LOOP,
    LOOP_CONF,
    LOOP_IDS,
    MEM,
    MEM_CONF,
    MEM_IDS,
    PluginClient,
    RecordingKubelet,
    cli,
    main_thread_switches,
    make_stale_socket,
    our_sockets,
    wait_log,
)


def test_register_request_and_first_list(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)

    [request] = kubelet.requests
    assert request.version == "v1beta1"
    assert request.resource_name == MEM
    # The kubelet joins the endpoint to its directory: a bare file name, which we serve on.
    assert "/" not in request.endpoint and request.endpoint in our_sockets(kubelet_dir)
    assert str(daemon.pid) in request.endpoint
    assert not request.options.pre_start_required
    assert request.options.get_preferred_allocation_available

    # The first ListAndWatch message is the full list, every device healthy, no NUMA on this machine.
    first = kubelet.lists[request.endpoint][0]
    assert first == {i: "Healthy" for i in MEM_IDS}
    assert all(d["numa_nodes"] == [] for d in kubelet.devices[MEM].values())
    assert kubelet.capacity(MEM) == kubelet.allocatable(MEM) == 3

    # What the kubelet asked during Register, and what any client gets.
    assert not kubelet.client(MEM).options.pre_start_required
    assert kubelet.client(MEM).options.get_preferred_allocation_available
    with PluginClient(os.path.join(kubelet_dir, request.endpoint)) as client:
        options = client.stub.GetDevicePluginOptions(api.Empty(), timeout=10)
        assert (options.pre_start_required, options.get_preferred_allocation_available) == (False, True)
        # A second ListAndWatch (inspect does this) gets the full list too.
        stream = client.stub.ListAndWatch(api.Empty(), timeout=10)
        assert sorted(d.ID for d in next(stream).devices) == MEM_IDS
        stream.cancel()
    # Nothing changed, so the kubelet's stream got nothing after the first list.
    assert len(kubelet.lists[request.endpoint]) == 1
    assert len(kubelet.requests) == 1


def test_two_resources_side_by_side(kubelet, start_daemon, kubelet_dir):
    start_daemon(MEM_CONF + LOOP_CONF)
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live(LOOP, devices=8)

    by_resource = {r.resource_name: r.endpoint for r in kubelet.requests}
    assert set(by_resource) == {MEM, LOOP}
    assert by_resource[MEM] != by_resource[LOOP]
    assert sorted(our_sockets(kubelet_dir)) == sorted(by_resource.values())
    assert kubelet.lists[by_resource[MEM]][0] == {i: "Healthy" for i in MEM_IDS}
    assert kubelet.lists[by_resource[LOOP]][0] == {i: "Healthy" for i in LOOP_IDS}

    # Each socket answers for its own resource only.
    loop = kubelet.allocate(LOOP, ["loop3"]).container_responses[0]
    assert [(d.host_path, d.container_path, d.permissions) for d in loop.devices] == [
        ("/dev/loop3", "/dev/loop3", "rw")]
    mem = kubelet.allocate(MEM, ["null"]).container_responses[0]
    assert [d.host_path for d in mem.devices] == ["/dev/null"]
    assert len(kubelet.requests) == 2


def test_kubelet_absent_at_start_then_appears(kubelet_dir, start_daemon):
    """No kubelet.sock: the daemon serves, says it waits, sleeps; it registers when kubelet.sock appears."""
    daemon = start_daemon("[plugin]\nlog_level = debug\n" + MEM_CONF)
    wait_log(daemon, "ready:")
    assert "waiting for the kubelet" in daemon.log()
    [name] = our_sockets(kubelet_dir)

    # Waiting is not polling: over a second of nothing happening the main thread (which runs the
    # event loop and the gRPC servers) sleeps.  It may wake only for udev events (a udevd another
    # test runs on this machine), which it logs.  The second is a measuring window, not a wait.
    before, events = main_thread_switches(daemon.pid), daemon.log().count(" DEBUG udev ")
    time.sleep(1.0)
    events = daemon.log().count(" DEBUG udev ") - events
    assert main_thread_switches(daemon.pid) - before <= 2 * events

    # inspect sees a daemon that serves but is not registered, and why.
    report = cli("inspect", "--kubelet-dir", kubelet_dir, "--json")
    assert report.returncode == 0, report.stderr
    [res] = json.loads(report.stdout)["resources"]
    assert res["registered"] is False
    assert "waiting for" in res["last_error"] and "kubelet.sock" in res["last_error"]

    kubelet = RecordingKubelet(kubelet_dir).start()
    try:
        kubelet.wait_live(MEM, devices=3)
        # The stand-in removed every socket at start, as a kubelet does; we served again on a fresh one.
        # (A Register that races the stand-in's own start-up can be refused once, and is retried.)
        accepted = kubelet.endpoints(MEM)
        assert len(accepted) == 1 and len(kubelet.requests) <= 2, (kubelet.refused, daemon.log())
        assert accepted[0] != name
        assert our_sockets(kubelet_dir) == accepted
    finally:
        kubelet.stop()


def test_register_refusals_are_retried_with_backoff(kubelet_dir, start_daemon):
    kubelet = RecordingKubelet(kubelet_dir, refuse=4, refusal="device manager not ready").start()
    try:
        daemon = start_daemon("[plugin]\nregister_backoff_max = 0.1\n" + MEM_CONF)
        kubelet.wait_live(MEM, devices=3)
        assert len(kubelet.requests) == 5 and len(kubelet.refused) == 4
        # Every attempt names a socket no kubelet has seen.
        endpoints = [r.endpoint for r in kubelet.requests]
        assert len(set(endpoints)) == 5
        assert our_sockets(kubelet_dir) == [endpoints[-1]]
        log = daemon.log()
        # The reason is logged, and the wait doubles up to register_backoff_max.
        waits = re.findall(r"Register failed: UNKNOWN: device manager not ready; retrying in ([0-9.]+) s", log)
        assert [float(w) for w in waits] == [0.02, 0.04, 0.08, 0.1]
        # The kubelet reads the device list before its Register answer reaches the daemon.
        wait_log(daemon, "registered with the kubelet")
    finally:
        kubelet.stop()


def test_kubelet_sock_that_nobody_answers(kubelet_dir, start_daemon):
    """A kubelet.sock left by a dead kubelet: Register fails and is retried until a kubelet starts."""
    make_stale_socket(os.path.join(kubelet_dir, "kubelet.sock"))
    daemon = start_daemon("[plugin]\nregister_backoff_max = 0.2\n" + MEM_CONF)
    wait_log(daemon, "Register failed: UNAVAILABLE", count=2)
    kubelet = RecordingKubelet(kubelet_dir).start()
    try:
        kubelet.wait_live(MEM, devices=3)
    finally:
        kubelet.stop()
