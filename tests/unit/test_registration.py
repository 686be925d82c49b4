"""registration.py: the state machine of one resource's registration, with a fake clock and a fake kubelet."""

from __future__ import annotations

import itertools
import logging
from typing import List, Optional

import pytest

from udev_device_plugin import registration as r
from udev_device_plugin.registration import State

K1 = (1, 100, 1)  # kubelet.sock: dev, inode, creations seen
K2 = (1, 101, 2)


class World:
    """The outside of one registration: a clock, the kubelet.sock there now, socket numbers."""

    def __init__(self, kubelet: Optional[tuple] = K1) -> None:
        self.now = 1000.0
        self.kubelet = kubelet
        self.problem = ""
        self._numbers = itertools.count(1)
        self.reg = r.Registration("example.com/fpga", since=self.now)
        self.log: List[r.Log] = []

    def step(self, event: r.Event) -> List[r.Action]:
        env = r.Env(now=self.now, kubelet=self.kubelet, next_endpoint=lambda: next(self._numbers),
                    directory_problem=self.problem, backoff_max=10.0)
        actions = r.step(self.reg, event, env)
        self.log.extend(a for a in actions if isinstance(a, r.Log))
        return [a for a in actions if not isinstance(a, r.Log)]

    def advance(self, seconds: float) -> List[r.Action]:
        self.now += seconds
        return self.step(r.Tick())

    def registered(self, stream: int = 1) -> None:
        """Start -> Register -> answer -> stream: the usual way in."""
        assert self.step(r.Start()) == [r.Serve(1), r.Register(1, 1)]
        assert self.step(r.Answered(1, True)) == []
        assert self.reg.state is State.CONNECTING
        assert self.step(r.StreamOpened(1, stream)) == []
        assert self.reg.state is State.REGISTERED and self.reg.reason == ""


def test_without_a_kubelet_it_serves_and_waits():
    w = World(kubelet=None)
    assert w.step(r.Start()) == [r.Serve(1)]
    assert w.reg.state is State.WAITING and "kubelet.sock" in w.reg.reason
    # kubelet.sock appears: the socket served (never offered) is the one registered.
    w.kubelet = K1
    assert w.step(r.KubeletAppeared(K1)) == [r.Register(1, 2)]
    assert w.reg.state is State.REGISTERING


def test_registered_only_once_the_stream_is_there():
    w = World()
    w.registered()
    assert w.reg.registrations == 1 and w.reg.stream == 1 and w.reg.stream_since == w.now


def test_a_stream_opened_before_the_answer_counts_when_the_answer_comes():
    """Kubelets 1.25+ dial during Register; their stream can open before our answer is handled."""
    w = World()
    w.step(r.Start())
    assert w.step(r.StreamOpened(1, 7)) == []
    assert w.reg.state is State.REGISTERING
    w.step(r.Answered(1, True))
    assert w.reg.state is State.REGISTERED and w.reg.stream == 7


def test_a_stream_on_another_socket_proves_nothing():
    w = World()
    w.step(r.Start())
    w.step(r.Answered(1, True))
    w.step(r.StreamOpened(99, 3))
    assert w.reg.state is State.CONNECTING


def test_the_kubelet_ending_the_stream_means_register_again_on_a_fresh_socket():
    w = World()
    w.registered()
    # No new Register until the kubelet has closed the old connection: its clean-up of the old client
    # (keyed by resource name on 1.25-1.35) would otherwise disconnect the new one (kubernetes#121994).
    assert w.step(r.StreamEnded(1, 1, by_us=False, why="cancelled")) == [r.WatchDrain(1)]
    assert w.reg.state is State.DRAINING and not w.reg.registered
    assert "the kubelet ended the ListAndWatch stream" in w.reg.reason
    assert w.log[-1].level == logging.WARNING and "registering again on a fresh socket" in w.log[-1].message
    assert w.reg.streams_lost == 1
    assert w.step(r.Drained(1)) == []  # closed at once; the backoff still holds
    assert w.reg.state is State.BACKOFF
    assert w.advance(0.01) == []  # not yet
    assert w.advance(0.02) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]


def test_after_a_lost_stream_the_wait_for_the_old_connection_is_bounded():
    w = World()
    w.registered()
    w.step(r.StreamEnded(1, 1, by_us=False))
    assert w.advance(0.5) == []
    assert w.advance(r.DRAIN_TIMEOUT - 0.5) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]


