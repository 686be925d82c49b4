"""kubelet.kubelet_answers: the check that the kubelet's gRPC server answers a new connection on
kubelet.sock, against a real grpc.aio server and raw UNIX-socket servers that misbehave."""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable, List

import grpc
import pytest

from udev_device_plugin.kubelet import kubelet_answers

SETTINGS = bytes((0, 0, 0, 4, 0, 0, 0, 0, 0))
SETTINGS_ACK = bytes((0, 0, 0, 4, 1, 0, 0, 0, 0))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY_NO_ERROR = bytes((0, 0, 8, 7, 0, 0, 0, 0, 0)) + bytes(8)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(coro: Awaitable) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def raw_server(path: str, answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    return await asyncio.start_unix_server(handle, path)


def test_a_grpc_server_answers_and_nothing_is_left_open(tmp_path):
    path = str(tmp_path / "kubelet.sock")

    async def main() -> None:
        server = grpc.aio.server()
        server.add_insecure_port("unix:" + path)
        await server.start()
        try:
            await kubelet_answers(path)  # opens the loop's own descriptors once
            before = open_fds()
            for _ in range(20):
                await asyncio.wait_for(kubelet_answers(path), 10)
            assert open_fds() == before
        finally:
            await server.stop(None)

    run(main())


def test_what_the_server_is_sent_is_a_preface_settings_and_goaway(tmp_path):
    """A well-formed HTTP/2 client that leaves at once: what a Go kubelet reads as a client that went away."""
    path = str(tmp_path / "kubelet.sock")
    got: List[bytes] = []

    async def answer(reader, writer) -> None:
        writer.write(SETTINGS)
        got.append(await reader.read(4096))
        got.append(await reader.read(4096))  # b"" once the client has closed
        while got[-1]:
            got.append(await reader.read(4096))

    async def main() -> None:
        server = await raw_server(path, answer)
        async with server:
            await kubelet_answers(path)
            for _ in range(100):
                if got and not got[-1]:
                    break
                await asyncio.sleep(0.01)

    run(main())
    assert b"".join(got) == PREFACE + SETTINGS + GOAWAY_NO_ERROR


def test_it_reads_what_the_server_sends_until_it_closes_but_not_forever(tmp_path):
    """Closing a UNIX socket with unread data resets the peer (grpc-go logs that): the rest of the
    server's greeting is read first, for at most a second when the server does not close."""
    path = str(tmp_path / "kubelet.sock")
    sent: List[int] = []

    async def main() -> None:
        hold = asyncio.Event()

        async def answer(reader, writer) -> None:
            writer.write(SETTINGS + SETTINGS_ACK)
            await writer.drain()
            sent.append(1)
            await hold.wait()  # never closes while the check waits

        server = await raw_server(path, answer)
        async with server:
            before = open_fds()
            await asyncio.wait_for(kubelet_answers(path), 10)
            hold.set()
            for _ in range(500):
                if open_fds() == before:
                    break
                await asyncio.sleep(0.01)
            assert open_fds() == before

    run(main())
    assert sent


@pytest.mark.parametrize("first, error", [
    (SETTINGS_ACK, ValueError),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", ValueError),
    (b"", ConnectionResetError),
    (b"\x00\x00", ConnectionResetError),
])
def test_a_server_that_is_not_an_http2_server_or_closes_is_an_error(tmp_path, first, error):
    path = str(tmp_path / "kubelet.sock")

    async def answer(reader, writer) -> None:
        writer.write(first)
        await writer.drain()

    async def main() -> None:
        server = await raw_server(path, answer)
        async with server:
            before = open_fds()
            with pytest.raises(error):
                await asyncio.wait_for(kubelet_answers(path), 10)
            assert open_fds() == before

    run(main())


def test_a_server_that_accepts_but_never_answers_is_cut_off_by_the_caller(tmp_path):
    """The hung kubelet: the caller's timeout ends the wait, and the connection is closed."""
    path = str(tmp_path / "kubelet.sock")
    handled: List[bool] = []

    async def main() -> None:
        hold = asyncio.Event()

        async def answer(reader, writer) -> None:
            await hold.wait()
            handled.append(True)

        server = await raw_server(path, answer)
        async with server:
            before = open_fds()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(kubelet_answers(path), 0.2)
            hold.set()  # the server's end of the connection (in this process) closes too
            for _ in range(500):
                if handled and open_fds() == before:
                    break
                await asyncio.sleep(0.01)
            assert open_fds() == before

    run(main())


def test_no_socket_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        run(kubelet_answers(str(tmp_path / "kubelet.sock")))
    os.mkdir(tmp_path / "dir")
    with pytest.raises(OSError):
        run(kubelet_answers(str(tmp_path / "dir")))
