"""cdi.py and cdidir.py: CDI device names, the spec's content (judged by CDI 0.5.0's rules, cdirules.py),
how config maps onto it, the file written atomically through a directory descriptor (mode, symlinks,
what is removed), the check check-config makes, and the keeper that follows devices and retries."""

from __future__ import annotations

import json
import logging
import os
import stat
from typing import Any, Callable, Dict, List, Tuple

import pytest

from udev_device_plugin import cdi, cdidir, config
from udev_device_plugin.model import HEALTHY, UNHEALTHY, Device
from udev_device_plugin.servicer import ResourceState

from . import cdirules

RESOURCE = "example.com/serial"


def res(lines: str = "", name: str = RESOURCE) -> config.ResourceConfig:
    return config.parse([("t.conf", f"[resource {name}]\nsubsystem = tty\ncdi = yes\n{lines}")]).resources[0]


def dev(id_: str, *nodes: str, health: str = HEALTHY, sys_name: str = "") -> Device:
    return Device(RESOURCE, id_, f"/sys/devices/x/{id_}", sys_name or id_, tuple(nodes), (), health)


def table(*devices: Device) -> Dict[str, Device]:
    return {d.id: d for d in devices}


def build(r: config.ResourceConfig, devices: Dict[str, Device], replicas: int = 1) -> cdi.Spec:
    from udev_device_plugin import sharing

    return cdi.SpecBuilder().build(r, devices, sharing.Encoder().advertise(devices, replicas).ids_of)


def spec_json(spec: cdi.Spec) -> Dict[str, Any]:
    assert spec.text is not None
    assert cdirules.problems(spec.text) == []
    return json.loads(spec.text)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("advertised_id", ["loop0", "0000:3b:00.0", "fuse::3", "A10KX3F2", "a", "x_y-z.1"])
def test_ids_cdi_takes_are_the_names(advertised_id):
    assert cdi.device_name(advertised_id) == advertised_id


@pytest.mark.parametrize("advertised_id", ["SN+12", "user@host", "a=b,c", "trailing-", "trailing.", "ends:",
                                           "SN+12::0", "é"])
def test_other_ids_get_a_name_cdi_takes_and_stays_distinct(advertised_id):
    name = cdi.device_name(advertised_id)
    assert cdirules._DEVICE.match(name), name
    assert name != cdi.device_name(advertised_id + "x")
    assert cdi.device_name(advertised_id) == name  # deterministic


def test_escaped_names_keep_distinct_ids_apart():
    assert cdi.device_name("SN+12") != cdi.device_name("SN=12") != cdi.device_name("SN_12")
    assert cdi.device_name("SN+12").startswith("SN_12-")


# --- the spec ---------------------------------------------------------------------------------------


def test_spec_content():
    r = res("container_path = /dev/serial/{id}\npermissions = rwm\nextra_devnodes = /dev/ctl\n"
            "env =\n  FIXED=1\n  WHO={resource}\n  IDS={ids}\n"
            "mounts =\n  /opt/fw:/opt/fw:ro\n  /var/lib/{resource}:/data\n  /run/{ids}:/run/x\n"
            "annotations = example.com/a=b")
    spec = build(r, table(dev("A1", "/dev/ttyUSB0"), dev("B2", "/dev/ttyUSB1", health=UNHEALTHY), dev("bare")))
    got = spec_json(spec)
    assert got["cdiVersion"] == "0.5.0" and got["kind"] == RESOURCE
    # One CDI device per advertised ID with nodes (unhealthy ones too: health changes leave the spec alone).
    assert got["devices"] == [
        {"name": "A1", "containerEdits": {"deviceNodes": [
            {"path": "/dev/serial/A1", "hostPath": "/dev/ttyUSB0", "permissions": "rwm"}]}},
        {"name": "B2", "containerEdits": {"deviceNodes": [
            {"path": "/dev/serial/B2", "hostPath": "/dev/ttyUSB1", "permissions": "rwm"}]}}]
    # The spec's own edits: shared nodes and the templates that are the same for every allocation.
    assert got["containerEdits"] == {
        "env": ["FIXED=1", f"WHO={RESOURCE}"],
        "deviceNodes": [{"path": "/dev/ctl", "hostPath": "/dev/ctl", "permissions": "rwm"}],
        "mounts": [{"hostPath": "/opt/fw", "containerPath": "/opt/fw", "type": "bind", "options": ["rbind", "ro"]},
                   {"hostPath": f"/var/lib/{RESOURCE}", "containerPath": "/data", "type": "bind",
                    "options": ["rbind", "rw"]}]}
    assert spec.names == {"A1": f"{RESOURCE}=A1", "B2": f"{RESOURCE}=B2"} and spec.problems == ()


