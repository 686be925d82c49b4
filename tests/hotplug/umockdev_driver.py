"""Owns a umockdev testbed and changes it on command; run with Debian's python3 under umockdev-wrapper:

    umockdev-wrapper /usr/bin/python3 umockdev_driver.py

It needs only the standard library and PyGObject with UMockdev's typelib (apt: python3-gi
gir1.2-umockdev-1.0), so the project's venvs need no compiled PyGObject.  It prints one JSON
line ``{"dir": UMOCKDEV_DIR}``, then answers each JSON command line on stdin with one JSON line:
``{"ok": result}`` or ``{"error": text}``.  End of input (or ``{"op": "quit"}``) removes the testbed.

Commands (``path`` is a mock syspath such as /sys/devices/pci0000:00/0000:3b:00.0):
  add        subsystem, name, parent (path or null), attributes {}, properties {}, node (/dev path or null)
             -> the new device's path; the testbed emits ``add``.  ``node`` is created first.
  add_many   count, vendor, device: PCI devices with an accel child each, NUMA nodes alternating -> count
  set        path, name, value: write a sysfs attribute (no event)
  uevent     path, action: emit an event
  remove     path: ``remove`` event, then the device and its node go
  node       node, present (bool): create or delete a device node without any event
  bind       path, driver: the device's driver link appears, then ``bind``
  unbind     path: the driver link goes, then ``unbind``
  add_raw    subsystem, name, parent, attributes {}, properties {}: as add, but every string is bytes
             written as latin-1 text ("\u00ff" is the byte 0xff), so that names, attributes and
             properties may be what no UTF-8 decoder takes; no event -> the path, latin-1 again
  iommu_group path, group: the device's iommu_group link to /sys/kernel/iommu_groups/<group>
"""

import json
import os
import sys

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402


def flat(mapping):
    out = []
    for key, value in (mapping or {}).items():
        out.extend([key, str(value)])
    return out


