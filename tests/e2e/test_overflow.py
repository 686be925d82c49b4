"""Lost udev events (the netlink buffer overflowed) make the daemon rescan every resource.

The kernel drops uevents only when the daemon's 32 MiB receive buffer is full, which no test here
can provoke for real; so this one test runs the daemon in-process with a monitor that reports the
overflow the way hotplug.HotplugMonitor does (raising Overflow from drain()), and everything else real:
pyudev enumeration of this machine's devices, the gRPC servers, the stand-in kubelet.
"""

from __future__ import annotations

import os
import threading
from typing import List

import pytest

from udev_device_plugin import daemon as daemon_module
from udev_device_plugin import discovery
from udev_device_plugin.hotplug import Overflow, UdevEvent

from ..conftest import wait_until
from .helpers import LOOP, LOOP_CONF, MEM, MEM_CONF


class OverflowingMonitor:
    """Readable on demand; its next drain() reports lost events."""

    def __init__(self, context: object) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)  # as the netlink socket: the daemon drains it whenever a node changes too
        self.overflow = False

    def fileno(self) -> int:
        return self._r

    def filenos(self) -> List[int]:
        return [self._r]

    def lose_events(self) -> None:
        self.overflow = True
        os.write(self._w, b"x")

    def drain(self) -> List[UdevEvent]:
        try:
            os.read(self._r, 1)
        except BlockingIOError:
            return []
        if self.overflow:
            self.overflow = False
            raise Overflow("udev events were lost; 0 read after the overflow")
        return []

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
def config_path(tmp_path) -> str:
    path = tmp_path / "udev-device-plugin.conf"
    path.write_text(MEM_CONF + LOOP_CONF)
    return str(path)


def test_overflow_rescans_every_resource(kubelet, kubelet_dir, config_path, monkeypatch):
    monitors: List[OverflowingMonitor] = []

    def monitor_factory(context: object) -> OverflowingMonitor:
        monitors.append(OverflowingMonitor(context))
        return monitors[-1]

    scanned: List[List[str]] = []
    real_scan = discovery.scan

    def counting_scan(context, resources, *args, **kwargs):  # type: ignore[no-untyped-def]
        resources = list(resources)
        scanned.append(sorted(r.name for r in resources))
        return real_scan(context, resources, *args, **kwargs)

    monkeypatch.setattr(discovery, "scan", counting_scan)
    d = daemon_module.Daemon(config_path, kubelet_dir, monitor_factory=monitor_factory)
    outcome: List[object] = []

    def driver() -> None:
        """The test's steps, beside the daemon's loop (which owns the main thread, for its signals)."""
        try:
            wait_until(lambda: kubelet.connected(MEM) and kubelet.connected(LOOP), 10, "both resources registered")
            before = len(scanned)
            monitors[0].lose_events()
            wait_until(lambda: len(scanned) > before, 10, "a rescan after the overflow")
            outcome.append(scanned[before])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
            outcome.append(exc)
        finally:
            d.request_stop()

    steps = threading.Thread(target=driver, name="test-driver")
    steps.start()
    try:
        assert d.run() == 0
    finally:
        steps.join(30)
        for m in monitors:
            m.close()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    assert outcome == [sorted([MEM, LOOP])], "the rescan after an overflow covers every resource"