def test_replicas_each_get_a_cdi_device():
    spec = build(res("replicas = 3"), table(dev("fuse", "/dev/fuse")), replicas=3)
    got = spec_json(spec)
    assert [d["name"] for d in got["devices"]] == ["fuse::0", "fuse::1", "fuse::2"]
    assert {json.dumps(d["containerEdits"]) for d in got["devices"]} == {
        json.dumps({"deviceNodes": [{"path": "/dev/fuse", "hostPath": "/dev/fuse", "permissions": "rw"}]})}
    assert spec.names == {f"fuse::{k}": f"{RESOURCE}=fuse::{k}" for k in range(3)}
    assert "containerEdits" not in got  # nothing shared: none written


def test_the_kind_is_cdi_kind():
    spec = build(res("cdi_kind = vendor.example/tty"), table(dev("A1", "/dev/ttyUSB0")))
    assert spec_json(spec)["kind"] == "vendor.example/tty" and spec.names == {"A1": "vendor.example/tty=A1"}


def test_no_device_with_nodes_no_spec():
    assert build(res(), table(dev("bare"))) == cdi.Spec(None, {}, ())
    assert build(res(), {}) == cdi.Spec(None, {}, ())


def test_ids_cdi_refuses_are_escaped_and_clashes_left_out():
    spec = build(res(), table(dev("SN+1", "/dev/a"), dev(cdi.device_name("SN+1"), "/dev/b")))
    got = spec_json(spec)
    assert [d["name"] for d in got["devices"]] == [cdi.device_name("SN+1")]
    assert spec.names == {"SN+1": f"{RESOURCE}={cdi.device_name('SN+1')}"}
    [problem] = spec.problems
    assert "already that of 'SN+1'" in problem and "left out" in problem


def test_ten_thousand_replica_ids():
    devices = table(*(dev(f"loop{i}", f"/dev/loop{i}") for i in range(100)))
    spec = build(res("replicas = 100"), devices, replicas=100)
    assert len(spec_json(spec)["devices"]) == 10_000 == len(spec.names)


def test_the_builder_reuses_devices_that_did_not_change():
    from udev_device_plugin import sharing

    builder = cdi.SpecBuilder()
    r = res()
    devices = table(dev("A1", "/dev/ttyUSB0"), dev("B2", "/dev/ttyUSB1"))
    first = builder.build(r, devices, sharing.Encoder().advertise(devices, 1).ids_of)
    kept = dict(builder._entries)
    sick = table(dev("A1", "/dev/ttyUSB0"), dev("B2", "/dev/ttyUSB1", health=UNHEALTHY))
    second = builder.build(r, sick, sharing.Encoder().advertise(sick, 1).ids_of)
    assert second.text == first.text  # health is not in the spec
    assert builder._entries["A1"] is kept["A1"] and builder._entries["B2"] is kept["B2"]
    moved = table(dev("A1", "/dev/ttyUSB0"), dev("B2", "/dev/ttyUSB9"))
    third = builder.build(r, moved, sharing.Encoder().advertise(moved, 1).ids_of)
    assert third.text != first.text and b"/dev/ttyUSB9" in (third.text or b"")
    assert builder._entries["A1"] is kept["A1"] and builder._entries["B2"] is not kept["B2"]


def test_the_rules_catch_what_consumers_refuse():
    """The rules the tests judge by are no rubber stamp."""
    good = {"cdiVersion": "0.5.0", "kind": "example.com/x",
            "devices": [{"name": "a", "containerEdits": {"deviceNodes": [{"path": "/dev/a"}]}}]}
    assert cdirules.problems(json.dumps(good).encode()) == []
    for bad in ({**good, "cdiVersion": "0.6.0"}, {**good, "kind": "example.com/x.y"}, {**good, "annotations": {}},
                {**good, "devices": []}, {**good, "devices": [{"name": "a", "containerEdits": {}}]},
                {**good, "devices": [{"name": "a:", "containerEdits": {"env": ["A=1"]}}]},
                {**good, "devices": [{"name": "a", "containerEdits": {"env": ["=1"]}}]}):
        assert cdirules.problems(json.dumps(bad).encode()), bad