class Driver:
    def __init__(self):
        if "libumockdev-preload" not in os.environ.get("LD_PRELOAD", ""):
            raise SystemExit("umockdev_driver.py must run under umockdev-wrapper (the testbed needs the preload)")
        self.testbed = UMockdev.Testbed.new()
        self.dir = GLib.getenv("UMOCKDEV_DIR")
        self.nodes = {}  # device path -> its node
        self.raw_count = 0

    def node_file(self, node):
        if not node.startswith("/dev/") or ".." in node.split("/"):
            raise ValueError(f"not a /dev path: {node!r}")
        return os.path.join(self.dir, node[1:])

    def do_node(self, node, present):
        path = self.node_file(node)
        if present:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w"):
                pass
        elif os.path.exists(path):
            os.unlink(path)
        return node

    def do_add(self, subsystem, name, parent=None, attributes=None, properties=None, node=None):
        props = dict(properties or {})
        if node:
            # Before the device: its add event must find the node in place, as udev's would.
            self.do_node(node, True)
            props.setdefault("DEVNAME", node)
        path = self.testbed.add_device(subsystem, name, parent, flat(attributes), flat(props))
        if not path:
            raise RuntimeError(f"umockdev refused to add {subsystem} {name} under {parent}")
        if node:
            self.nodes[path] = node
        return path

    def do_add_many(self, count, vendor="0x8086", device="0x0b5b"):
        for i in range(count):
            pci = self.do_add("pci", f"0000:{0x40 + i // 32:02x}:{i % 32:02x}.0", None,
                              {"vendor": vendor, "device": device, "numa_node": i % 2, "enable": 1},
                              {"PCI_ID": f"{vendor[2:]}:{device[2:]}".upper()})
            self.do_add("accel", f"accel{i}", pci, {"dev": f"261:{i}"}, {"MAJOR": 261, "MINOR": i},
                        f"/dev/accel/accel{i}")
        return count

    def do_set(self, path, name, value):
        self.testbed.set_attribute(path, name, str(value))
        return path

    def do_uevent(self, path, action):
        self.testbed.uevent(path, action)
        return path

    def do_add_raw(self, subsystem, name, parent=None, attributes=None, properties=None):
        # umockdev's API takes only UTF-8 strings: add under a placeholder name, then give the
        # device its real bytes in the testbed directory (its links, uevent and attribute files).
        raw = name.encode("latin-1")
        self.raw_count += 1
        placeholder = f"rawdev{self.raw_count}"
        path = self.testbed.add_device(subsystem, placeholder, parent, [], [])
        if not path:
            raise RuntimeError(f"umockdev refused to add {subsystem} under {parent}")
        root = os.fsencode(self.dir)
        old = root + os.fsencode(path)
        new = old[:-len(placeholder)] + raw
        os.rename(old, new)
        for directory in (b"/sys/class/" + subsystem.encode(), b"/sys/bus/" + subsystem.encode() + b"/devices"):
            link = root + directory + b"/" + placeholder.encode()
            if os.path.islink(link):
                target = os.readlink(link)
                os.unlink(link)
                os.symlink(target[:-len(placeholder)] + raw, root + directory + b"/" + raw)
        with open(new + b"/uevent", "wb") as f:
            for key, value in (properties or {}).items():
                f.write(key.encode("latin-1") + b"=" + str(value).encode("latin-1") + b"\n")
        for key, value in (attributes or {}).items():
            with open(new + b"/" + key.encode("latin-1"), "wb") as f:
                f.write(str(value).encode("latin-1") + b"\n")
        return (new[len(root):]).decode("latin-1")

    def do_iommu_group(self, path, group):
        groups = os.path.join(self.dir, "sys", "kernel", "iommu_groups", str(group), "devices")
        os.makedirs(groups, exist_ok=True)
        link = os.path.join(self.dir, path.lstrip("/"), "iommu_group")
        os.symlink(os.path.relpath(os.path.dirname(groups), os.path.dirname(link)), link)
        return path

    def do_bind(self, path, driver):
        subsystem = os.path.basename(os.readlink(os.path.join(self.dir, path.lstrip("/"), "subsystem")))
        drivers = os.path.join(self.dir, "sys", "bus", subsystem, "drivers", driver)
        os.makedirs(drivers, exist_ok=True)
        link = os.path.join(self.dir, path.lstrip("/"), "driver")
        os.symlink(os.path.relpath(drivers, os.path.dirname(link)), link)
        self.testbed.uevent(path, "bind")
        return path

    def do_unbind(self, path):
        os.unlink(os.path.join(self.dir, path.lstrip("/"), "driver"))
        self.testbed.uevent(path, "unbind")
        return path

    def do_remove(self, path):
        # As the kernel's device_del(): children first; each leaves its bus and class first, so an
        # enumeration no longer finds it, then its remove uevent goes out, then sysfs forgets it.
        root = os.path.join(self.dir, path.lstrip("/"))
        found = [d for d, _, files in os.walk(root) if "uevent" in files]
        for device_dir in sorted(found, key=lambda d: d.count("/"), reverse=True):
            name = os.path.basename(device_dir)
            subsystem = os.path.basename(os.readlink(os.path.join(device_dir, "subsystem")))
            for link in (f"sys/bus/{subsystem}/devices/{name}", f"sys/class/{subsystem}/{name}"):
                if os.path.islink(os.path.join(self.dir, link)):
                    os.unlink(os.path.join(self.dir, link))
            self.testbed.uevent("/" + os.path.relpath(device_dir, self.dir), "remove")
        self.testbed.remove_device(path)
        for dev in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
            self.do_node(self.nodes.pop(dev), False)
        return path


def main():
    driver = Driver()
    print(json.dumps({"dir": driver.dir}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            answer = {"ok": getattr(driver, f"do_{op}")(**command)}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
            answer = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
