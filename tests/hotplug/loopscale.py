"""Thousands of real loop devices for the scale test and the benchmark (issue 13), created and removed
through /dev/loop-control (TESTING.md) while a real systemd-udevd handles their events.

Loop numbers 100000-199999 belong to this module (realudev.py owns 100-199): the resources under
test match ``loop1[0-9][0-9][0-9][0-9][0-9]``, six digits, so neither range sees the other's devices.

Safety:
- only numbers in our range are ever removed, and only devices without a backing file (a bound
  loop device is somebody's disk; LOOP_CTL_REMOVE would refuse it with EBUSY anyway);
- :class:`LoopScale` records a number before its LOOP_CTL_ADD, so :meth:`LoopScale.close` (and the
  context manager) removes whatever was created even when an add, a test or the benchmark failed
  half-way; :func:`clean_leftovers` removes what an interrupted earlier run left in our range;
- LOOP_CTL_REMOVE blocks 35-70 ms per device: removals run in parallel threads, each retrying on
  EBUSY (a udevd worker still has the device open) until a deadline.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Set

from tests.standin import StandInKubelet

LOOP_CONTROL = "/dev/loop-control"
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
FIRST, LAST = 100000, 199999  # the numbers this module owns
GLOB = "loop1[0-9][0-9][0-9][0-9][0-9]"
RESOURCE = "example.com/scale"
# Each LOOP_CTL_REMOVE waits for the kernel (RCU) on its own, so removals overlap well: 10,000 take ~95 s
# in one thread, ~9 s in 64 here; adds gain too (10,000 in ~6 s).
THREADS = 64
PUSHES_KEPT = 100000  # per resource, in LeanKubelet
EBUSY_DEADLINE = 30.0  # seconds one device may stay busy before its removal counts as failed


def config(resource: str = RESOURCE, plugin: str = "", extra: str = "") -> str:
    """A daemon config serving this module's loop devices (block disks) as ``resource``."""
    return (f"[plugin]\nlog_level = warning\nevents = stderr\n{plugin}\n"
            f"[resource {resource}]\nsubsystem = block\nkernel = {GLOB}\ndevtype = disk\n{extra}\n")


def name(number: int) -> str:
    return f"loop{number}"


def ours(number: int) -> bool:
    return FIRST <= number <= LAST


def unbound(number: int) -> bool:
    """The device exists and has no backing file (nobody's disk)."""
    base = f"/sys/block/loop{number}"
    return os.path.isdir(base) and not os.path.exists(f"{base}/loop/backing_file")


def present() -> List[int]:
    """The numbers of our range that exist now, sorted."""
    found = []
    for entry in os.listdir("/sys/block"):
        if entry.startswith("loop") and entry[4:].isdigit() and ours(int(entry[4:])):
            found.append(int(entry[4:]))
    return sorted(found)


class LoopScaleError(RuntimeError):
    pass


