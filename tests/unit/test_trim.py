"""The daemon gives freed heap back to the system after a big change: once, TRIM_DELAY later, and only
after a change of TRIM_AFTER devices or more."""

from __future__ import annotations

import asyncio
import ctypes
import types

from udev_device_plugin import daemon
from udev_device_plugin.model import Device, ResourceDiff


def devices(n):
    return tuple(Device("example.com/r", f"d{i}", f"/sys/devices/virtual/misc/d{i}", f"d{i}", ()) for i in range(n))


async def until(condition, deadline):
    end = asyncio.get_running_loop().time() + deadline
    while not condition():
        assert asyncio.get_running_loop().time() < end, "not within the deadline"
        await asyncio.sleep(0.01)


def test_trim_heap_calls_glibcs_malloc_trim():
    assert daemon.trim_heap() is True  # these machines run glibc, as RHEL does


def test_trim_heap_without_malloc_trim(monkeypatch):
    class NoTrim:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoTrim)  # a C library without malloc_trim (musl)
    assert daemon.trim_heap() is False


def test_a_big_change_trims_the_heap_once_later(monkeypatch):
    loop = asyncio.new_event_loop()
    trimmed = []
    monkeypatch.setattr(daemon, "trim_heap", lambda: trimmed.append(loop.time()) or True)
    d = types.SimpleNamespace(loop=loop, _trim=None)
    d._trimmed = lambda: daemon.Daemon._trimmed(d)
    try:
        small = {"r": ResourceDiff(added=devices(daemon.TRIM_AFTER - 1))}
        daemon.Daemon._trim_later(d, small)
        assert d._trim is None
        half = devices(daemon.TRIM_AFTER // 2)
        big = {"r": ResourceDiff(added=half), "s": ResourceDiff(removed=half)}  # counted over the resources
        daemon.Daemon._trim_later(d, big)
        first = d._trim
        assert first is not None and abs(first.when() - loop.time() - daemon.TRIM_DELAY) < 0.5
        daemon.Daemon._trim_later(d, big)  # one pending trim at a time
        assert d._trim is first
        loop.run_until_complete(until(lambda: trimmed, 10))
        assert len(trimmed) == 1 and d._trim is None
        daemon.Daemon._trim_later(d, big)  # and the next big change trims again
        assert d._trim is not None and d._trim is not first
    finally:
        loop.close()
