"""journald's reading of a native-protocol datagram (server_process_native_message), for the tests
that check what the daemon sends: ``KEY=value\\n``, or ``KEY\\n`` + little-endian 64-bit length +
value + ``\\n`` for values that hold a newline."""

from __future__ import annotations

import re
import struct
from typing import List, Tuple


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
