"""events.py: journal native protocol encoding, event fields, and a JournalSink talking to a real socket."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import socket
import struct

import pytest

from udev_device_plugin import events
from udev_device_plugin.events import Event, JournalSink, StderrSink, devices_event, encode

from ..journalwire import Journal, parse_native


@pytest.mark.parametrize("fields, wire", [
    ([], b""),
    ([("MESSAGE", "hello")], b"MESSAGE=hello\n"),
    ([("MESSAGE", "")], b"MESSAGE=\n"),
    ([("A", "x=y"), ("B", "z")], b"A=x=y\nB=z\n"),
    ([("MESSAGE", "caf\u00e9")], "MESSAGE=caf\u00e9\n".encode()),
    ([("MESSAGE", "two\nlines")], b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"),
    ([("REASON", "\n")], b"REASON\n\x01\x00\x00\x00\x00\x00\x00\x00\n\n"),
    ([("A", "1"), ("M", "a\nb\u00e9"), ("Z", "2")],
     b"A=1\nM\n" + struct.pack("<Q", 5) + "a\nb\u00e9".encode() + b"\nZ=2\n"),
    ([("M", "bad \udcff surrogate")], b"M=bad ? surrogate\n"),
])
def test_encode(fields, wire):
    assert encode(fields) == wire


@pytest.mark.parametrize("value", ["plain", "", "with\nnewline", "\n\n", "trailing\n", "ends =\nx=y", "\u00e9\n\u00e9",
                                   "x" * 5000])
def test_encode_round_trips_through_the_journal_parser(value):
    fields = [("MESSAGE", value), ("DEVNODE", "/dev/a"), ("DEVNODE", "/dev/b")]
    assert parse_native(encode(fields)) == [(k, v.encode()) for k, v in fields]


def test_message_ids_are_fixed_128_bit_ids_one_per_kind():
    assert set(events.MESSAGE_IDS) == {"added", "removed", "unhealthy", "recovered", "registered",
                                       "registration_failed"}
    assert len(set(events.MESSAGE_IDS.values())) == len(events.MESSAGE_IDS)
    for value in events.MESSAGE_IDS.values():
        assert re.fullmatch(r"[0-9a-f]{32}", value)
    # Admins query these (journalctl MESSAGE_ID=...): they never change.
    assert events.MESSAGE_IDS["unhealthy"] == "a270d599b26f48e7a0f26dcaf809d7d3"
    assert events.MESSAGE_IDS["added"] == "ae55706b3807494abdfb8ddeedab6bc8"


@pytest.mark.parametrize("kind", sorted(events.MESSAGE_IDS))
def test_message_id_depends_only_on_the_kind(kind):
    a = dict(Event(kind, "example.com/a", "one").fields())
    b = dict(Event(kind, "example.com/b", "two", 3, "d1", ("/dev/x",), "Unhealthy", "r").fields())
    assert a["MESSAGE_ID"] == b["MESSAGE_ID"] == events.MESSAGE_IDS[kind]


def test_event_fields():
    ev = Event("unhealthy", "example.com/fpga", "example.com/fpga: device f0 (/dev/f0) became unhealthy: hot",
               events.WARNING, "f0", ("/dev/f0", "/dev/f0-ctl"), "Unhealthy", "hot")
    assert ev.fields() == [
        ("MESSAGE", "example.com/fpga: device f0 (/dev/f0) became unhealthy: hot"),
        ("MESSAGE_ID", events.MESSAGE_IDS["unhealthy"]),
        ("PRIORITY", "4"),
        ("SYSLOG_IDENTIFIER", "udev-device-plugin"),
        ("EVENT", "UNHEALTHY"),
        ("RESOURCE", "example.com/fpga"),
        ("DEVICE_ID", "f0"),
        ("DEVNODE", "/dev/f0"),
        ("DEVNODE", "/dev/f0-ctl"),
        ("HEALTH", "Unhealthy"),
        ("REASON", "hot"),
    ]


def test_event_fields_leave_out_what_is_empty():
    assert Event("registered", "example.com/a", "registered").fields() == [
        ("MESSAGE", "registered"),
        ("MESSAGE_ID", events.MESSAGE_IDS["registered"]),
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "udev-device-plugin"),
        ("EVENT", "REGISTERED"),
        ("RESOURCE", "example.com/a"),
    ]


@pytest.mark.parametrize("kind, health, reason, extra, message, priority", [
    ("added", "Healthy", "", "", "example.com/a: device d0 (/dev/d0) added, Healthy", 6),
    ("added", "Unhealthy", "node missing", "", "example.com/a: device d0 (/dev/d0) added, Unhealthy: node missing", 6),
    ("removed", "", "", "", "example.com/a: device d0 (/dev/d0) removed", 5),
    ("unhealthy", "Unhealthy", "check failed", "", "example.com/a: device d0 (/dev/d0) became unhealthy: check failed",
     4),
    ("recovered", "Healthy", "", "", "example.com/a: device d0 (/dev/d0) recovered", 5),
    ("removed", "", "", "while allocated", "example.com/a: device d0 (/dev/d0) removed; while allocated", 4),
    ("added", "Healthy", "", "id collision", "example.com/a: device d0 (/dev/d0) added, Healthy; id collision", 4),
])
def test_devices_event(kind, health, reason, extra, message, priority):
    ev = devices_event(kind, "example.com/a", "d0", ("/dev/d0", "/dev/d0p1"), health, reason, extra)
    assert (ev.kind, ev.message, ev.priority) == (kind, message, priority)
    fields = ev.fields()
    assert ("PRIORITY", str(priority)) in fields
    assert [v for k, v in fields if k == "DEVNODE"] == ["/dev/d0", "/dev/d0p1"]
    assert ("DEVICE_ID", "d0") in fields and ("RESOURCE", "example.com/a") in fields


def test_devices_event_without_devnode():
    ev = devices_event("removed", "example.com/a", "d0", (), "", "")
    assert ev.message == "example.com/a: device d0 removed"
    assert "DEVNODE" not in dict(ev.fields())


@pytest.fixture
def journal(tmp_path):
    """A stand-in for /run/systemd/journal/socket: a real AF_UNIX datagram socket."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield path, sock
    finally:
        sock.close()


