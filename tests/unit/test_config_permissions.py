"""config.load() refuses what others than root could have written (issue 10, item 11): health_command
runs as root, so a group- or world-writable config file or drop-in directory is root code execution
for whoever can write it.  Like sshd's StrictModes; ``[plugin] strict_permissions = no`` in the main
file relaxes the drop-in checks, never the main file's own."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from typing import Iterator, List

import pytest

from udev_device_plugin import config
from udev_device_plugin.config import ConfigError

RESOURCE = "[resource example.com/{name}]\nsubsystem = mem\n"
NOBODY = 65534
RELAX = "or strict_permissions = no in [plugin] of"


@pytest.fixture
def etc(tmp_path) -> Iterator[str]:
    """A config directory as the package installs it: root-owned (or ours), 0755, files 0644."""
    d = tmp_path / "etc"
    d.mkdir()
    os.chmod(d, 0o755)
    (d / "conf.d").mkdir()
    os.chmod(d / "conf.d", 0o755)
    yield str(d)


def write(path: str, text: str, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def main_file(etc: str, text: str = "", mode: int = 0o644) -> str:
    return write(os.path.join(etc, "udev-device-plugin.conf"), text, mode)


def dropin(etc: str, name: str, mode: int = 0o644) -> str:
    return write(os.path.join(etc, "conf.d", f"{name}.conf"), RESOURCE.format(name=name), mode)


def refusals(path: str) -> List[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value.messages


def ownership(path: str) -> str:
    st = os.stat(path)
    return (f"owner {pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid}), "
            f"group {grp.getgrgid(st.st_gid).gr_name} (gid {st.st_gid})")


def names(cfg: config.Config) -> List[str]:
    return [r.name for r in cfg.resources]


def test_root_owned_0644_files_in_0755_directories_are_accepted(etc):
    main = main_file(etc)
    dropin(etc, "a")
    dropin(etc, "b", 0o600)
    assert names(config.load(main)) == ["example.com/a", "example.com/b"]
    assert config.load(main).plugin.strict_permissions is True


@pytest.mark.parametrize("mode, why", [
    (0o664, "writable by its group"),
    (0o646, "writable by everyone"),
    (0o666, "writable by its group and everyone"),
    (0o777, "writable by its group and everyone"),
])
def test_a_writable_main_file_is_refused_even_when_it_says_strict_permissions_no(etc, mode, why):
    for text in ("", "[plugin]\nstrict_permissions = no\n"):
        main = main_file(etc, text, mode)
        messages = refusals(main)
        assert messages == [
            f"{main}: refused: the main file is {why} ({ownership(main)}, "
            f"mode {mode:04o}); accepted: a main file only root may change (chown root, chmod go-w); "
            "strict_permissions cannot excuse the main file or its directory"], messages


@pytest.mark.parametrize("mode", [0o775, 0o777, 0o1777])
def test_a_writable_directory_of_the_main_file_is_refused(etc, mode):
    # Whoever may write it can replace the main file or conf.d (a sticky bit still lets them create conf.d).
    main = main_file(etc, "[plugin]\nstrict_permissions = no\n")
    os.chmod(etc, mode)
    messages = refusals(main)
    assert len(messages) == 1 and messages[0].startswith(f"{etc}: refused: the directory of the main file is "
                                                         "writable by"), messages
    assert f"mode {mode:04o}" in messages[0] and "cannot excuse" in messages[0]


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_a_writable_dropin_directory_is_refused_unless_relaxed(etc, mode):
    main = main_file(etc)
    dropin(etc, "a")
    os.chmod(os.path.join(etc, "conf.d"), mode)
    messages = refusals(main)
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{etc}/conf.d: refused: the drop-in directory is writable by")
    assert f"mode {mode:04o}" in messages[0] and f"{RELAX} {main}" in messages[0]
    main_file(etc, "[plugin]\nstrict_permissions = no\n")
    assert names(config.load(main)) == ["example.com/a"]


def test_a_writable_dropin_directory_is_judged_once_it_holds_a_dropin(etc):
    # Empty, it gives nothing to read; whatever anyone adds to it is refused with the directory.
    main = main_file(etc)
    os.chmod(os.path.join(etc, "conf.d"), 0o777)
    assert config.load(main).resources == ()
    dropin(etc, "a")
    assert refusals(main)[0].startswith(f"{etc}/conf.d: refused")


@pytest.mark.parametrize("mode, why", [(0o664, "writable by its group"), (0o666, "writable by its group and everyone"),
                                       (0o602, "writable by everyone")])
def test_a_writable_dropin_is_refused_unless_relaxed(etc, mode, why):
    main = main_file(etc)
    dropin(etc, "a")
    bad = dropin(etc, "b", mode)
    dropin(etc, "c")
    messages = refusals(main)
    assert messages == [f"{bad}: refused: the drop-in is {why} ({ownership(bad)}, "
                        f"mode {mode:04o}); accepted: a drop-in only root may change (chown root, chmod go-w), "
                        f"{RELAX} {main}"]
    main_file(etc, "[plugin]\nstrict_permissions = no\n")
    assert names(config.load(main)) == ["example.com/a", "example.com/b", "example.com/c"]


def test_files_owned_by_another_user_are_refused(etc):
    main = main_file(etc)
    theirs = dropin(etc, "a")
    if os.geteuid() != 0:
        # Not root (the RPM's %check): our own files are trusted, as sshd trusts the user's own.
        assert names(config.load(main)) == ["example.com/a"]
        return
    os.chown(theirs, NOBODY, -1)
    messages = refusals(main)
    assert len(messages) == 1 and messages[0].startswith(f"{theirs}: refused: the drop-in is owned by "), messages
    assert "(uid 65534)" in messages[0] and "mode 0644" in messages[0]
    os.chown(os.path.join(etc, "conf.d"), NOBODY, -1)
    assert refusals(main)[0].startswith(f"{etc}/conf.d: refused: the drop-in directory is owned by")
    os.chown(main, NOBODY, -1)
    assert refusals(main)[0].startswith(f"{main}: refused: the main file is owned by")


def test_every_refusal_is_reported_at_once(etc):
    main = main_file(etc)
    os.chmod(os.path.join(etc, "conf.d"), 0o777)
    a, b = dropin(etc, "a", 0o666), dropin(etc, "b", 0o664)
    messages = refusals(main)
    assert [m.split(":")[0] for m in messages] == [f"{etc}/conf.d", a, b], messages


def test_a_dropin_symlink_outside_etc_is_refused_unless_relaxed(etc, tmp_path):
    main = main_file(etc)
    target = write(str(tmp_path / "elsewhere.conf"), RESOURCE.format(name="s"))
    link = os.path.join(etc, "conf.d", "s.conf")
    os.symlink(target, link)
    messages = refusals(main)
    assert messages == [f"{link}: refused: the drop-in is a symlink to {target}, outside /etc; accepted: a file in "
                        f"place or a symlink into /etc, {RELAX} {main}"]
    main_file(etc, "[plugin]\nstrict_permissions = no\n")
    assert names(config.load(main)) == ["example.com/s"]


def test_a_symlink_within_the_dropin_directory_is_outside_etc_too(etc):
    # The rule is about where the file lives, not how the link is spelled.
    main = main_file(etc)
    dropin(etc, "a")
    os.symlink("a.conf", os.path.join(etc, "conf.d", "b.conf"))
    messages = refusals(main)
    assert len(messages) == 1 and "is a symlink to" in messages[0] and messages[0].endswith(main)


def test_a_dropin_symlink_into_the_trusted_root_is_judged_by_its_target(etc, tmp_path, monkeypatch):
    # /etc itself cannot be written by a test; the trusted root is one constant.
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    monkeypatch.setattr(config, "TRUSTED_SYMLINK_ROOT", str(trusted))
    main = main_file(etc)
    target = write(str(trusted / "t.conf"), RESOURCE.format(name="t"))
    link = os.path.join(etc, "conf.d", "t.conf")
    os.symlink(target, link)
    assert names(config.load(main)) == ["example.com/t"]
    os.chmod(target, 0o666)  # the file opened is judged, not the link
    messages = refusals(main)
    assert len(messages) == 1 and messages[0].startswith(f"{link}: refused: the drop-in is writable by"), messages
    # A prefix of the root's name is not inside it.
    monkeypatch.setattr(config, "TRUSTED_SYMLINK_ROOT", str(trusted)[:-1])
    os.chmod(target, 0o644)
    assert "outside" in refusals(main)[0]


def test_a_dropin_directory_that_is_a_symlink_outside_etc_is_refused(etc, tmp_path):
    real = tmp_path / "real.d"
    real.mkdir()
    os.chmod(real, 0o755)
    write(str(real / "a.conf"), RESOURCE.format(name="a"))
    os.rmdir(os.path.join(etc, "conf.d"))
    os.symlink(str(real), os.path.join(etc, "conf.d"))
    main = main_file(etc)
    messages = refusals(main)
    assert messages == [f"{etc}/conf.d: refused: the drop-in directory is a symlink to {real}, outside /etc; "
                        f"accepted: a file in place or a symlink into /etc, {RELAX} {main}"]
    main_file(etc, "[plugin]\nstrict_permissions = no\n")
    assert names(config.load(main)) == ["example.com/a"]


def test_a_fifo_under_a_dropin_name_does_not_hang(etc):
    main = main_file(etc)
    fifo = os.path.join(etc, "conf.d", "f.conf")
    os.mkfifo(fifo, 0o644)
    assert refusals(main) == [f"{fifo}: cannot read: not a regular file; accepted: a text file"]


def test_a_runaway_file_is_not_read_whole(etc):
    main = main_file(etc, "#" * (config.MAX_FILE_BYTES + 1))
    assert refusals(main) == [f"{main}: larger than 1 MiB; accepted: a config file of at most that"]
    main_file(etc, "#" * config.MAX_FILE_BYTES)
    assert config.load(main).resources == ()


def test_candidates_replace_the_dropin_of_their_name_and_are_judged_as_dropins(etc, tmp_path):
    main = main_file(etc)
    dropin(etc, "a")
    dropin(etc, "b")
    candidate = write(str(tmp_path / "b.conf"), RESOURCE.format(name="new"))
    cfg = config.load(main, [candidate])
    assert names(cfg) == ["example.com/a", "example.com/new"]
    assert cfg.sources == (main, os.path.join(etc, "conf.d", "a.conf"), candidate)


def test_writable_candidates_are_refused(etc, tmp_path):
    main = main_file(etc)
    candidate = write(str(tmp_path / "c.conf"), RESOURCE.format(name="c"), 0o666)
    with pytest.raises(ConfigError) as info:
        config.load(main, [candidate])
    assert len(info.value.messages) == 1 and info.value.messages[0].startswith(f"{candidate}: refused: the drop-in")


def test_the_modes_judged_are_of_the_opened_files(etc):
    # A stat of the file, not of the path, is what load() judges: no rename can slip in between.
    main = main_file(etc)
    st = os.stat(main)
    assert stat.S_IMODE(st.st_mode) == 0o644 and config.load(main).resources == ()
