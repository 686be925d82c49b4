"""hotplug.attach_removes_only: the classic BPF program the kernel's uevent socket gets (a wake-up per
kernel uevent of every subsystem otherwise), run by the real kernel on a socket pair (no root needed)."""

from __future__ import annotations

import socket

from udev_device_plugin import hotplug


def test_the_kernel_sockets_filter_passes_removes_only():
    """The BPF program the kernel uevent socket gets, on a real socket: only "remove@..." messages arrive."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        hotplug.attach_removes_only(b)
        for message in (b"add@/devices/virtual/block/loop7\0ACTION=add",
                        b"remove@/devices/virtual/block/loop7\0A=1",
                        b"change@/devices/x\0", b"remove/devices/x", b"removes@x", b"rem", b"",
                        b"remove@/devices/pci0000:00/0000:00:01.0\0ACTION=remove"):
            a.send(message)
        b.setblocking(False)
        got = []
        while True:
            try:
                got.append(b.recv(4096))
            except BlockingIOError:
                break
    assert got == [b"remove@/devices/virtual/block/loop7\0A=1",
                   b"remove@/devices/pci0000:00/0000:00:01.0\0ACTION=remove"]