# --- the directory -------------------------------------------------------------------------------------


def test_write_is_atomic_mode_0644_whatever_the_umask(tmp_path):
    directory = tmp_path / "cdi"
    old = os.umask(0o077)
    try:
        inode = cdidir.SpecDir(str(directory)).write("s.json", b"one")
        cdidir.SpecDir(str(directory)).write("s.json", b"two")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(directory / "s.json").st_mode) == 0o644
    assert (directory / "s.json").read_bytes() == b"two" and os.stat(directory / "s.json").st_ino != inode
    assert os.listdir(directory) == ["s.json"]  # no temporary file left


def test_a_symlink_at_the_file_name_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    directory = tmp_path / "cdi"
    directory.mkdir()
    (directory / "s.json").symlink_to(target)
    cdidir.SpecDir(str(directory)).write("s.json", b"spec")
    assert target.read_text() == "keep"
    assert not (directory / "s.json").is_symlink() and (directory / "s.json").read_bytes() == b"spec"


def test_a_symlinked_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "cdi").symlink_to(real)
    with pytest.raises(OSError) as info:
        cdidir.SpecDir(str(tmp_path / "cdi")).write("s.json", b"spec")
    assert "symbolic link" in cdidir._why(info.value, str(tmp_path / "cdi"))
    assert os.listdir(real) == []


def test_remove_only_a_regular_file_of_ours(tmp_path):
    d = cdidir.SpecDir(str(tmp_path))
    inode = d.write("s.json", b"spec")
    assert not d.remove("s.json", inode + 1) and (tmp_path / "s.json").exists()
    assert d.remove("s.json", inode) and not (tmp_path / "s.json").exists()
    (tmp_path / "s.json").symlink_to(tmp_path / "t")
    assert not d.remove("s.json") and (tmp_path / "s.json").is_symlink()
    (tmp_path / "dir.json").mkdir()
    assert not d.remove("dir.json")


def test_sweep_removes_only_our_leftovers(tmp_path):
    for name in ("udev-device-plugin-example.com_a.json", "udev-device-plugin-example.com_b.json",
                 ".udev-device-plugin-example.com_a.json.123.tmp", "nvidia.com-gpu.json", "udev-device-plugin-x.yaml"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "udev-device-plugin-dir.json").mkdir()
    cdidir.SpecDir(str(tmp_path)).sweep({"udev-device-plugin-example.com_b.json"})
    assert sorted(os.listdir(tmp_path)) == ["nvidia.com-gpu.json", "udev-device-plugin-dir.json",
                                           "udev-device-plugin-example.com_b.json", "udev-device-plugin-x.yaml"]


def test_check(tmp_path):
    assert cdidir.check(str(tmp_path)) is None
    assert cdidir.check(str(tmp_path / "new" / "cdi")) is None  # created when needed
    (tmp_path / "file").write_text("")
    assert "not a directory" in (cdidir.check(str(tmp_path / "file")) or "")
    assert "is a file" in (cdidir.check(str(tmp_path / "file" / "cdi")) or "")
    (tmp_path / "link").symlink_to(tmp_path)
    assert "symbolic link" in (cdidir.check(str(tmp_path / "link")) or "")


# --- the keeper -------------------------------------------------------------------------------------------