def test_a_stream_dropped_before_the_answer_is_a_lost_stream():
    """1.25-1.35: the old client's late clean-up disconnects the new client while Register is answered."""
    w = World()
    w.step(r.Start())
    w.step(r.StreamOpened(1, 5))
    w.step(r.StreamEnded(1, 5, by_us=False))
    assert w.step(r.Answered(1, True)) == [r.WatchDrain(1)]
    assert w.reg.state is State.DRAINING and w.reg.streams_lost == 1


def test_the_kubelet_that_accepts_but_never_dials_is_registered_with_again():
    """Kubelet 1.20 answers Register before it dials, and only logs a failed dial."""
    w = World()
    w.step(r.Start())
    w.step(r.Answered(1, True))
    assert w.advance(r.STREAM_TIMEOUT - 1) == []
    assert w.advance(1.0) == []
    assert w.reg.state is State.BACKOFF and "opened no ListAndWatch stream" in w.reg.reason
    assert w.advance(0.02) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]


def test_register_failures_back_off_doubling_up_to_the_maximum():
    w = World()
    w.step(r.Start())
    delays = []
    attempt = 1
    for _ in range(12):
        w.step(r.Answered(attempt, False, "UNAVAILABLE: nobody there"))
        assert w.reg.state is State.BACKOFF
        assert w.reg.deadline is not None
        delays.append(round(w.reg.deadline - w.now, 3))
        actions = w.advance(w.reg.deadline - w.now)
        attempt = actions[-1].attempt  # type: ignore[union-attr]
    assert delays[:4] == [0.02, 0.04, 0.08, 0.16]
    assert max(delays) == 10.0 and delays[-1] == 10.0
    # One problem, said once as a WARNING; its quick retries are INFO; at the maximum backoff each is said.
    levels = [(entry.level, round(float(entry.message.rsplit(" in ", 1)[1].split()[0]), 2)) for entry in w.log
              if "Register failed" in entry.message]
    assert levels[0] == (logging.WARNING, 0.02)
    assert all(level == logging.INFO for level, delay in levels[1:] if delay < 10.0)
    assert [level for level, delay in levels if delay == 10.0] == [logging.WARNING] * 3


def test_a_register_failure_is_a_warning_again_when_its_reason_changes_or_after_a_registration():
    w = World()
    w.step(r.Start())

    def fail(why: str) -> int:
        w.step(r.Answered(w.reg.attempt, False, why))
        level = w.log[-1].level
        w.advance(w.reg.deadline - w.now)
        return level

    assert [fail("UNKNOWN: the kubelet is stopping") for _ in range(3)] == [logging.WARNING] + [logging.INFO] * 2
    assert fail("UNAVAILABLE: nobody there") == logging.WARNING
    w.step(r.Answered(w.reg.attempt, True))
    w.step(r.StreamOpened(w.reg.endpoint, 5))
    assert w.reg.registered
    w.kubelet = K2
    w.step(r.KubeletAppeared(K2))  # a restarted kubelet; its stream ends, registering again fails alike
    w.step(r.StreamEnded(w.reg.endpoint, 5, by_us=False))
    w.step(r.Drained(w.reg.endpoint))
    while w.reg.state is not State.REGISTERING:
        w.advance(0.5)
    assert fail("UNAVAILABLE: nobody there") == logging.WARNING


def test_an_answer_to_an_older_attempt_is_ignored():
    """The socket it named was replaced meanwhile: the new, never-offered one must not count as registered."""
    w = World()
    w.step(r.Start())
    w.step(r.SocketGone(1))  # our socket deleted while Register 1 was under way
    assert w.reg.attempt == 2
    assert w.step(r.Answered(1, True)) == []
    assert w.reg.state is State.REGISTERING and w.reg.registrations == 0


def test_sigusr1_is_a_no_op_while_registered_with_the_kubelet_there():
    w = World()
    w.registered()
    # A chmod or restorecon of kubelet.sock does not change its identity.
    assert w.step(r.Verify()) == []
    assert w.step(r.KubeletAppeared(K1)) == []
    assert w.reg.state is State.REGISTERED and w.reg.registrations == 1


def test_a_new_kubelet_with_a_live_stream_drains_it_first():
    """kubernetes#121994: the old stream must be gone before the new Register."""
    w = World()
    w.registered()
    w.kubelet = K2
    assert w.step(r.KubeletAppeared(K2)) == [r.EndStreams(1)]
    assert w.reg.state is State.DRAINING
    # A second request while draining changes nothing.
    assert w.step(r.Verify()) == []
    assert w.step(r.StreamEnded(1, 1, by_us=True)) == []
    assert w.reg.state is State.DRAINING
    assert w.step(r.Drained(1)) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]
    assert w.reg.kubelet == K2


