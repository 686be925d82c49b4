"""What the daemon's event loop does with an exception nobody awaited: grpcio's own per-call errors
are logged (grpcio 1.46's aio server raised ExecuteBatchError in its task for a stream whose client
had gone, and the daemon exited with every registration: seen on EL9), anything else stops the daemon
with a non-zero status for systemd to restart it."""

from __future__ import annotations

import asyncio
import logging
import sys

from grpc._cython import cygrpc

from udev_device_plugin.daemon import EXIT_FAILURE, Daemon


def loop_exception(exc: BaseException, tmp_path) -> Daemon:
    conf = tmp_path / "udev-device-plugin.conf"
    conf.write_text("[resource example.com/mem]\nsubsystem = mem\nkernel = null\n")
    conf.chmod(0o644)
    daemon = Daemon(str(conf))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # Python 3.9's asyncio.Event() takes the current loop
    try:
        daemon._stopping = asyncio.Event()
        daemon._loop_exception(loop, {"message": "Task exception was never retrieved", "exception": exc})
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return daemon


def test_a_grpc_internal_error_in_a_call_is_logged_and_the_daemon_serves_on(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        daemon = loop_exception(cygrpc.ExecuteBatchError("Failed \"execute_batch\""), tmp_path)
    assert not daemon._stopping.is_set() and daemon._exit_status != EXIT_FAILURE
    assert "a call ended with an error inside grpcio: ExecuteBatchError" in caplog.text


def test_any_other_unexpected_exception_stops_the_daemon_for_a_restart(caplog, tmp_path):
    daemon = loop_exception(KeyError("ours"), tmp_path)
    assert daemon._stopping.is_set() and daemon._exit_status == EXIT_FAILURE
    assert "internal error: KeyError" in caplog.text


BATCH_ERROR = "ExecuteBatchError raised in core by servicer method [/v1beta1.DevicePlugin/ListAndWatch]"


def broken_write_record(exc: BaseException) -> logging.LogRecord:
    """The record grpc.aio's server logs for a stream write that failed (server.pyx.pxi)."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - a record of whatever it was
        return logger.makeRecord(logger.name, logging.ERROR, "server.pyx.pxi", 1, BATCH_ERROR, (), sys.exc_info())


def test_a_write_on_a_broken_stream_is_one_debug_line_not_a_traceback():
    from udev_device_plugin.daemon import BrokenWriteFilter

    logger = logging.getLogger("grpc._cython.cygrpc")
    record = broken_write_record(cygrpc.ExecuteBatchError('Failed "execute_batch": (SendMessageOperation,)'))
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        assert BrokenWriteFilter().filter(record)
    finally:
        logger.setLevel(level)
    assert record.levelno == logging.DEBUG and record.exc_info is None
    text = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert "Traceback" not in text and "\n" not in text
    assert text.startswith("DEBUG " + BATCH_ERROR)
    assert "the connection broke while a message was being sent" in text
    # At the daemon's usual levels the record is dropped.
    logger.setLevel(logging.INFO)
    try:
        assert not BrokenWriteFilter().filter(broken_write_record(cygrpc.ExecuteBatchError("x")))
    finally:
        logger.setLevel(level)


def test_any_other_grpc_error_keeps_its_traceback():
    from udev_device_plugin.daemon import BrokenWriteFilter

    record = broken_write_record(ValueError("a bug in a handler"))
    assert BrokenWriteFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter("%(message)s").format(record)
