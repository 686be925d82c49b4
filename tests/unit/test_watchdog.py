"""The watchdog pings only while a call through our own socket is answered (issue 9): a loop that runs but
whose RPC side is stuck must let systemd's watchdog fire."""

from __future__ import annotations

import asyncio
from typing import List, Optional

from udev_device_plugin.daemon import Daemon


class Notifier:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def notify(self, *lines: str) -> None:
        self.lines.extend(lines)


class Connector:
    """The daemon's probe() against a socket that answers or not, as the test decides."""

    def __init__(self) -> None:
        self.problem: Optional[str] = None
        self.calls = 0

    async def probe(self, timeout: float) -> Optional[str]:
        self.calls += 1
        return self.problem


def test_no_watchdog_ping_while_our_socket_does_not_answer():
    async def main() -> List[List[str]]:
        fake = type("D", (), {})()  # the daemon's state the watchdog reads, nothing else
        fake.connector, fake.notifier = Connector(), Notifier()
        fake.clock = asyncio.get_running_loop().time
        task = asyncio.ensure_future(Daemon._watchdog(fake, 0.02))  # type: ignore[arg-type]
        seen = []
        for problem in (None, "udevdp-x.sock: DEADLINE_EXCEEDED", None):
            fake.connector.problem = problem
            calls = fake.connector.calls
            while fake.connector.calls < calls + 3:
                await asyncio.sleep(0.005)
            seen.append(list(fake.notifier.lines))
            fake.notifier.lines.clear()
        task.cancel()
        return seen

    answering, stuck, again = asyncio.run(main())
    assert "WATCHDOG=1" in answering
    assert "WATCHDOG=1" not in stuck
    assert "WATCHDOG=1" in again