def test_journal_sink_sends_one_datagram_per_event(journal):
    path, server = journal
    sink = JournalSink(path)
    try:
        first = devices_event("unhealthy", "example.com/a", "d0", ("/dev/d0", "/dev/d0-ctl"), "Unhealthy",
                              "check said:\nfan stopped")
        second = devices_event("recovered", "example.com/a", "d0", ("/dev/d0",), "Healthy", "")
        sink.emit(first)
        sink.emit(second)
        got1 = parse_native(server.recv(65536))
        got2 = parse_native(server.recv(65536))
    finally:
        sink.close()
    assert got1 == [(k, v.encode()) for k, v in first.fields()]
    assert dict(got1)["PRIORITY"] == b"4"
    assert dict(got1)["REASON"] == b"check said:\nfan stopped"
    assert [v for k, v in got1 if k == "DEVNODE"] == [b"/dev/d0", b"/dev/d0-ctl"]
    assert dict(got2)["MESSAGE_ID"] == events.MESSAGE_IDS["recovered"].encode()
    assert dict(got2)["PRIORITY"] == b"5"


def test_journal_sink_without_journal_logs_instead(tmp_path, caplog):
    sink = JournalSink(str(tmp_path / "no-journal.sock"))
    try:
        with caplog.at_level(logging.WARNING, logger="udev_device_plugin.events"):
            sink.emit(Event("registered", "example.com/a", "example.com/a: registered"))
    finally:
        sink.close()
    assert [r.getMessage() for r in caplog.records] == [
        "journal unreachable (No such file or directory): example.com/a: registered"]


