"""The executable's start (entry.py): the gRPC settings ``serve`` gives itself, by grpcio release."""

from __future__ import annotations

import grpc
import pytest

from udev_device_plugin import entry


@pytest.mark.parametrize("release", [(1, 59), (1, 70), (1, 85)])
def test_the_iomgr_listener_is_chosen_on_the_releases_that_know_the_switch(release):
    environ = {"PATH": "/usr/bin"}
    assert entry.grpc_settings(environ, release) == {"GRPC_EXPERIMENTS": "-event_engine_listener",
                                                     entry.BACKUP_POLL: "0"}
    assert environ == {"PATH": "/usr/bin", "GRPC_EXPERIMENTS": "-event_engine_listener", entry.BACKUP_POLL: "0"}


@pytest.mark.parametrize("release", [None, (0, 99), (1, 46), (1, 58), (1, 86), (2, 0)])
def test_no_experiment_is_set_on_a_release_that_may_not_know_it(release):
    """The backup poller is turned off on every release: one that does not read the variable ignores it."""
    environ = {"PATH": "/usr/bin"}
    assert entry.grpc_settings(environ, release) == {entry.BACKUP_POLL: "0"}
    assert environ == {"PATH": "/usr/bin", entry.BACKUP_POLL: "0"}


@pytest.mark.parametrize("admins", ["", "-event_engine_client", "-event_engine_listener,-event_engine_client"])
def test_an_admins_own_grpc_experiments_are_left_alone(admins):
    environ = {"GRPC_EXPERIMENTS": admins}
    assert entry.grpc_settings(environ, (1, 85)) == {entry.BACKUP_POLL: "0"}
    assert environ == {"GRPC_EXPERIMENTS": admins, entry.BACKUP_POLL: "0"}


@pytest.mark.parametrize("admins", ["", "5000"])
def test_an_admins_own_backup_poll_interval_is_left_alone(admins):
    environ = {entry.BACKUP_POLL: admins}
    assert entry.grpc_settings(environ, (1, 85)) == {"GRPC_EXPERIMENTS": "-event_engine_listener"}
    assert environ == {entry.BACKUP_POLL: admins, "GRPC_EXPERIMENTS": "-event_engine_listener"}


def test_the_release_is_the_installed_grpcios():
    major, minor = (int(part) for part in grpc.__version__.split(".")[:2])
    assert entry.grpcio_release() == (major, minor)


def test_the_release_is_read_from_the_first_version_file_that_has_one(tmp_path):
    missing, garbled, undecodable, found, later = (tmp_path / n for n in ("a", "b", "c", "d", "e"))
    for d in (garbled, undecodable, found, later):
        d.mkdir()
    (garbled / "_grpcio_metadata.py").write_text("__version__ = 'unknown'\n")
    (undecodable / "_grpcio_metadata.py").write_bytes(b"\xff\xfe1.2\n")
    (found / "_grpcio_metadata.py").write_text('__version__ = """1.62.3"""\n')
    (later / "_grpcio_metadata.py").write_text('__version__ = """1.80.0"""\n')
    assert entry.release_in([str(missing), str(garbled), str(undecodable), str(found), str(later)]) == (1, 62)
    assert entry.release_in([str(missing), str(garbled)]) is None
    assert entry.release_in([]) is None


def test_the_start_line_names_what_grpc_settings_sets():
    from udev_device_plugin import daemon

    assert set(entry.grpc_settings({}, (1, 85))) == set(daemon.GRPC_LOGGED)
