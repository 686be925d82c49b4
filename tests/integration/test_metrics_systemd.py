"""Metrics under the real unit: its sandbox refuses IP sockets, which the daemon reports (journal, STATUS=)
while serving its devices; the drop-in udev-device-plugin(8) gives makes /metrics answer."""

from __future__ import annotations

from .container import wait_for
from .log import say
from .test_systemd import MEM_CONF, RESOURCE, TEST_CONF, UNIT, Node, node  # noqa: F401 - node: the fixture

PORT = 9943
SCRAPE = (f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{PORT}/metrics', timeout=10)"
          ".read().decode())")


def test_metrics_need_the_documented_dropin(node: Node) -> None:  # noqa: F811 - the fixture
    node.ct.write_file(TEST_CONF, f"[plugin]\nmetrics_address = 127.0.0.1:{PORT}\n\n" + MEM_CONF)
    node.start_daemon()
    # The registration may be recorded before its stream's first list: wait for the devices.
    wait_for(lambda: "null" in node.devices(), 10, "the devices served under the shipped sandbox")
    refused = f"cannot listen on 127.0.0.1:{PORT}: Address family not supported by protocol"
    node.wait_message(refused)
    wait_for(lambda: f"metrics: {refused}" in node.prop("StatusText"), 10, "STATUS= naming the metrics problem")
    assert node.active() and node.n_restarts() == 0
    say(f"shipped sandbox: devices served, STATUS={node.prop('StatusText')!r}")

    node.add_dropin("metrics", "[Service]\nRestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6\n")
    node.ct.systemctl("restart", UNIT)
    node.wait_registered("after the metrics drop-in")
    node.wait_message(f"metrics: serving http://127.0.0.1:{PORT}/metrics")
    text = node.ct.run("python3", "-c", SCRAPE).stdout
    assert f'udev_device_plugin_devices{{health="Healthy",resource="{RESOURCE}"}} 2.0' in text, text
    assert f'udev_device_plugin_registration_state{{resource="{RESOURCE}",state="registered"}} 1.0' in text
    assert "metrics:" not in node.prop("StatusText")
    say(f"with the drop-in: /metrics answers ({len(text)} bytes), STATUS={node.prop('StatusText')!r}")
