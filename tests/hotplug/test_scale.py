"""10,000 real loop devices (issue 13): the daemon lists every one to the kubelet, with the right IDs and
device nodes, and lists none once they are removed.  Not a timing test: the figures are in `make bench`.

The devices are made through /dev/loop-control while the session's real systemd-udevd handles their
events (tests/hotplug/loopscale.py); the fixture removes them even when the test fails.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Dict, Iterator, List

import pytest

from tests.conftest import wait_until

from . import loopscale

COUNT = 10000
RES = loopscale.RESOURCE
ALLOCATE_BATCH = 1000  # IDs per Allocate (one container asking for a thousand devices)
NUMBERS = list(range(loopscale.FIRST, loopscale.FIRST + COUNT))
# Bounds on each wait, not expectations: the kubelet itself would wait forever.  Generous because a
# daemon that handles each of a burst's 20,000 events (block and bdi) in time proportional to the
# devices it has takes minutes here (make bench has the figures).
STEP = 600.0


@pytest.fixture
def kubelet(kubelet_dir, kubelet_behaviour) -> Iterator[loopscale.LeanKubelet]:
    """Overrides the suite's stand-in: the same kubelet, keeping lists instead of a copy per message."""
    k = loopscale.LeanKubelet(kubelet_dir, behaviour=kubelet_behaviour).start()
    try:
        yield k
    finally:
        k.stop()


@pytest.fixture
def scale_loops(udevd) -> Iterator[loopscale.LoopScale]:
    """Loop devices of loopscale's range; every one is removed afterwards, even on failure."""
    loopscale.clean_leftovers()
    loops = loopscale.LoopScale()
    try:
        yield loops
    finally:
        try:
            loops.close()
        finally:
            loopscale.clean_leftovers()
    left = loopscale.present()
    assert not left, f"loop devices of the scale range left behind: {left[:10]} ({len(left)})"


def sysfs_dev(number: int) -> int:
    with open(f"/sys/block/loop{number}/dev") as f:
        major, minor = f.read().strip().split(":")
    return os.makedev(int(major), int(minor))


@pytest.mark.timeout(4 * STEP)
def test_ten_thousand_loop_devices_listed_completely_and_removed_completely(start_daemon, kubelet, scale_loops, say):
    daemon = start_daemon(loopscale.config())
    wait_until(lambda: kubelet.messages.get(RES, 0) >= 1 or daemon.proc.poll() is not None, timeout=30,
               what="the daemon's first ListAndWatch message")
    assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{daemon.log()}"
    assert kubelet.lists[RES] == {}, "no device of the scale range should exist before the test"

    wanted = {loopscale.name(n) for n in NUMBERS}
    seq = kubelet.messages[RES]
    first = scale_loops.add_many(NUMBERS)
    added = time.monotonic()
    complete = kubelet.wait_push(RES, seq, lambda p, listed: p.count == COUNT and set(listed) == wanted,
                                 timeout=STEP, what=f"all {COUNT} loop devices")
    say(f"{COUNT} adds took {added - first:.1f} s; complete list {complete.monotonic - added:.1f} s after the "
        f"last, {complete.seq - seq} pushes")
    listed = dict(kubelet.lists[RES])
    assert set(listed) == wanted
    unhealthy = sorted(i for i, h in listed.items() if h != "Healthy")
    assert not unhealthy, f"{len(unhealthy)} devices not Healthy: {unhealthy[:10]}"
    # Lists only grow while devices are added: none flickers out and back.
    during = [p for p in kubelet.since(RES, seq) if p.seq <= complete.seq]
    assert not [p for p in during if p.removed], "a device left the list during an add burst"

    # The nodes an allocation grants: each device's own /dev/loopN, the block device of loopN.
    granted: Dict[str, List[str]] = {}
    for i in range(0, COUNT, ALLOCATE_BATCH):
        ids = [loopscale.name(n) for n in NUMBERS[i:i + ALLOCATE_BATCH]]
        [answer] = kubelet.allocate(RES, ids, wait=STEP).container_responses
        for spec in answer.devices:
            granted.setdefault(spec.host_path, []).append(spec.container_path)
            assert spec.permissions == "rw", spec
    assert granted == {f"/dev/{loopscale.name(n)}": [f"/dev/{loopscale.name(n)}"] for n in NUMBERS}
    wrong = []
    for n in NUMBERS:
        st = os.stat(f"/dev/loop{n}")
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != sysfs_dev(n):
            wrong.append(n)
    assert not wrong, f"device nodes that are not their loop device's: {wrong[:10]}"

    seq = kubelet.messages[RES]
    first = time.monotonic()
    scale_loops.remove_many(NUMBERS)
    removed_at = time.monotonic()
    empty = kubelet.wait_push(RES, seq, lambda p, listed: p.count == 0, timeout=STEP,
                              what="every loop device removed")
    say(f"{COUNT} removals took {removed_at - first:.1f} s; empty list {empty.monotonic - removed_at:.1f} s "
        f"after the last, {empty.seq - seq} pushes")
    assert kubelet.lists[RES] == {}
    removed = set().union(*(p.removed for p in kubelet.since(RES, seq)))
    assert removed == wanted
    assert daemon.proc.poll() is None, f"daemon exited {daemon.proc.returncode}:\n{daemon.log()}"
