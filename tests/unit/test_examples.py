"""Every config example the documents show passes ``udev-device-plugin check-config`` (the real command),
read from the documents themselves (tests/unit/examples.py), so that none can drift into one a reader
copies and the daemon refuses."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from . import examples

EXAMPLES = examples.all_examples()


def test_every_document_has_examples():
    names = [name for name, _ in EXAMPLES]
    for document in (examples.MAN_PAGE, "README.md", "ansible/roles/udev_device_plugin/README.md"):
        assert any(n.startswith(document) for n in names), f"no example found in {document}: {names}"


@pytest.mark.parametrize("name, text", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_example_passes_check_config(name, text, tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    path = etc / "udev-device-plugin.conf"
    path.write_text(text)
    os.chmod(path, 0o644)
    env = dict(os.environ, PYTHONPATH=os.path.join(examples.ROOT, "src"))
    done = subprocess.run([sys.executable, "-m", "udev_device_plugin", "check-config", "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"{name} is refused by check-config:\n{done.stderr}\n--- the example:\n{text}"
    resources = len(re.findall(r"^\[resource ", text, re.M))
    assert f"configuration valid: {resources} resource(s)" in done.stdout, done.stdout


def test_the_man_page_fpga_example_selects_what_a_pci_device_has():
    """The flagship example once used attribute.serial (PCI devices have none) and expected the VFIO group
    node as a child; tests/hotplug/test_umockdev.py matches it against a mock PCI card."""
    fpga = examples.sections(examples.man_section("example.com/fpga"))["resource example.com/fpga"]
    assert fpga["subsystem"] == "pci"
    assert fpga["id"] in ("sys_name", "property.PCI_SLOT_NAME")
    assert fpga["vfio_group_devnode"] == "yes" and fpga["driver"] == "vfio-pci"
    assert "/dev/vfio/vfio" in fpga["extra_devnodes"].split()
    assert {"attribute.vendor", "attribute.device"} <= set(fpga)


@pytest.mark.parametrize("text, expected", [
    ("a \\- b", "a - b"), ("\\e1", "\\1"), ("it\\(aqs", "it's"), ("\\&.", "."),
])
def test_unroff(text, expected):
    assert examples.unroff(text) == expected


def test_unroff_refuses_unknown_escapes():
    with pytest.raises(ValueError, match="unknown roff escape"):
        examples.unroff("\\fBbold\\fR")