class LoopScale:
    """Creates and removes loop devices of our range; :meth:`close` removes every one it created."""

    def __init__(self) -> None:
        if not os.path.exists(LOOP_CONTROL):
            raise LoopScaleError(f"{LOOP_CONTROL} is missing: the loop module is not loaded (modprobe loop)")
        self.fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        self.created: Set[int] = set()
        self.lock = threading.Lock()

    def __enter__(self) -> LoopScale:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, number: int) -> float:
        """Create loop<number>; return time.monotonic() just before the ioctl (which sends the kernel's
        add uevent).  Recorded before the ioctl, so a failure in between still leaves it to close()."""
        if not ours(number):
            raise ValueError(f"loop{number}: outside this fixture's range {FIRST}-{LAST}")
        with self.lock:
            self.created.add(number)
        start = time.monotonic()
        try:
            fcntl.ioctl(self.fd, LOOP_CTL_ADD, number)
        except OSError as exc:
            if exc.errno == errno.EEXIST and unbound(number):
                return start  # a leftover of ours, unbound: use it
            with self.lock:
                self.created.discard(number)
            raise LoopScaleError(f"LOOP_CTL_ADD loop{number}: {exc}") from exc
        return start

    def add_many(self, numbers: Iterable[int], threads: int = THREADS) -> float:
        """Create them in ``threads`` parallel threads (each ioctl takes 1-3 ms, mostly waiting); return
        time.monotonic() before the first.  Every one is tried even when some fail, then the first
        failure is raised (what was created is in :attr:`created` for close())."""
        return self._parallel(self.add, numbers, threads, "created")

    def remove(self, number: int, deadline: Optional[float] = None) -> float:
        """Remove loop<number>, retrying while it is busy (EBUSY: a udevd worker has it open); return
        time.monotonic() just before the ioctl that succeeded (the uevent goes out, then it blocks)."""
        if not ours(number):
            raise ValueError(f"loop{number}: outside this fixture's range {FIRST}-{LAST}")
        deadline = deadline if deadline is not None else time.monotonic() + EBUSY_DEADLINE
        delay = 0.005
        while True:
            start = time.monotonic()
            try:
                fcntl.ioctl(self.fd, LOOP_CTL_REMOVE, number)
                break
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # already gone
                    break
                if exc.errno != errno.EBUSY:
                    raise LoopScaleError(f"LOOP_CTL_REMOVE loop{number}: {exc}") from exc
                if os.path.exists(f"/sys/block/loop{number}/loop/backing_file"):
                    raise LoopScaleError(f"loop{number} is bound to a backing file: not removing it") from exc
                if time.monotonic() > deadline:
                    raise LoopScaleError(f"LOOP_CTL_REMOVE loop{number}: still busy after "
                                         f"{EBUSY_DEADLINE:g} s") from exc
                time.sleep(delay)  # busy: back off (the holder is udevd's worker, not us)
                delay = min(delay * 2, 0.1)
        with self.lock:
            self.created.discard(number)
        return start

    def remove_many(self, numbers: Iterable[int], threads: int = THREADS) -> None:
        """Remove several in ``threads`` parallel threads (each ioctl blocks 35-70 ms); every one is
        tried even when some fail, then the first failure is raised."""
        todo = sorted(set(numbers))
        deadline = time.monotonic() + EBUSY_DEADLINE + len(todo) * 0.1 / max(1, threads)
        self._parallel(lambda n: self.remove(n, deadline), todo, threads, "removed")

    def _parallel(self, op: Callable[[int], float], numbers: Iterable[int], threads: int, done: str) -> float:
        todo = list(numbers)
        errors: List[BaseException] = []

        def worker(chunk: List[int]) -> None:
            for n in chunk:
                try:
                    op(n)
                except (OSError, LoopScaleError, ValueError) as exc:
                    errors.append(exc)

        first = time.monotonic()
        pool = [threading.Thread(target=worker, args=(todo[i::threads],), name=f"loop-{done}-{i}")
                for i in range(min(threads, len(todo)))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise LoopScaleError(f"{len(errors)} of {len(todo)} loop devices could not be {done}; "
                                 f"first: {errors[0]}")
        return first

    def close(self) -> None:
        """Remove every device this object created (and did not remove), then close loop-control."""
        if self.fd < 0:
            return
        try:
            with self.lock:
                left = sorted(self.created)
            self.remove_many(left)
        finally:
            os.close(self.fd)
            self.fd = -1


def clean_leftovers() -> int:
    """Remove the unbound devices of our range that an interrupted earlier run left; how many."""
    left = [n for n in present() if unbound(n)]
    if left:
        with LoopScale() as loops:
            loops.created.update(left)
    return len(left)


# --- a stand-in kubelet that keeps up with 10,000-device lists ------------------------------------

class Push(NamedTuple):
    """One ListAndWatch message, as :class:`LeanKubelet` keeps it: what changed, not the whole list."""

    seq: int  # 1 for the resource's first message
    monotonic: float  # time.monotonic() on receipt: when the message's last byte was read
    wall: float  # time.time() on receipt
    count: int  # devices in the list
    added: FrozenSet[str]  # IDs new since the previous message
    removed: FrozenSet[str]  # IDs gone since the previous message
    unhealthy: int  # devices not Healthy
    parsed: float  # time.monotonic() when the stand-in had parsed it (its own cost: 10,000 objects)


class LeanKubelet(StandInKubelet):
    """The tests' stand-in kubelet (same registration behaviours), keeping each resource's current list
    as ``lists[resource]`` (ID -> health) and each message as a :class:`Push` (a diff), instead of a
    deep copy of every message: at 10,000 devices a copy per message costs the test process
    gigabytes during a burst and holds up the stream it reads.  ``devices`` stays empty; ``NUMA``
    nodes are not kept.  ``register_arrivals`` has the monotonic time each Register arrived."""

    def __init__(self, directory: str, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.lists: Dict[str, Dict[str, str]] = {}
        self.pushes: Dict[str, Deque[Push]] = {}
        self.register_arrivals: List[float] = []

    def register(self, request: Any) -> Optional[str]:
        with self.cond:
            self.register_arrivals.append(time.monotonic())
            del self.register_arrivals[:-PUSHES_KEPT]
        return super().register(request)

    def _update(self, client: Any, devices: List[Any], arrived: Optional[float] = None) -> None:
        parsed = now = time.monotonic()
        wall = time.time()
        if arrived is not None:
            wall -= now - arrived
            now = arrived
        current = {d.ID: d.health for d in devices}
        with self.cond:
            before = self.lists.get(client.resource, {})
            self.lists[client.resource] = current
            self.devices.setdefault(client.resource, {})
            seq = self.messages[client.resource] = self.messages.get(client.resource, 0) + 1
            push = Push(seq, now, wall, len(current), frozenset(current.keys() - before.keys()),
                        frozenset(before.keys() - current.keys()),
                        sum(1 for h in current.values() if h != "Healthy"), parsed)
            self.pushes.setdefault(client.resource, deque(maxlen=PUSHES_KEPT)).append(push)
            self.cond.notify_all()

    def _mark_unhealthy(self, resource: str) -> None:
        listed = self.lists.get(resource)
        if listed:
            self.lists[resource] = dict.fromkeys(listed, "Unhealthy")

    def allocatable(self, resource: str) -> int:
        with self.cond:
            return sum(1 for h in self.lists.get(resource, {}).values() if h == "Healthy")

    def capacity(self, resource: str) -> int:
        with self.cond:
            return len(self.lists.get(resource, {}))

    def since(self, resource: str, after: int = 0) -> List[Push]:
        """The messages of ``resource`` after message number ``after``."""
        with self.cond:
            return self._after(resource, after)

    def _after(self, resource: str, after: int) -> List[Push]:
        out: List[Push] = []
        for p in reversed(self.pushes.get(resource, ())):  # newest first: stop at the first old one
            if p.seq <= after:
                break
            out.append(p)
        out.reverse()
        return out

    def wait_push(self, resource: str, after: int, predicate: Callable[[Push, Dict[str, str]], bool],
                  timeout: float, what: str) -> Push:
        """The first message after number ``after`` for which ``predicate(push, current list)`` holds
        (the list is the current one, so use it only for conditions that stay true); raises
        TimeoutError naming ``what``."""
        found: List[Push] = []

        def seen() -> bool:
            listed = self.lists.get(resource, {})
            found[:] = [p for p in self._after(resource, after) if predicate(p, listed)][:1]
            return bool(found)

        if not self.wait_for(seen, timeout):
            with self.cond:
                have = len(self.lists.get(resource, {}))
            raise TimeoutError(f"{resource}: no ListAndWatch message with {what} within {timeout:g} s "
                               f"(the last list has {have} devices)")
        return found[0]
