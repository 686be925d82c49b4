"""The kubelet's calls into our socket: Allocate, GetPreferredAllocation, PreStartContainer, and bad requests."""

from __future__ import annotations

import os
import random
import socket

import grpc
import pytest

from udev_device_plugin import api

from ..conftest import process_gone, wait_until
from .helpers import LOOP, LOOP_CONF, LOOP_IDS, MEM, MEM_CONF, PluginClient, rpc_error

TEMPLATED = f"""\
[resource {MEM}]
subsystem = mem
kernel = null zero
permissions = rwm
container_path = /dev/udp/{{id}}-{{name}}
extra_devnodes = /dev/full
env =
    UDP_IDS={{ids}}
    UDP_COUNT={{count}}
    UDP_NODES={{devnodes}}
    UDP_RESOURCE={{resource}}
annotations =
    example.com/ids={{ids}}
    example.com/resource={{resource}}
mounts =
    /run/udp/{{resource}}:/run/udp:ro
    /var/lib/udp/{{ids}}:/data
"""

# zero is made unhealthy by a health command that also checks what it is given: the ID as the last
# argument ($0 of sh -c) and the UDP_* environment.
SICK_ZERO = MEM_CONF + """\
health_command = /bin/sh -c 'test "$UDP_DEVICE_ID" != zero && test "$0" = "$UDP_DEVICE_ID" \
&& test "$UDP_DEVNODES" = "/dev/$0" && test "$UDP_RESOURCE" = example.com/mem && test -d "$UDP_SYSPATH"'
"""


def specs(response):
    return [(d.host_path, d.container_path, d.permissions) for d in response.devices]


def test_allocate_default_answer(kubelet, start_daemon):
    start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    response = kubelet.allocate(MEM, ["null"], ["zero", "full"])
    first, second = response.container_responses
    assert specs(first) == [("/dev/null", "/dev/null", "rw")]
    assert specs(second) == [("/dev/zero", "/dev/zero", "rw"), ("/dev/full", "/dev/full", "rw")]
    for r in (first, second):
        assert not r.mounts and not r.envs and not r.annotations and not r.cdi_devices


def test_allocate_templated_answer(kubelet, start_daemon):
    start_daemon(TEMPLATED)
    kubelet.wait_live(MEM, devices=2)
    [r] = kubelet.allocate(MEM, ["zero", "null"]).container_responses
    # One DeviceSpec per node, in request order, then the shared extra node once (it belongs to no
    # device, so a template naming {id} leaves it at its host path).
    assert specs(r) == [("/dev/zero", "/dev/udp/zero-zero", "rwm"), ("/dev/null", "/dev/udp/null-null", "rwm"),
                        ("/dev/full", "/dev/full", "rwm")]
    assert dict(r.envs) == {"UDP_IDS": "zero,null", "UDP_COUNT": "2", "UDP_NODES": "/dev/zero,/dev/null,/dev/full",
                            "UDP_RESOURCE": MEM}
    assert dict(r.annotations) == {"example.com/ids": "zero,null", "example.com/resource": MEM}
    assert [(m.host_path, m.container_path, m.read_only) for m in r.mounts] == [
        (f"/run/udp/{MEM}", "/run/udp", True), ("/var/lib/udp/zero,null", "/data", False)]

    # A device named twice is one device.
    [r] = kubelet.allocate(MEM, ["null", "null"]).container_responses
    assert specs(r) == [("/dev/null", "/dev/udp/null-null", "rwm"), ("/dev/full", "/dev/full", "rwm")]
    assert r.envs["UDP_COUNT"] == "1"


@pytest.mark.parametrize("requests, named", [
    ([["bogus"]], ["bogus"]),
    ([["null", "bogus"]], ["bogus"]),  # a good ID does not rescue the request
    ([["bogus", "zero", "nope"]], ["bogus", "nope"]),
    ([["null"], ["missing"]], ["missing"]),  # a bad container request fails the whole call
    ([[]], []),  # a container request naming no device
], ids=["unknown", "mixed", "two-unknown", "second-container", "no-ids"])
def test_allocate_refuses_unknown_ids(kubelet, start_daemon, requests, named):
    start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    code, details = rpc_error(kubelet.allocate, MEM, *requests)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert MEM in details
    for device_id in named:
        assert repr(device_id) in details
    assert "'null'" not in details
    # Still serving.
    assert specs(kubelet.allocate(MEM, ["null"]).container_responses[0]) == [("/dev/null", "/dev/null", "rw")]


