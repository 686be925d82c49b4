"""Requests from a hostile or broken client over the real socket (issue 10, finding 7): huge IDs are quoted
truncated in the error and the log, a run of thousands of digits sorts, PreStart refuses like Allocate."""

from __future__ import annotations

import os

import grpc
import pytest

from udev_device_plugin import api

from .helpers import MEM, MEM_CONF, our_sockets, wait_log

HUGE = "x" * 3_900_000  # under grpc's 4 MiB message limit, with the rest of the request


@pytest.fixture
def stub(kubelet, start_daemon, kubelet_dir):
    daemon = start_daemon(MEM_CONF + "prestart_command = /bin/true\n")
    kubelet.wait_live(MEM, devices=3)
    channel = grpc.insecure_channel("unix:" + os.path.join(kubelet_dir, our_sockets(kubelet_dir)[0]),
                                    options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])
    try:
        yield api.Stub(channel), daemon
    finally:
        channel.close()


def test_a_huge_unknown_id_is_refused_with_a_short_message(stub):
    s, daemon = stub
    for call, request in ((s.Allocate, api.AllocateRequest(container_requests=[
                               api.ContainerAllocateRequest(devices_ids=[HUGE, "null"])])),
                          (s.PreStartContainer, api.PreStartContainerRequest(devices_ids=[HUGE]))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details()
        assert len(details) < 1000 and "3900000 characters" in details, details[:300]
    wait_log(daemon, "3900000 characters")
    assert len(daemon.log()) < 100_000, "the huge ID reached the log whole"


def test_a_long_run_of_digits_sorts(stub):
    s, _ = stub
    digits = "9" * 5000
    request = api.PreferredAllocationRequest(container_requests=[api.ContainerPreferredAllocationRequest(
        available_deviceIDs=[f"a{digits}", f"a{digits}1", "null"], allocation_size=2)])
    answer = s.GetPreferredAllocation(request, timeout=30)
    assert list(answer.container_responses[0].deviceIDs)[0] == "null"


def test_garbage_bytes_are_invalid_argument(stub, kubelet_dir):
    _, _ = stub
    channel = grpc.insecure_channel("unix:" + os.path.join(kubelet_dir, our_sockets(kubelet_dir)[0]))
    try:
        for path in ("/v1beta1.DevicePlugin/Allocate", "/v1beta1.DevicePlugin/GetPreferredAllocation"):
            raw = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff\xff\x0f", timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
    finally:
        channel.close()
