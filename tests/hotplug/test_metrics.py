"""udev_device_plugin_hotplug_latency_seconds with a real udevd: one observation per device list that a
hotplug event changed, none for an event that changes nothing, within the time the kubelet saw it take."""

from __future__ import annotations

from typing import List

from tests.conftest import wait_until
from tests.e2e.test_metrics import scrape, url, value, wait_value

from . import realudev
from .test_loop import listing, wait_message, without

RES = realudev.LOOP_RESOURCE
COUNT = "udev_device_plugin_hotplug_latency_seconds_count"
SUM = "udev_device_plugin_hotplug_latency_seconds_sum"


def test_hotplug_latency_is_observed_per_hotplug_driven_list(start_daemon, kubelet, loops, say):
    config = realudev.LOOP_CONFIG.format(log_level="info", events="stderr").replace(
        "[plugin]\n", "[plugin]\nmetrics_address = 127.0.0.1:0\n")
    daemon = start_daemon(config)
    wait_until(lambda: kubelet.messages.get(RES, 0) >= 1 or daemon.proc.poll() is not None, 20,
               "the daemon's first ListAndWatch message")
    assert daemon.proc.poll() is None, daemon.log()
    target = url(daemon)
    samples = scrape(target)
    assert value(samples, COUNT, resource=RES) == 0
    updates = value(samples, "udev_device_plugin_device_list_updates_total", resource=RES)

    outside: List[float] = []  # ioctl -> the kubelet has the list, as the test sees it
    for number in range(150, 155):
        seq = kubelet.messages[RES]
        start = loops.add(number)
        msg = wait_message(kubelet, seq, listing(f"loop{number}"), f"loop{number} added")
        outside.append(msg.monotonic - start)
    samples = wait_value(target, COUNT, 5, resource=RES)
    inside = value(samples, SUM, resource=RES)
    assert value(samples, "udev_device_plugin_devices", resource=RES, health="Healthy") == 5
    assert value(samples, "udev_device_plugin_device_list_updates_total", resource=RES) == updates + 5
    # What the daemon measures (reading the event -> publishing) lies within what the kubelet saw.
    assert 0 < inside <= sum(outside), (inside, outside)
    say(f"5 adds: daemon-side mean {inside / 5 * 1e3:.2f} ms, ioctl -> kubelet mean {sum(outside) / 5 * 1e3:.2f} ms")

    # A change event that changes nothing is not a push, so not an observation: the next add is the sixth.
    realudev.trigger_change("loop150")
    seq = kubelet.messages[RES]
    loops.add(155)
    wait_message(kubelet, seq, listing("loop155"), "loop155 added")
    samples = wait_value(target, COUNT, 6, resource=RES)
    buckets = [v for (name, labels), v in samples.items()
               if name == "udev_device_plugin_hotplug_latency_seconds_bucket" and ("resource", RES) in labels]
    assert max(buckets) == 6

    # Removals: the device node's deletion (inotify) or udev's event, whichever is read first, starts the
    # clock of the list that drops the device.
    for number in range(150, 156):
        seq = kubelet.messages[RES]
        loops.remove(number)
        wait_message(kubelet, seq, without(f"loop{number}"), f"loop{number} removed")
    samples = wait_value(target, "udev_device_plugin_devices", 0, resource=RES, health="Healthy")
    # Each removal is one or two lists (the node's deletion may first make the device unhealthy, then udev's
    # remove event drops it), every one of them observed.
    observed = value(samples, COUNT, resource=RES)
    assert value(samples, "udev_device_plugin_device_list_updates_total", resource=RES) - updates == observed
    assert 12 <= observed <= 18
    say(f"6 removals: {observed - 6:.0f} lists")
    assert daemon.proc.poll() is None