def test_stderr_sink_line():
    stream = io.StringIO()
    StderrSink(stream).emit(devices_event("unhealthy", "example.com/a", "d0", ("/dev/d0",), "Unhealthy",
                                          "check failed"))
    assert stream.getvalue() == ("example.com/a: device d0 (/dev/d0) became unhealthy: check failed "
                                 "[EVENT=UNHEALTHY RESOURCE=example.com/a DEVICE_ID=d0 DEVNODE=/dev/d0 "
                                 "HEALTH=Unhealthy REASON='check failed']\n")


@pytest.mark.parametrize("mode, present, sink", [
    ("journal", False, JournalSink),
    ("journal", True, JournalSink),
    ("auto", True, JournalSink),
    ("auto", False, StderrSink),
    ("stderr", True, StderrSink),
])
def test_make_sink(tmp_path, mode, present, sink):
    path = tmp_path / "journal.sock"
    if present:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server.bind(str(path))
    try:
        got = events.make_sink(mode, str(path))
        try:
            assert type(got) is sink
            if isinstance(got, JournalSink):
                assert got.path == str(path)
        finally:
            got.close()
    finally:
        if present:
            server.close()


def _flood(count: int):
    return [devices_event("added", "example.com/a", f"d{i}", (f"/dev/d{i}",), "Healthy", "") for i in range(count)]


def _queue_limit() -> int:
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        return int(f.read())


def _messages(journal: Journal):
    """The MESSAGE of every entry the journal got so far (reading what waits)."""
    return [e["MESSAGE"] for e in journal.read()]


def test_journal_sink_never_blocks_on_a_journal_that_does_not_read(tmp_path):
    """More entries than the socket takes unread (net.unix.max_dgram_qlen): emit returns at once (a
    blocking send would hang this test), the rest wait in order, and the event loop sends them
    once journald reads again."""
    journal = Journal(str(tmp_path / "j.sock"))
    flood = _flood(_queue_limit() + 200)
    sink = JournalSink(journal.path)

    async def main():
        for event in flood:
            sink.emit(event)
        waiting = sink.pending()
        deadline = asyncio.get_running_loop().time() + 10
        while len(_messages(journal)) < len(flood) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)  # journald reading again, the sink's retries sending the rest
        return waiting

    try:
        waiting = asyncio.run(main())
        got = _messages(journal)
    finally:
        sink.close()
        journal.close()
    assert waiting > 0
    assert got == [e.message for e in flood]
    assert sink.pending() == 0


def test_journal_sink_backlog_is_bounded_dropping_the_oldest(tmp_path, caplog, monkeypatch):
    """Past BACKLOG_BYTES the oldest waiting entries go; the newest are sent when journald reads again,
    and a warning counts the dropped ones."""
    journal = Journal(str(tmp_path / "j.sock"))
    flood = _flood(_queue_limit() + 300)
    entry_size = len(encode(flood[0].fields()))
    bound = min(20, _queue_limit() // 2)  # so many that the emptied socket takes them all at close
    monkeypatch.setattr(JournalSink, "BACKLOG_BYTES", bound * entry_size + entry_size // 2)
    sink = JournalSink(journal.path)
    try:
        for event in flood:  # no event loop: nothing retries until the next emit or close
            sink.emit(event)
        assert 0 < sink.pending() <= bound
        accepted = _messages(journal)  # what the socket took before it was full
        kept = sink.pending()
        with caplog.at_level(logging.WARNING, logger="udev_device_plugin.events"):
            sink.close()  # sends what waits, now that the socket has room
        got = _messages(journal)[len(accepted):]
    finally:
        journal.close()
    messages = [e.message for e in flood]
    assert accepted == messages[:len(accepted)] and got == messages[len(messages) - kept:]
    dropped = len(flood) - len(accepted) - kept
    assert dropped > 0
    assert [r.getMessage() for r in caplog.records] == [
        f"journald fell behind: {dropped} journal entries were dropped, the oldest first (0 MiB of them waited)"]