def test_draining_is_bounded():
    w = World()
    w.registered()
    assert w.step(r.Reregister("the options changed")) == [r.EndStreams(1)]
    assert w.advance(r.DRAIN_TIMEOUT) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]


def test_reregister_when_waiting_does_nothing():
    w = World(kubelet=None)
    w.step(r.Start())
    assert w.step(r.Reregister("the options changed")) == []


def test_our_socket_removed_while_registered():
    """A kubelet restart deletes our socket: serve on a new one, register with the kubelet there."""
    w = World()
    w.registered()
    w.kubelet = K2
    assert w.step(r.SocketGone(1)) == [r.Retire(1), r.Serve(2), r.Register(2, 2)]
    # ... and the new kubelet.sock that follows changes nothing: that kubelet is being registered with.
    assert w.step(r.KubeletAppeared(K2)) == []


def test_the_kubelet_going_away_while_registering():
    w = World()
    w.step(r.Start())
    w.kubelet = None
    assert w.step(r.KubeletGone()) == []
    assert w.reg.state is State.WAITING
    assert w.step(r.Answered(1, True)) == []  # for the kubelet that left
    assert w.reg.state is State.WAITING
    w.kubelet = K2
    # The offered socket is never offered again.
    assert w.step(r.KubeletAppeared(K2)) == [r.Serve(2), r.Retire(1), r.Register(2, 3)]


def test_kubelet_sock_removed_while_the_stream_lives_keeps_the_registration():
    """The newest kubelets recreate kubelet.sock when their serve fails, keeping their streams."""
    w = World()
    w.registered()
    w.kubelet = None
    assert w.step(r.KubeletGone()) == []
    assert w.reg.state is State.REGISTERED


def test_directory_lost_and_back():
    w = World()
    w.registered()
    w.problem = "socket directory: /var/lib/kubelet/device-plugins was moved away"
    w.kubelet = None
    assert w.step(r.DirectoryLost(w.problem)) == [r.Retire(1)]
    assert w.reg.state is State.WAITING and w.reg.reason == w.problem
    w.problem = ""
    assert w.step(r.DirectoryBack()) == [r.Serve(2)]  # no kubelet.sock there yet
    w.kubelet = K2
    assert w.step(r.KubeletAppeared(K2)) == [r.Register(2, 5)]


def test_serve_failure_backs_off():
    w = World()
    w.step(r.Start())
    assert w.step(r.ServeFailed(1, "No space left on device")) == []
    assert w.reg.state is State.BACKOFF and "cannot serve" in w.reg.reason
    assert w.log[-1].level == logging.ERROR
    assert w.advance(0.02) == [r.Serve(2), r.Register(2, 2)]


@pytest.mark.parametrize("held, first_delay", [(1.0, 0.04), (r.STABLE_AFTER, 0.02)])
def test_backoff_starts_afresh_after_a_stream_that_held(held, first_delay):
    w = World()
    w.registered()
    w.step(r.StreamEnded(1, 1, by_us=False))
    w.step(r.Drained(1))
    w.advance(0.02)
    w.step(r.Answered(2, True))
    w.step(r.StreamOpened(2, 2))
    w.now += held
    w.step(r.StreamEnded(2, 2, by_us=False))
    assert round(w.reg.retry_at - w.now, 3) == first_delay


def test_a_stream_we_ended_is_not_a_loss_but_is_no_registration_either():
    w = World()
    w.registered()
    assert w.step(r.StreamEnded(1, 1, by_us=True)) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]
    assert w.reg.streams_lost == 0 and w.reg.state is State.REGISTERING


def test_a_lost_stream_with_the_kubelet_gone_ends_waiting():
    """The kubelet stopped: its stream ended, then kubelet.sock went.  Once the drain is over the
    resource waits, on a fresh socket, and says so (it was stuck 'draining' forever once)."""
    w = World()
    w.registered()
    w.step(r.StreamEnded(1, 1, by_us=False))
    w.kubelet = None
    assert w.step(r.KubeletGone()) == []
    assert w.advance(r.DRAIN_TIMEOUT) == [r.Retire(1), r.Serve(2)]
    assert w.reg.state is State.WAITING and "kubelet.sock" in w.reg.reason
    w.kubelet = K2
    assert w.step(r.KubeletAppeared(K2)) == [r.Register(2, 3)]


# --- the plugin watcher path (registration = plugin-watcher | both) ------------------------------------

