"""When each device's health_command runs: a due-time heap, a running set and a worker limit.

Pure bookkeeping over a clock; the daemon starts the commands.  What it guarantees:

- A check is never due while it runs: its next run is scheduled when it finishes
  (``interval`` after it started, or at once if it took longer than that), so a slow
  command can never make anything spin.
- At most ``workers`` checks run at once; :meth:`next_deadline` is None while every worker
  is busy, so the caller sleeps until a check finishes instead of polling.
- Falling behind is visible: a check that starts more than ``LATE_FRACTION`` of its
  interval after it was due counts as late, and :meth:`lagging` names the resources whose
  last checks were late (the daemon logs a WARNING on the transition and says so in STATUS).
- A check whose process could not be killed (abandoned, see commands.py) is held: it is not
  run again for that device until :meth:`release`, so stuck processes cannot pile up.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Dict, Hashable, List, Optional, Set, Tuple

# A check that starts this much of its interval (or more) after it was due is late.
LATE_FRACTION = 0.1
# A resource counts as lagging while at least this many of its recent starts were late ...
_LATE_RECENT = 3
# ... and as caught up again after this many on-time starts in a row.
_ON_TIME_RECOVER = 10


class _Check:
    __slots__ = ("key", "group", "interval", "due", "token", "started", "held")

    def __init__(self, key: Hashable, group: str, interval: float, due: float) -> None:
        self.key = key
        self.group = group  # the resource
        self.interval = interval
        self.due = due
        self.token = 0  # the heap entry that is current; older entries are skipped
        self.started: Optional[float] = None
        self.held = False


class _Lag:
    __slots__ = ("late", "on_time", "worst")

    def __init__(self) -> None:
        self.late = 0
        self.on_time = 0
        self.worst = 0.0  # seconds late, the largest of the current lagging spell


class Started:
    """A check :meth:`HealthScheduler.take_due` started, and how late it started (seconds)."""

    __slots__ = ("key", "late_by")

    def __init__(self, key: Hashable, late_by: float) -> None:
        self.key = key
        self.late_by = late_by

    def __repr__(self) -> str:
        return f"Started({self.key!r}, late_by={self.late_by!r})"


class HealthScheduler:
    def __init__(self, clock: Callable[[], float], workers: int = 8) -> None:
        self.clock = clock
        self.workers = workers
        self._checks: Dict[Hashable, _Check] = {}
        self._heap: List[Tuple[float, int, Hashable]] = []
        self._running: Set[Hashable] = set()
        self._seq = itertools.count()
        self._lag: Dict[str, _Lag] = {}
        self._lagging: Set[str] = set()
        self.late_total = 0
        self.runs_total = 0

    # --- what is checked --------------------------------------------------------------------

    def add(self, key: Hashable, group: str, interval: float, due: Optional[float] = None) -> None:
        """Check ``key`` every ``interval`` seconds, first at ``due`` (default: now)."""
        check = self._checks.get(key)
        when = self.clock() if due is None else due
        if check is None:
            check = self._checks[key] = _Check(key, group, interval, when)
        else:
            check.interval, check.group = interval, group
            check.due = min(check.due, when)
        if key not in self._running and not check.held:
            self._push(check)

    def remove(self, key: Hashable) -> None:
        """Stop checking ``key``; a run in progress is ignored when it finishes."""
        self._checks.pop(key, None)
        self._running.discard(key)

    def remove_group(self, group: str) -> None:
        for key in [k for k, c in self._checks.items() if c.group == group]:
            self.remove(key)
        self._lag.pop(group, None)
        self._lagging.discard(group)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._checks

    def __len__(self) -> int:
        return len(self._checks)

    # --- running ----------------------------------------------------------------------------

    def take_due(self) -> List[Started]:
        """The checks to start now (marked running), as many as there are free workers."""
        now = self.clock()
        out: List[Started] = []
        while self._heap and len(self._running) < self.workers:
            due, token, key = self._heap[0]
            check = self._checks.get(key)
            if check is None or check.token != token or key in self._running or check.held:
                heapq.heappop(self._heap)  # stale entry
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            self._running.add(key)
            check.started = now
            late_by = now - check.due
            self._note_start(check, late_by)
            out.append(Started(key, late_by))
        return out

    def finished(self, key: Hashable, hold: bool = False) -> None:
        """A run of ``key`` ended; ``hold``: its process is stuck, do not run it again until release()."""
        if key not in self._running:
            return
        self._running.discard(key)
        check = self._checks.get(key)
        if check is None:
            return
        now = self.clock()
        started = check.started if check.started is not None else now
        check.due = max(started + check.interval, now) if not hold else now
        check.held = hold
        if not hold:
            self._push(check)

    def release(self, key: Hashable) -> None:
        """A held check's process exited at last: schedule the check again."""
        check = self._checks.get(key)
        if check is not None and check.held:
            check.held = False
            check.due = min(check.due, self.clock())
            self._push(check)

    def held(self) -> List[Hashable]:
        return [k for k, c in self._checks.items() if c.held]

    def running(self) -> Set[Hashable]:
        return set(self._running)

    def next_deadline(self) -> Optional[float]:
        """When the next check is due; None while every worker is busy or nothing is scheduled."""
        if len(self._running) >= self.workers:
            return None
        while self._heap:
            due, token, key = self._heap[0]
            check = self._checks.get(key)
            if check is None or check.token != token or key in self._running or check.held:
                heapq.heappop(self._heap)
                continue
            return due
        return None

    # --- falling behind --------------------------------------------------------------------

    def _note_start(self, check: _Check, late_by: float) -> None:
        self.runs_total += 1
        lag = self._lag.setdefault(check.group, _Lag())
        if late_by > LATE_FRACTION * check.interval:
            self.late_total += 1
            lag.late += 1
            lag.on_time = 0
            lag.worst = max(lag.worst, late_by)
            if lag.late >= _LATE_RECENT:
                self._lagging.add(check.group)
        else:
            lag.on_time += 1
            if lag.on_time >= _ON_TIME_RECOVER:
                lag.late = 0
                lag.worst = 0.0
                self._lagging.discard(check.group)

    def lagging(self) -> Dict[str, float]:
        """Resources whose checks start late: resource -> the worst lateness seen, in seconds."""
        return {g: self._lag[g].worst for g in sorted(self._lagging)}

    def _push(self, check: _Check) -> None:
        check.token = next(self._seq)
        heapq.heappush(self._heap, (check.due, check.token, check.key))
        if len(self._heap) > 2 * len(self._checks) + 16:
            # Entries superseded by later pushes are dropped lazily; past this, rebuild at once.
            self._heap = [(c.due, c.token, c.key) for c in self._checks.values()
                          if c.key not in self._running and not c.held]
            heapq.heapify(self._heap)