class Timers:
    """call_later as the daemon's loop gives it, run by hand."""

    def __init__(self) -> None:
        self.pending: List[Tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> Any:
        entry = (delay, fn)
        self.pending.append(entry)
        timers = self

        class Handle:
            def cancel(self) -> None:
                if entry in timers.pending:
                    timers.pending.remove(entry)

        return Handle()

    def run(self) -> float:
        delay, fn = self.pending.pop(0)
        fn()
        return delay


def state_with(r: config.ResourceConfig, devices: Dict[str, Device]) -> ResourceState:
    state = ResourceState(r)
    state.publish(devices)
    return state


def test_specs_follow_the_devices_and_go(tmp_path):
    timers = Timers()
    specs = cdidir.CdiSpecs(str(tmp_path / "cdi"), timers)
    state = state_with(res("replicas = 2"), table(dev("A1", "/dev/ttyUSB0")))
    specs.sync(state)
    path = tmp_path / "cdi" / "udev-device-plugin-example.com_serial.json"
    assert state.cdi is not None and state.cdi.problem == "" and state.cdi.path == str(path)
    assert state.cdi.names == {"A1::0": f"{RESOURCE}=A1::0", "A1::1": f"{RESOURCE}=A1::1"}
    assert cdirules.problems(path.read_bytes()) == []
    inode = os.stat(path).st_ino

    # A health change: nothing written.  A new device: written again.
    state.publish(table(dev("A1", "/dev/ttyUSB0", health=UNHEALTHY)))
    specs.sync(state)
    assert os.stat(path).st_ino == inode
    state.publish(table(dev("A1", "/dev/ttyUSB0"), dev("B2", "/dev/ttyUSB1")))
    specs.sync(state)
    assert os.stat(path).st_ino != inode and len(json.loads(path.read_bytes())["devices"]) == 4
    # No device with nodes left: no spec.
    state.publish(table(dev("bare")))
    specs.sync(state)
    assert not path.exists() and state.cdi.names == {}
    state.publish(table(dev("A1", "/dev/ttyUSB0")))
    specs.sync(state)
    assert path.exists()
    # CDI turned off on reload: the spec goes, Allocate names nothing.
    state.reconfigure(config.parse([("t.conf", f"[resource {RESOURCE}]\nsubsystem = tty\n")]).resources[0])
    specs.sync(state)
    assert not path.exists() and state.cdi is None
    # And stopping removes what is left.
    state.reconfigure(res())
    specs.sync(state)
    assert path.exists()
    specs.close()
    assert not path.exists() and timers.pending == []


def test_an_unwritable_directory_is_retried_and_allocate_knows(tmp_path, caplog):
    caplog.set_level(logging.INFO, "udev_device_plugin")
    blocker = tmp_path / "cdi"
    blocker.write_text("not a directory")
    timers = Timers()
    specs = cdidir.CdiSpecs(str(blocker), timers)
    state = state_with(res(), table(dev("A1", "/dev/ttyUSB0")))
    specs.sync(state)
    assert state.cdi is not None and state.cdi.names == {"A1": f"{RESOURCE}=A1"}
    assert "[plugin] cdi_spec_dir" in state.cdi.problem and str(blocker) in state.cdi.problem
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and RESOURCE in errors[0].getMessage() and "retrying" in errors[0].getMessage()
    # Retried with a doubling delay, logged once.
    assert timers.run() == 1.0 and timers.run() == 2.0
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
    blocker.unlink()
    assert timers.run() == 4.0
    assert state.cdi.problem == "" and (blocker / "udev-device-plugin-example.com_serial.json").exists()
    assert timers.pending == [] and "written at last" in caplog.text
    specs.close()


def test_a_new_directory_on_reload_moves_the_specs(tmp_path):
    specs = cdidir.CdiSpecs(str(tmp_path / "a"), Timers())
    state = state_with(res(), table(dev("A1", "/dev/ttyUSB0")))
    specs.sync(state)
    specs.set_directory(str(tmp_path / "b"), [state])
    assert os.listdir(tmp_path / "a") == []
    assert os.listdir(tmp_path / "b") == ["udev-device-plugin-example.com_serial.json"]
    assert state.cdi is not None and state.cdi.path.startswith(str(tmp_path / "b"))
    specs.close()


def test_start_sweeps_only_with_a_cdi_resource(tmp_path):
    left = tmp_path / "udev-device-plugin-example.com_gone.json"
    left.write_text("{}")
    without = config.parse([("t", f"[resource {RESOURCE}]\nsubsystem = tty\n")]).resources
    cdidir.CdiSpecs(str(tmp_path), Timers()).start(without)
    assert left.exists()
    cdidir.CdiSpecs(str(tmp_path), Timers()).start([res()])
    assert not left.exists()


def test_a_stale_spec_of_a_resource_without_devices_is_removed(tmp_path):
    stale = tmp_path / "udev-device-plugin-example.com_serial.json"
    stale.write_text("{}")
    specs = cdidir.CdiSpecs(str(tmp_path), Timers())
    specs.start([res()])  # kept by the sweep: it is the name of a resource of ours
    assert stale.exists()
    specs.sync(state_with(res(), {}))
    assert not stale.exists()
