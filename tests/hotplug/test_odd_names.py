"""A real device with a name that is not UTF-8, made while the daemon runs, through a real udevd (issue 10,
finding 5, the hotplug path): the event is skipped with a warning naming the path escaped, never a crash,
and the daemon goes on serving and following hotplug."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.conftest import wait_until

NET_CONF = """
[resource example.com/net]
subsystem = net
kernel = udp*
"""


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True)


@pytest.fixture
def odd_link(udevd):
    """A kernel net device named b'udp\\xff' + a random suffix (ifb: no hardware, no traffic)."""
    if ip("-V").returncode != 0:
        pytest.fail("this test needs iproute2's ip (Debian package iproute2)", pytrace=False)
    suffix = uuid.uuid4().hex[:4]
    raw = b"udp\xff" + suffix.encode()
    good = f"udpgood{suffix}"
    names = [raw, good.encode()]
    try:
        yield raw, good
    finally:
        for name in names:
            subprocess.run([b"ip", b"link", b"del", name], capture_output=True)
        # udevd may have renamed the odd one (to udp_<suffix>): remove what is left of ours.
        for name in (f"udp_{suffix}".encode(), f"udp\\xff{suffix}".encode()):
            subprocess.run([b"ip", b"link", b"del", name], capture_output=True)


def test_a_device_named_with_non_utf8_bytes_while_serving(odd_link, start_daemon, kubelet):
    raw, good = odd_link
    daemon = start_daemon("[plugin]\nlog_level = debug\n" + NET_CONF)
    wait_until(lambda: "example.com/net" in kubelet.devices, what="the net resource registered")
    made = subprocess.run([b"ip", b"link", b"add", b"name", raw, b"type", b"ifb"], capture_output=True)
    if made.returncode != 0:
        pytest.fail(f"cannot create a net device here: {made.stderr.decode(errors='replace')}", pytrace=False)
    assert subprocess.run(["ip", "link", "add", "name", good, "type", "ifb"], capture_output=True).returncode == 0
    # The good one after the odd one is still seen: the daemon survived the odd events and follows hotplug.
    wait_until(lambda: good in kubelet.devices.get("example.com/net", {}), timeout=20, what=f"{good} advertised")
    # udevd renames such an interface (to udp_<suffix>) and announces the rename, in its own time (the
    # good one may come first); whichever of the odd name and the new one reached the daemon, it is
    # handled: skipped with a warning naming the path escaped, or advertised under its new name.
    suffix = raw[4:].decode()
    wait_until(lambda: "\\xff" in daemon.log() or f"udp_{suffix}" in kubelet.devices["example.com/net"],
               timeout=20, what=f"the odd device skipped with a warning or advertised as udp_{suffix}")
    log = daemon.log()
    assert daemon.proc.poll() is None and "Traceback" not in log, log[-2000:]
