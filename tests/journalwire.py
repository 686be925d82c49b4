"""journald's reading of a native-protocol datagram (server_process_native_message), for the tests
that check what the daemon sends: ``KEY=value\\n``, or ``KEY\\n`` + little-endian 64-bit length +
value + ``\\n`` for values that hold a newline."""

from __future__ import annotations

import re
import socket
import struct
from typing import Dict, List, Tuple


def parse_native(data: bytes) -> List[Tuple[str, bytes]]:
    out = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            assert data[nl + 9 + size:nl + 10 + size] == b"\n", "binary field not followed by a newline"
            i = nl + 10 + size
        assert re.fullmatch(rb"[A-Z_][A-Z0-9_]*", key), key
        out.append((key.decode(), value))
    return out


class Journal:
    """A datagram socket where the daemon sends what it would send journald.  Nothing reads it until
    :meth:`read` is called: until then it fills as a journald that does not read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.entries: List[List[Tuple[str, str]]] = []

    def read(self) -> List[Dict[str, str]]:
        """Every entry so far (repeated keys such as DEVNODE joined with a space)."""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            self.entries.append([(key, value.decode()) for key, value in parse_native(data)])
        out = []
        for fields in self.entries:
            entry: Dict[str, str] = {}
            for key, value in fields:
                entry[key] = f"{entry[key]} {value}" if key in entry else value
            out.append(entry)
        return out

    def find(self, **match: str) -> List[Dict[str, str]]:
        return [e for e in self.read() if all(e.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self.sock.close()
