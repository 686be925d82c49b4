"""exporter.py's HTTP server on a real event loop and real TCP sockets: what each request gets, and the
bounds on clients that send nothing, too much, or never read (with short timeouts; the daemon's own
are checked end to end in tests/e2e/test_metrics.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable, Coroutine, List, Optional, Tuple

import pytest

from udev_device_plugin import exporter
from udev_device_plugin.exporter import MetricsServer
from udev_device_plugin.metrics import CONTENT_TYPE, MetricsAddress

BODY = b"# HELP x a test\n# TYPE x gauge\nx 1.0\n"
LOOPBACK = MetricsAddress("127.0.0.1", 0)


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(main())


def serve(render: Callable[[], bytes] = lambda: BODY, address: MetricsAddress = LOOPBACK,
          **kw: Any) -> MetricsServer:
    server = MetricsServer(asyncio.get_running_loop(), render, **kw)
    server.listen(address)
    assert server.bound, server.problem
    return server


def where(server: MetricsServer) -> Tuple[str, int]:
    host, _, port = server.bound.rpartition(":")
    return host.strip("[]"), int(port)


async def connect(server: MetricsServer) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = where(server)
    return await asyncio.open_connection(host, port)


async def request(server: MetricsServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the server closes."""
    reader, writer = await connect(server)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def parse(raw: bytes) -> Tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(status), headers, body


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sent before closing the connection (fails if it keeps it open past ``timeout``)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def test_get_metrics():
    async def main() -> None:
        server = serve()
        try:
            status, headers, body = parse(await request(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
            assert (status, body) == (200, BODY)
            assert headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
            assert headers["Content-Length"] == str(len(BODY))
            assert headers["Connection"] == "close" and headers["Date"].endswith(" GMT")
            # What Prometheus sends: a query string (params:), HTTP/1.0, bare LF line ends are all served.
            for req in (b"GET /metrics?collect=all HTTP/1.1\r\n\r\n", b"GET /metrics HTTP/1.0\r\n\r\n",
                        b"GET /metrics HTTP/1.1\nHost: x\n\n"):
                assert parse(await request(server, req))[::2] == (200, BODY), req
            status, headers, body = parse(await request(server, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
            assert (status, headers["Content-Length"], body) == (200, str(len(BODY)), b"")
        finally:
            server.close()

    run(main)


@pytest.mark.parametrize("req, status", [
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics/ HTTP/1.1\r\n\r\n", 404),
    (b"GET /etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"GET /../../../../etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"GET http://127.0.0.1/metrics HTTP/1.1\r\n\r\n", 404),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405),
    (b"GET /metrics\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
])
def test_other_requests(req, status):
    async def main() -> None:
        server = serve()
        try:
            got, headers, body = parse(await request(server, req))
            assert got == status
            assert b"root:" not in body and body != BODY
            if status == 405:
                assert headers["Allow"] == "GET, HEAD"
            assert server.refused["bad_request"] == (1 if status == 400 else 0)
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            server.close()

    run(main)


def test_request_trickling_in_within_the_time_is_served():
    async def main() -> None:
        server = serve()
        try:
            reader, writer = await connect(server)
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
            assert parse(await closed_by_server(reader, 5))[::2] == (200, BODY)
            writer.close()
        finally:
            server.close()

    run(main)


def test_client_that_sends_nothing_is_cut_off_and_others_are_served_meanwhile():
    async def main() -> None:
        server = serve(request_timeout=0.3)
        try:
            idle_reader, idle_writer = await connect(server)
            started = time.monotonic()
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
            assert await closed_by_server(idle_reader, 5) == b""
            assert time.monotonic() - started >= 0.25
            await until(lambda: not server.connections, what="the idle connection to be dropped")
            assert server.refused["timeout"] == 1
            idle_writer.close()
        finally:
            server.close()

    run(main)


def test_huge_request_is_refused_without_reading_it_all():
    async def main() -> None:
        server = serve()
        try:
            reader, writer = await connect(server)
            writer.write(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (exporter.MAX_REQUEST + 100))
            await writer.drain()
            status = parse(await closed_by_server(reader, 5))[0]
            assert status == 431
            assert server.refused["too_large"] == 1
            writer.close()
            # A client that streams megabytes: cut off as soon as the head is over the limit.
            reader, writer = await connect(server)
            sent = 0
            try:
                while sent < 64 * 1024 * 1024:
                    writer.write(b"x" * 65536)
                    await asyncio.wait_for(writer.drain(), 5)
                    sent += 65536
            except (ConnectionError, OSError):
                pass
            assert sent < 64 * 1024 * 1024, "the server kept reading"
            assert server.refused["too_large"] == 2
            writer.close()
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            server.close()

    run(main)


def test_client_that_never_reads_is_cut_off():
    big = b"x" * (32 * 1024 * 1024)

    async def main() -> None:
        server = serve(render=lambda: big, response_timeout=0.5)
        try:
            sock = socket.create_connection(where(server))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            await until(lambda: any(c.out for c in server.connections), what="the answer to be under way")
            # The loop is free meanwhile: other clients are answered.
            assert parse(await request(server, b"HEAD /metrics HTTP/1.1\r\n\r\n"))[0] == 200
            await until(lambda: not server.connections, what="the slow reader to be cut off")
            assert server.refused["timeout"] == 1
            sock.close()
        finally:
            server.close()

    run(main)


def test_connections_over_the_limit_get_503():
    async def main() -> None:
        server = serve(max_connections=2, request_timeout=0.5)
        try:
            idle = [await connect(server) for _ in range(2)]
            await until(lambda: len(server.connections) == 2, what="two connections")
            status, _, body = parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))
            assert status == 503 and b"too many" in body
            assert server.refused["too_many_connections"] == 1
            for reader, writer in idle:
                assert await closed_by_server(reader, 5) == b""
                writer.close()
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            server.close()

    run(main)


def test_render_error_is_a_500_and_the_server_goes_on():
    calls: List[int] = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a metric")
        return BODY

    async def main() -> None:
        server = serve(render=render)
        try:
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 500
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[::2] == (200, BODY)
        finally:
            server.close()

    run(main)


def test_port_taken_is_retried_until_free():
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    changes: List[str] = []

    async def main() -> None:
        server = MetricsServer(asyncio.get_running_loop(), lambda: BODY, retry_first=0.05, retry_max=0.1,
                               on_change=lambda: changes.append(server.problem))
        try:
            server.listen(MetricsAddress("127.0.0.1", port, source="/etc/x.conf"))
            assert server.bound == ""
            assert server.problem == f"cannot listen on 127.0.0.1:{port}: Address already in use"
            blocker.close()
            await until(lambda: bool(server.bound), what="the port to be bound once free")
            assert server.bound == f"127.0.0.1:{port}" and server.problem == ""
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            server.close()

    try:
        run(main)
    finally:
        blocker.close()
    assert changes[0].startswith("cannot listen") and changes[-1] == ""


def test_listen_elsewhere_closes_the_old_address_and_same_address_keeps_it():
    async def main() -> None:
        server = serve()
        try:
            first = where(server)
            server.listen(LOOPBACK)  # the same setting (port 0 included): nothing moves
            assert where(server) == first
            server.listen(MetricsAddress("::1", 0))
            assert server.bound.startswith("[::1]:")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(first, timeout=5).close()
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
        finally:
            server.close()
        assert server.bound == "" and not server.connections

    run(main)


def test_close_drops_connections():
    async def main() -> Optional[int]:
        server = serve()
        reader, writer = await connect(server)
        await until(lambda: len(server.connections) == 1, what="the connection")
        address = where(server)
        server.close()
        assert await closed_by_server(reader, 5) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=5).close()
        return len(server.connections)

    assert run(main) == 0


def test_listening_again_on_a_failing_address_tries_at_once():
    """A reload after the port was freed binds it then, not at the next retry (here a minute away)."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    address = MetricsAddress("127.0.0.1", blocker.getsockname()[1])

    async def main() -> None:
        server = MetricsServer(asyncio.get_running_loop(), lambda: BODY, retry_first=60)
        try:
            server.listen(address)
            assert server.problem and not server.bound
            server.listen(address)
            assert server.problem and not server.bound
            blocker.close()
            server.listen(address)
            assert server.bound == str(address) and server.problem == ""
        finally:
            server.close()

    try:
        run(main)
    finally:
        blocker.close()


def test_a_body_is_rendered_at_most_once_per_interval():
    renders: List[int] = []
    now = [100.0]

    def render() -> bytes:
        renders.append(1)
        return f"x {len(renders)}.0\n".encode()

    async def main() -> None:
        server = serve(render=render, render_interval=1.0, clock=lambda: now[0])
        try:
            bodies = [parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[2] for _ in range(5)]
            assert bodies == [b"x 1.0\n"] * 5 and len(renders) == 1
            now[0] += 0.999
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[2] == b"x 1.0\n"
            now[0] += 0.001
            assert parse(await request(server, b"GET /metrics HTTP/1.1\r\n\r\n"))[2] == b"x 2.0\n"
            # Refused and unknown requests render nothing.
            await request(server, b"GET /other HTTP/1.1\r\n\r\n")
            await request(server, b"junk\r\n\r\n")
            assert len(renders) == 2
        finally:
            server.close()

    run(main)


def test_connections_beyond_the_rate_wait_in_the_backlog():
    """A client connecting in a tight loop gets ``accept_rate`` connections a second after the burst; the
    others wait (in the kernel's backlog), none is refused."""
    now = [0.0]

    async def main() -> None:
        server = serve(clock=lambda: now[0], accept_rate=10.0, accept_burst=3)
        try:
            answered = [parse(await request(server, b"HEAD /metrics HTTP/1.1\r\n\r\n"))[0] for _ in range(3)]
            assert answered == [200] * 3
            reader, writer = await connect(server)  # the fourth: connected, but not accepted yet
            writer.write(b"HEAD /metrics HTTP/1.1\r\n\r\n")
            await writer.drain()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), 0.3)
            assert not server.connections
            now[0] += 0.1  # one more token
            assert parse(await closed_by_server(reader, 5))[0] == 200
            writer.close()
            assert server.refused == dict.fromkeys(server.refused, 0)
        finally:
            server.close()

    run(main)
