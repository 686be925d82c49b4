"""scheduler.py: health checks on a fake clock: due times, the worker limit, no spinning, falling behind."""

from __future__ import annotations

from typing import List

from udev_device_plugin.scheduler import HealthScheduler


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys(started) -> List[object]:
    return [s.key for s in started]


def test_a_check_is_due_at_once_then_every_interval_after_it_started():
    clock = Clock()
    s = HealthScheduler(clock, workers=4)
    s.add("a", "res", 2.0)
    assert keys(s.take_due()) == ["a"]
    assert s.next_deadline() is None  # running: not due again while it runs
    clock.now = 0.5
    s.finished("a")
    assert s.next_deadline() == 2.0
    clock.now = 1.9
    assert s.take_due() == []
    clock.now = 2.0
    assert keys(s.take_due()) == ["a"]


def test_a_check_slower_than_its_interval_never_makes_anything_spin():
    """The bug of the old loop: a check due while it still ran made the loop wake at once, forever."""
    clock = Clock()
    s = HealthScheduler(clock, workers=4)
    s.add("slow", "res", 1.0)
    s.take_due()
    for t in (1.0, 2.0, 2.9):  # it runs 3x its interval
        clock.now = t
        assert s.take_due() == [] and s.next_deadline() is None
    clock.now = 3.0
    s.finished("slow")
    assert s.next_deadline() == 3.0  # due again now (it took longer than its interval), once
    assert keys(s.take_due()) == ["slow"]
    assert s.next_deadline() is None


def test_the_worker_limit_holds_and_no_deadline_while_every_worker_is_busy():
    clock = Clock()
    s = HealthScheduler(clock, workers=2)
    for k in "abcde":
        s.add(k, "res", 10.0)
    assert len(s.take_due()) == 2
    assert s.next_deadline() is None  # sleep until a check finishes, do not poll
    assert s.take_due() == []
    first = next(iter(s.running()))
    s.finished(first)
    assert s.next_deadline() == 0.0
    assert len(s.take_due()) == 1
    assert len(s.running()) == 2


def test_falling_behind_is_reported_and_recovery_too():
    clock = Clock()
    s = HealthScheduler(clock, workers=1)
    for k in range(4):
        s.add(k, "res", 1.0)
    # One worker, four 1 s checks of 1 s each: every check starts late.
    for _ in range(8):
        for started in s.take_due():
            clock.now += 1.0
            s.finished(started.key)
    assert "res" in s.lagging() and s.lagging()["res"] >= 1.0
    assert s.late_total >= 3
    s.workers = 8
    for _ in range(20):
        clock.now += 1.0
        for started in s.take_due():
            s.finished(started.key)
    assert s.lagging() == {}


def test_on_time_checks_are_not_lagging():
    clock = Clock()
    s = HealthScheduler(clock, workers=8)
    for k in range(5):
        s.add(k, "res", 2.0)
    for _ in range(10):
        for started in s.take_due():
            assert started.late_by == 0.0
            s.finished(started.key)
        clock.now = s.next_deadline() or clock.now
    assert s.lagging() == {} and s.late_total == 0


def test_a_held_check_is_not_run_again_until_released():
    """Its process did not die after SIGKILL: another run would only pile up stuck processes."""
    clock = Clock()
    s = HealthScheduler(clock, workers=4)
    s.add("d", "res", 1.0)
    s.take_due()
    clock.now = 2.0
    s.finished("d", hold=True)
    assert s.held() == ["d"]
    clock.now = 100.0
    assert s.take_due() == [] and s.next_deadline() is None
    s.release("d")
    assert keys(s.take_due()) == ["d"]


def test_removed_while_running_is_forgotten():
    clock = Clock()
    s = HealthScheduler(clock, workers=4)
    s.add("x", "res", 1.0)
    s.take_due()
    s.remove("x")
    s.finished("x")
    assert s.next_deadline() is None and "x" not in s
    s.add("y", "other", 1.0)
    s.add("z", "other", 1.0)
    s.remove_group("other")
    assert len(s) == 0 and s.take_due() == []


def test_the_heap_stays_bounded_under_re_adds():
    clock = Clock()
    s = HealthScheduler(clock, workers=4)
    for i in range(10000):
        s.add("k", "res", 1.0, due=float(i % 7))
        assert len(s._heap) <= 2 * len(s) + 16
    clock.now = 10.0
    assert keys(s.take_due()) == ["k"]
    assert s.next_deadline() is None