class WatcherWorld(World):
    def __init__(self, kubelet: Optional[tuple] = K1, paths=(r.PLUGIN_WATCHER,)) -> None:
        super().__init__(kubelet)
        self.paths = paths
        self.registry_problem = ""

    def step(self, event: r.Event) -> List[r.Action]:
        env = r.Env(now=self.now, kubelet=self.kubelet, next_endpoint=lambda: next(self._numbers),
                    directory_problem=self.problem, backoff_max=10.0, paths=self.paths,
                    registry_problem=self.registry_problem, fallback_timeout=15.0)
        actions = r.step(self.reg, event, env)
        self.log.extend(a for a in actions if isinstance(a, r.Log))
        return [a for a in actions if not isinstance(a, r.Log)]


def test_watcher_offers_a_socket_and_is_registered_when_the_watcher_says_so():
    w = WatcherWorld(kubelet=None)  # kubelet.sock does not matter on this path
    assert w.step(r.Start()) == [r.Serve(1, r.PLUGIN_WATCHER), r.Offer(1, 1)]
    assert w.reg.state is State.REGISTERING and "plugins_registry" in w.reg.reason and w.reg.deadline is None
    assert w.step(r.InfoRequested(1)) == []
    assert w.step(r.StreamOpened(1, 4)) == []  # RegisterPlugin dials and streams before Notify
    assert w.step(r.Answered(1, True)) == []
    assert w.reg.state is State.REGISTERED and w.reg.via == r.PLUGIN_WATCHER and w.reg.registrations == 1


def test_watcher_failure_offers_a_fresh_socket_removing_the_old_first():
    """Removing the old socket makes the kubelet deregister the name: it must go before the new one."""
    w = WatcherWorld()
    w.step(r.Start())
    w.step(r.InfoRequested(1))
    assert w.step(r.Answered(1, False, "plugin registration failed")) == []
    assert w.reg.state is State.BACKOFF and "plugin watcher reported the registration failed" in w.reg.reason
    assert w.advance(0.02) == [r.Retire(1), r.Serve(2, r.PLUGIN_WATCHER), r.Offer(2, 2)]


def test_watcher_lost_stream_reoffers_after_the_drain():
    w = WatcherWorld()
    w.step(r.Start())
    w.step(r.Answered(1, True))
    w.step(r.StreamOpened(1, 1))
    assert w.reg.registered
    assert w.step(r.StreamEnded(1, 1, by_us=False)) == [r.WatchDrain(1)]
    assert w.step(r.Drained(1)) == []
    assert w.advance(0.02) == [r.Retire(1), r.Serve(2, r.PLUGIN_WATCHER), r.Offer(2, 2)]


def test_watcher_a_restarted_kubelet_finding_the_socket_again_is_taken_as_its_registration():
    w = WatcherWorld()
    w.step(r.Start())
    w.step(r.Answered(1, True))
    w.step(r.StreamOpened(1, 1))
    w.step(r.StreamEnded(1, 1, by_us=False))
    # The new kubelet's watcher found our socket before we replaced it.
    assert w.step(r.InfoRequested(1)) == [r.Offer(1, 2)]
    assert w.reg.state is State.REGISTERING
    w.step(r.Answered(2, True))
    w.step(r.StreamOpened(1, 2))
    assert w.reg.registered and w.reg.endpoint == 1


def test_watcher_ignores_kubelet_sock_and_sigusr1_while_offered():
    w = WatcherWorld()
    w.step(r.Start())
    w.kubelet = K2
    assert w.step(r.KubeletAppeared(K2)) == []
    assert w.step(r.KubeletGone()) == [] and w.step(r.Verify()) == []
    assert w.reg.state is State.REGISTERING


def test_watcher_socket_removed_is_served_again():
    w = WatcherWorld()
    w.step(r.Start())
    assert w.step(r.SocketGone(1)) == [r.Retire(1), r.Serve(2, r.PLUGIN_WATCHER), r.Offer(2, 2)]


def test_both_falls_back_to_kubelet_sock_when_the_watcher_never_asks():
    w = WatcherWorld(paths=(r.PLUGIN_WATCHER, r.KUBELET_SOCKET_PATH))
    assert w.step(r.Start()) == [r.Serve(1, r.PLUGIN_WATCHER), r.Offer(1, 1)]
    assert w.advance(14.0) == []
    assert w.advance(1.0) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]
    assert w.reg.via == r.KUBELET_SOCKET_PATH and w.reg.fallback
    assert w.log[-1].level == logging.WARNING and "registering through kubelet.sock instead" in w.log[-1].message