def test_allocate_refuses_two_nodes_on_one_container_path(kubelet, start_daemon):
    start_daemon(MEM_CONF + "container_path = /dev/the-device\n")
    kubelet.wait_live(MEM, devices=3)
    assert specs(kubelet.allocate(MEM, ["zero"]).container_responses[0]) == [("/dev/zero", "/dev/the-device", "rw")]
    code, details = rpc_error(kubelet.allocate, MEM, ["zero", "null"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "/dev/the-device" in details and "/dev/zero" in details and "/dev/null" in details


def test_allocate_refuses_unhealthy(kubelet, start_daemon):
    start_daemon(SICK_ZERO)
    kubelet.wait_live(MEM)
    kubelet.wait_for(lambda: kubelet.health(MEM) == {"full": "Healthy", "null": "Healthy", "zero": "Unhealthy"}, 10)
    assert kubelet.health(MEM) == {"full": "Healthy", "null": "Healthy", "zero": "Unhealthy"}
    assert (kubelet.capacity(MEM), kubelet.allocatable(MEM)) == (3, 2)

    for requests in ([["zero"]], [["null", "zero"]], [["null"], ["zero"]]):
        code, details = rpc_error(kubelet.allocate, MEM, *requests)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, requests
        assert "'zero'" in details and "health_command" in details and "'null'" not in details
    # Unknown wins over unhealthy: INVALID_ARGUMENT names the unknown one.
    code, details = rpc_error(kubelet.allocate, MEM, ["zero", "bogus"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'bogus'" in details
    # The healthy ones are given.
    [r] = kubelet.allocate(MEM, ["full", "null"]).container_responses
    assert [d.host_path for d in r.devices] == ["/dev/full", "/dev/null"]


def test_allocate_refuses_device_failing_health_rule(kubelet, start_daemon):
    # /dev/null is 1:3; the rule on its sysfs attribute fails for zero (1:5) and full (1:7).
    start_daemon(MEM_CONF + "health.attribute.dev = 1:3\n")
    kubelet.wait_live(MEM)
    assert kubelet.health(MEM) == {"full": "Unhealthy", "null": "Healthy", "zero": "Unhealthy"}
    code, details = rpc_error(kubelet.allocate, MEM, ["full"])
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'full'" in details and "dev" in details
    assert kubelet.allocate(MEM, ["null"]).container_responses[0].devices[0].host_path == "/dev/null"


def test_preferred_allocation(kubelet, start_daemon):
    start_daemon(LOOP_CONF)
    kubelet.wait_live(LOOP, devices=8)
    available = ["loop7", "loop3", "loop0", "loop5", "loop1", "loop6"]

    def check(available, must, size):
        chosen = kubelet.preferred(LOOP, available, must, size)
        assert len(chosen) == min(size, len(set(available))), chosen
        assert len(set(chosen)) == len(chosen)
        assert set(chosen) <= set(available)
        kept = [m for m in must if m in available][:size]
        assert chosen[:len(kept)] == kept
        return chosen

    # No NUMA here: must_include first, then natural order; the same answer for any order of available.
    assert check(available, ["loop5"], 3) == ["loop5", "loop0", "loop1"]
    rng = random.Random(2)
    for _ in range(5):
        shuffled = available[:]
        rng.shuffle(shuffled)
        assert check(shuffled, ["loop5"], 3) == ["loop5", "loop0", "loop1"]
    assert check(available, [], 2) == ["loop0", "loop1"]
    assert check(available, ["loop6", "loop7"], 2) == ["loop6", "loop7"]
    # must_include outside available is not offered; asking for more than there is gives what there is.
    assert check(available, ["loop2"], 2) == ["loop0", "loop1"]
    assert sorted(check(available, [], 10)) == sorted(available)
    assert check(LOOP_IDS, [], 8) == LOOP_IDS
    assert kubelet.preferred(LOOP, available, [], 0) == []

    # Several container requests get one answer each.
    req = api.PreferredAllocationRequest(container_requests=[
        api.ContainerPreferredAllocationRequest(available_deviceIDs=available, allocation_size=1),
        api.ContainerPreferredAllocationRequest(available_deviceIDs=["loop4"], allocation_size=1)])
    response = kubelet.client(LOOP).stub.GetPreferredAllocation(req, timeout=10)
    assert [list(r.deviceIDs) for r in response.container_responses] == [["loop0"], ["loop4"]]


PRESTART_SCRIPT = """\
ids=$(echo "$@" | tr ' ' ,)
nodes=$(for i in "$@"; do printf '/dev/%s,' "$i"; done)
[ "$ids" = "$UDP_DEVICE_IDS" ] || { echo "arguments $ids but UDP_DEVICE_IDS=$UDP_DEVICE_IDS"; exit 4; }
[ "${nodes%,}" = "$UDP_DEVNODES" ] || { echo "UDP_DEVNODES=$UDP_DEVNODES"; exit 5; }
[ "$UDP_RESOURCE" = example.com/pre ] || { echo "UDP_RESOURCE=$UDP_RESOURCE"; exit 6; }
case ",$ids," in
  *,zero,*) echo "zero is not ready"; exit 3;;
  *,full,*) echo $$ > @PIDFILE@; exec sleep 30;;
esac
"""


@pytest.fixture
def prestart_config(tmp_path):
    script = tmp_path / "prestart.sh"
    script.write_text(PRESTART_SCRIPT.replace("@PIDFILE@", str(tmp_path / "sleeping.pid")))
    return MEM_CONF + f"""\
[resource example.com/pre]
subsystem = mem
kernel = null zero full
prestart_command = /bin/sh {script}
prestart_timeout = 0.5
"""


def test_prestart(kubelet, start_daemon, prestart_config, tmp_path):
    start_daemon(prestart_config)
    kubelet.wait_live(MEM, devices=3)
    kubelet.wait_live("example.com/pre", devices=3)

    # pre_start_required only where prestart_command is configured: in Register, and when asked.
    options = {r.resource_name: r.options.pre_start_required for r in kubelet.requests}
    assert options == {MEM: False, "example.com/pre": True}
    assert kubelet.client("example.com/pre").options.pre_start_required
    assert not kubelet.client(MEM).options.pre_start_required

    kubelet.prestart("example.com/pre", ["null"])
    code, details = rpc_error(kubelet.prestart, "example.com/pre", ["null", "zero"])
    assert code == grpc.StatusCode.INTERNAL
    assert "exit status 3" in details and "zero is not ready" in details
    code, details = rpc_error(kubelet.prestart, "example.com/pre", ["full"])
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish within 0.5 s" in details
    # The timed-out command's process group was killed: no sleep left behind.
    pid = int((tmp_path / "sleeping.pid").read_text())
    wait_until(lambda: process_gone(pid), 5, "the timed-out prestart command to be killed")
    # Unknown IDs are refused before anything runs; a resource without prestart_command just says yes.
    code, details = rpc_error(kubelet.prestart, "example.com/pre", ["bogus"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'bogus'" in details
    kubelet.prestart(MEM, ["zero"])
    kubelet.prestart("example.com/pre", ["null"])


def test_bad_requests_get_clear_errors_and_the_daemon_keeps_serving(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(MEM_CONF)
    kubelet.wait_live(MEM, devices=3)
    path = os.path.join(kubelet_dir, kubelet.endpoints(MEM)[-1])

    with PluginClient(path) as client:
        code, details = rpc_error(client.stub.Allocate, api.AllocateRequest(), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "without container requests" in details
        code, details = rpc_error(client.stub.PreStartContainer,
                                  api.PreStartContainerRequest(devices_ids=["nope", "null"]), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in details and "'null'" not in details
        # No container requests: an empty answer.
        assert not client.stub.GetPreferredAllocation(api.PreferredAllocationRequest(),
                                                      timeout=10).container_responses
        # Bytes that are no protobuf message, and a method that does not exist.
        code, _ = rpc_error(client.raw, "Allocate", b"\xff\xff\xff\xff")
        assert code != grpc.StatusCode.OK
        code, _ = rpc_error(client.raw, "NoSuchMethod", b"")
        assert code == grpc.StatusCode.UNIMPLEMENTED
        # A client that speaks no HTTP/2 at all.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(256))
        # Many streams opened and dropped.
        for _ in range(20):
            stream = client.stub.ListAndWatch(api.Empty(), timeout=10)
            assert len(next(stream).devices) == 3
            stream.cancel()

        assert client.stub.Allocate(api.AllocateRequest(container_requests=[
            api.ContainerAllocateRequest(devices_ids=["zero"])]), timeout=10).container_responses[0].devices
    assert daemon.proc.poll() is None
    assert kubelet.connected(MEM) and kubelet.allocatable(MEM) == 3
    assert len(kubelet.requests) == 1
    # gRPC itself logs the undecodable request with a traceback of its own; none comes from our code.
    assert "udev_device_plugin/" not in daemon.log()