def test_both_uses_kubelet_sock_while_plugins_registry_is_unusable():
    w = WatcherWorld(paths=(r.PLUGIN_WATCHER, r.KUBELET_SOCKET_PATH))
    w.registry_problem = "/var/lib/kubelet/plugins_registry is a regular file, not a directory"
    assert w.step(r.Start()) == [r.Serve(1), r.Register(1, 1)]
    assert w.reg.via == r.KUBELET_SOCKET_PATH


def test_watcher_only_waits_while_plugins_registry_is_unusable():
    w = WatcherWorld()
    w.registry_problem = "plugins_registry directory: /x does not exist"
    assert w.step(r.Start()) == []
    assert w.reg.state is State.WAITING and w.reg.reason == w.registry_problem
    w.registry_problem = ""
    assert w.step(r.DirectoryBack(r.PLUGIN_WATCHER)) == [r.Serve(1, r.PLUGIN_WATCHER), r.Offer(1, 2)]


# --- a kubelet that stops answering (KubeletSilent / KubeletAnswers) ---------------------------------

def stalled(w: World) -> None:
    w.registered()
    assert w.step(r.KubeletSilent("the kubelet has not answered on kubelet.sock for 10 s")) == []
    assert w.reg.state is State.STALLED and not w.reg.registered
    assert w.reg.reason.startswith("the kubelet has not answered") and "once the kubelet answers" in w.reg.reason


def test_a_silent_kubelet_stalls_the_registration_and_its_answer_restores_it():
    w = World()
    stalled(w)
    assert w.reg.stream == 1 and w.reg.endpoint == 1  # the stream and the socket are kept
    w.now += 60
    assert w.step(r.KubeletAnswers()) == []
    assert w.reg.state is State.REGISTERED and w.reg.registered and w.reg.reason == ""
    assert w.reg.registrations == 1 and w.reg.streams_lost == 0 and w.reg.stream_since == 1000.0


def test_silence_and_answers_change_nothing_outside_a_live_stream():
    w = World()
    w.step(r.Start())
    w.step(r.Answered(1, True))
    assert w.reg.state is State.CONNECTING
    assert w.step(r.KubeletSilent("silent")) == [] and w.reg.state is State.CONNECTING
    assert w.step(r.KubeletAnswers()) == [] and w.reg.state is State.CONNECTING
    w2 = World()
    w2.registered()
    assert w2.step(r.KubeletAnswers()) == [] and w2.reg.state is State.REGISTERED


def test_a_stream_ended_while_stalled_is_lost_as_any_other():
    w = World()
    stalled(w)
    assert w.step(r.StreamEnded(1, 1, by_us=False, why="the connection was closed")) == [r.WatchDrain(1)]
    assert w.reg.state is State.DRAINING and w.reg.streams_lost == 1
    # An answer now (the kubelet that came back is a new one) does not bring the old registration back.
    assert w.step(r.KubeletAnswers()) == [] and w.reg.state is State.DRAINING


def test_while_stalled_a_new_kubelet_is_registered_with_after_the_drain():
    w = World()
    stalled(w)
    w.kubelet = K2
    assert w.step(r.KubeletAppeared(K2)) == [r.EndStreams(1)]
    assert w.reg.state is State.DRAINING


def test_while_stalled_the_same_kubelet_and_sigusr1_change_nothing():
    w = World()
    stalled(w)
    assert w.step(r.KubeletAppeared(K1)) == [] and w.reg.state is State.STALLED
    assert w.step(r.Verify()) == [] and w.reg.state is State.STALLED
    assert w.step(r.KubeletGone()) == [] and w.reg.state is State.STALLED  # the stream decides


def test_while_stalled_our_socket_removed_or_options_changed_register_again():
    w = World()
    stalled(w)
    assert w.step(r.SocketGone(1)) == [r.Retire(1), r.Serve(2), r.Register(2, 2)]
    assert any("our socket was removed" in entry.message for entry in w.log)
    w2 = World()
    stalled(w2)
    assert w2.step(r.Reregister("the options changed")) == [r.EndStreams(1)]
    assert w2.reg.state is State.DRAINING
    # Our end of the stream closed (not by a drain or a retirement): no stream, no registration.
    w3 = World()
    stalled(w3)
    assert w3.step(r.StreamEnded(1, 1, by_us=True)) == [r.Serve(2), r.Retire(1), r.Register(2, 2)]
    assert w3.reg.state is State.REGISTERING
