"""The registration of one resource with the kubelet, as a state machine.

Pure: no sockets, no gRPC, no clock of its own.  :func:`step` takes the resource's
:class:`Registration`, one input event and what is true now (:class:`Env`), updates the
registration and returns the actions the driver (kubelet.py) carries out.  Every question
"what happens when ..." has its answer in one branch of :func:`step`.

What the kubelet does that shapes it (KUBELET.md):

- Only a ListAndWatch stream opened on the socket we registered proves the kubelet has us.
  Old kubelets (1.20) answer Register before they dial and only log a failed dial; when a
  stream ends the kubelet never reconnects.  So a resource is REGISTERED only while that
  stream lives; CONNECTING waits for it (bounded by ``stream_timeout``), and a stream the
  kubelet ends sends us back to register again, on a fresh socket, with backoff.
- Every Register names a socket file no kubelet has seen (new kubelets refuse a path they
  hold; old ones break), so a registration that was offered is never offered again.
- Kubelets 1.25 to 1.35 key their clients by resource name, and when an old client's
  stream ends its cleanup disconnects whichever client holds the name *now*
  (kubernetes#121994).  So a re-registration while a stream is live first ends that stream
  and waits until the kubelet has closed the old connection (DRAINING, bounded by
  ``drain_timeout``); only then does the new Register go out.  Needless re-registrations
  are avoided altogether: the kubelet is identified by kubelet.sock's inode and the create
  events seen, which a chmod does not change.
- A kubelet can hang without closing anything (SIGSTOP, a frozen cgroup, a paused VM, a
  deadlock): its stream stays open but nobody reads it.  The driver checks every
  ``kubelet_keepalive`` seconds that the kubelet answers on kubelet.sock; while it does not, a
  registered resource is STALLED (not registered, its stream kept), and REGISTERED again as soon
  as the kubelet answers: a kubelet that was only paused has lost nothing, and registering
  again would only churn its device manager.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Callable, List, Optional, Tuple, Union


class _Value:
    """A small immutable value (the events and actions below): its fields are its class's annotations,
    defaults the class attributes.  Not a dataclass: dataclasses generate and compile code for every
    class at import, which for the two dozen here cost the daemon's start more than all the rest."""

    _fields: Tuple[str, ...] = ()

    def __init_subclass__(cls) -> None:
        cls._fields = tuple(cls.__dict__.get("__annotations__", {}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes {len(self._fields)} arguments")
        for name, value in zip(self._fields, args):
            object.__setattr__(self, name, value)
        for name, value in kwargs.items():
            if name not in self._fields or name in self.__dict__:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated argument {name!r}")
            object.__setattr__(self, name, value)
        for name in self._fields:
            if name not in self.__dict__ and not hasattr(type(self), name):
                raise TypeError(f"{type(self).__name__}: missing argument {name!r}")

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self._fields)})"


FIRST_RETRY = 0.02
# A kubelet that dials within its own 10 s timeout opens the stream well within this.
STREAM_TIMEOUT = 15.0
# How long to wait for the kubelet to close an ended stream's connection before registering
# anyway (the kubelet closes it within milliseconds; a local client may hold it longer).
DRAIN_TIMEOUT = 1.0
# A stream that lived this long was a success: the next failure starts the backoff afresh.
STABLE_AFTER = 30.0

# st_dev, st_ino of kubelet.sock and how many times we saw it created: a chmod moves none.
KubeletId = Tuple[int, int, int]

# The two ways to register: Register on kubelet.sock, or a socket in plugins_registry that the
# kubelet's plugin watcher finds (it calls GetInfo, registers, then NotifyRegistrationStatus).
KUBELET_SOCKET_PATH = "kubelet-socket"
PLUGIN_WATCHER = "plugin-watcher"


class State(enum.Enum):
    WAITING = "waiting for the kubelet"
    REGISTERING = "registering"
    CONNECTING = "registered, waiting for the kubelet's ListAndWatch stream"
    REGISTERED = "registered"
    STALLED = "registered, but the kubelet does not answer"
    DRAINING = "ending the old stream before registering again"
    BACKOFF = "not registered, retrying"


class Registration:
    """One resource's registration: what :func:`step` reads and changes."""

    def __init__(self, resource: str, since: float = 0.0) -> None:
        self.resource = resource
        self.state = State.WAITING
        self.endpoint = 0  # the sequence number of the socket we serve now; 0: none
        self.offered = False  # that socket was named in a Register already
        self.kubelet: Optional[KubeletId] = None  # the kubelet the registration is for
        self.attempt = 0  # answers to older attempts are ignored
        self.stream: Optional[int] = None  # the kubelet's ListAndWatch stream on ``endpoint``
        self.early_stream: Optional[int] = None  # a stream opened before Register was answered
        self.since = since  # when ``state`` was entered
        self.stream_since: Optional[float] = None
        self.deadline: Optional[float] = None  # when Tick is due (retry, stream wait, drain)
        self.backoff = FIRST_RETRY
        self.reason = "starting"  # why it is not registered (empty when it is)
        self.registrations = 0  # Register calls the kubelet accepted
        self.streams_lost = 0  # streams the kubelet ended
        self.draining = 0  # the endpoint whose stream is being ended
        self.retry_at = 0.0  # after a lost stream: no new Register before this (the backoff)
        self.early_lost = False  # a stream opened before Register's answer ended before it
        self.via = ""  # the way the current registration goes: KUBELET_SOCKET_PATH or PLUGIN_WATCHER
        self.fallback = False  # registration = both: the plugin watcher did not take our socket
        self.info_seen = False  # the plugin watcher asked GetInfo of the socket offered now
        self.failed = ""  # why the last attempt failed, until one succeeds (a repeat is logged quieter)

    def __repr__(self) -> str:
        return f"Registration({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    @property
    def registered(self) -> bool:
        return self.state is State.REGISTERED


# --- inputs ---------------------------------------------------------------------------------

class Start(_Value):
    """The resource is to be served (daemon start, or added by a reload)."""


class KubeletAppeared(_Value):
    """kubelet.sock exists with this identity (created, or found)."""

    kubelet: KubeletId


class KubeletGone(_Value):
    """kubelet.sock was removed."""


class SocketGone(_Value):
    """Our socket file of ``endpoint`` was removed (a kubelet restart's clean-up, or an admin)."""

    endpoint: int


class DirectoryLost(_Value):
    """A socket directory (``via``'s) was removed, renamed or replaced; ``why`` says which."""

    why: str
    via: str = KUBELET_SOCKET_PATH


class DirectoryBack(_Value):
    """A real socket directory is at the configured path again."""

    via: str = KUBELET_SOCKET_PATH


class InfoRequested(_Value):
    """The kubelet's plugin watcher asked GetInfo of our socket ``endpoint``."""

    endpoint: int


class ServeFailed(_Value):
    endpoint: int
    why: str


class Answered(_Value):
    """The kubelet answered Register ``attempt``."""

    attempt: int
    ok: bool
    why: str = ""


class StreamOpened(_Value):
    endpoint: int
    stream: int


class StreamEnded(_Value):
    endpoint: int
    stream: int
    by_us: bool  # we ended it (retiring or draining the socket)
    why: str = ""


class Drained(_Value):
    """The kubelet has closed every connection to the socket being drained."""

    endpoint: int


class Tick(_Value):
    """``deadline`` has passed."""


class Verify(_Value):
    """SIGUSR1 (the path unit): register again unless registered with the kubelet there now."""


class Reregister(_Value):
    """What the kubelet read at registration changed (the options): register again."""

    why: str


class KubeletSilent(_Value):
    """The kubelet did not answer on kubelet.sock in time (``why`` says how long): it hangs."""

    why: str


class KubeletAnswers(_Value):
    """The kubelet answers on kubelet.sock (again)."""


Event = Union[Start, KubeletAppeared, KubeletGone, SocketGone, DirectoryLost, DirectoryBack, InfoRequested,
              ServeFailed, Answered, StreamOpened, StreamEnded, Drained, Tick, Verify, Reregister, KubeletSilent,
              KubeletAnswers]


# --- outputs --------------------------------------------------------------------------------

class Serve(_Value):
    """Serve the resource on a fresh socket numbered ``endpoint``: in the kubelet's socket directory,
    or (``via`` PLUGIN_WATCHER) in plugins_registry, where the socket is the offer itself."""

    endpoint: int
    via: str = KUBELET_SOCKET_PATH


class Retire(_Value):
    """Stop serving ``endpoint`` (its streams end) and remove its socket file."""

    endpoint: int


class EndStreams(_Value):
    """End the streams of ``endpoint`` but keep listening, to see the kubelet close its connection."""

    endpoint: int


class WatchDrain(_Value):
    """Tell (Drained) when the kubelet has closed its connections to ``endpoint``; the socket serves on."""

    endpoint: int


class Register(_Value):
    endpoint: int
    attempt: int


class Offer(_Value):
    """The socket ``endpoint`` in plugins_registry stands for registration ``attempt``: the plugin
    watcher's NotifyRegistrationStatus on it answers that attempt."""

    endpoint: int
    attempt: int


class Log(_Value):
    level: int
    message: str


Action = Union[Serve, Retire, EndStreams, WatchDrain, Register, Offer, Log]


class Env:
    """What is true outside the registration when an event is handled."""

    def __init__(self, now: float, kubelet: Optional[KubeletId], next_endpoint: Callable[[], int],
                 directory_problem: str = "", paths: Tuple[str, ...] = (KUBELET_SOCKET_PATH,),
                 registry_problem: str = "", fallback_timeout: float = STREAM_TIMEOUT, backoff_max: float = 10.0,
                 stream_timeout: float = STREAM_TIMEOUT, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        self.now = now
        self.kubelet = kubelet  # kubelet.sock now, None when absent
        self.next_endpoint = next_endpoint  # fresh socket numbers, unique for the process
        self.directory_problem = directory_problem  # non-empty while the socket directory is unusable
        self.paths = paths  # the ways to register, preferred first
        self.registry_problem = registry_problem  # non-empty while plugins_registry is unusable
        self.fallback_timeout = fallback_timeout  # registration = both: how long the plugin watcher may take
        self.backoff_max = backoff_max
        self.stream_timeout = stream_timeout
        self.drain_timeout = drain_timeout
        self.actions: List[Action] = []


def step(reg: Registration, event: Event, env: Env) -> List[Action]:
    """Apply ``event`` to ``reg``; return what the driver must do, in order."""
    env.actions = []
    if isinstance(event, Start):
        _register(reg, env, "starting")
    elif isinstance(event, KubeletAppeared):
        if reg.via == PLUGIN_WATCHER and reg.state in _WITH_KUBELET + (State.BACKOFF,):
            # The plugin watcher finds our socket by itself; kubelet.sock matters only as the
            # fallback of registration = both, whose wait starts now.
            if reg.state is State.REGISTERING and KUBELET_SOCKET_PATH in env.paths and reg.deadline is None \
                    and not reg.info_seen:
                reg.deadline = env.now + env.fallback_timeout
        elif reg.kubelet == event.kubelet and reg.state in _WITH_KUBELET:
            pass  # this kubelet has us, or is about to: registering again would cut its stream
        else:
            reg.backoff = FIRST_RETRY
            _register(reg, env, "kubelet.sock was created" if reg.kubelet else "kubelet.sock is there")
    elif isinstance(event, KubeletGone):
        if reg.via == PLUGIN_WATCHER:
            pass  # not how this registration goes
        elif reg.state in (State.REGISTERING, State.CONNECTING, State.BACKOFF, State.WAITING):
            reg.attempt += 1  # an answer still under way is for a kubelet that is gone
            _enter(reg, env, State.WAITING, "kubelet.sock was removed; waiting for the kubelet")
        # REGISTERED: the stream decides.  A kubelet that only recreates its socket keeps it.
    elif isinstance(event, SocketGone):
        if event.endpoint == reg.endpoint:
            env.actions.append(Retire(reg.endpoint))
            reg.endpoint, reg.offered = 0, False
            reg.stream = reg.early_stream = None
            reg.stream_since = None
            if reg.state in STREAMING:
                _log(env, logging.INFO, f"{reg.resource}: our socket was removed (kubelet restart?); "
                     "serving on a new one")
            if reg.state is State.DRAINING:
                _after_drain(reg, env)  # nothing left to drain
            else:
                _register(reg, env, "our socket was removed")
    elif isinstance(event, DirectoryLost):
        if reg.via in (event.via, ""):
            if reg.endpoint:
                env.actions.append(Retire(reg.endpoint))
            reg.endpoint, reg.offered, reg.stream, reg.early_stream, reg.stream_since = 0, False, None, None, None
            reg.attempt += 1
            reg.state = State.WAITING  # not draining: there is nothing left to drain
            _register(reg, env, event.why)  # waits, or registers the other way (registration = both)
    elif isinstance(event, DirectoryBack):
        if reg.state is State.WAITING:
            reg.backoff = FIRST_RETRY
            _register(reg, env, "the socket directory is back")
    elif isinstance(event, InfoRequested):
        _info_requested(reg, event, env)
    elif isinstance(event, ServeFailed):
        if event.endpoint == reg.endpoint:
            reg.endpoint, reg.offered = 0, False
            _backoff(reg, env, f"cannot serve: {event.why}", logging.ERROR)
    elif isinstance(event, Answered):
        _answered(reg, event, env)
    elif isinstance(event, StreamOpened):
        if event.endpoint == reg.endpoint and reg.offered:
            if reg.state is State.CONNECTING:
                _connected(reg, env, event.stream)
            elif reg.state is State.REGISTERING and reg.early_stream is None:
                reg.early_stream = event.stream  # the kubelet dialled before its answer reached us
        # Any other stream (a second client, or one on a socket not registered) proves nothing.
    elif isinstance(event, StreamEnded):
        _stream_ended(reg, event, env)
    elif isinstance(event, Drained):
        if reg.state is State.DRAINING and event.endpoint == reg.draining:
            _after_drain(reg, env)
    elif isinstance(event, Tick):
        _tick(reg, env)
    elif isinstance(event, Verify):
        if reg.via == PLUGIN_WATCHER and reg.state in _WITH_KUBELET:
            pass  # offered to the plugin watcher, or registered through it: nothing to do here
        elif reg.state in _WITH_KUBELET and reg.kubelet == env.kubelet and env.kubelet is not None:
            pass  # idempotent: registered (or registering) with the kubelet serving now
        elif reg.state is State.WAITING and _via(reg, env) == KUBELET_SOCKET_PATH and env.kubelet is None:
            pass  # nothing to register with
        else:
            reg.backoff = FIRST_RETRY
            _register(reg, env, "asked to check the registration (SIGUSR1)")
    elif isinstance(event, Reregister):
        if reg.state in _WITH_KUBELET:
            _register(reg, env, event.why)
    elif isinstance(event, KubeletSilent):
        if reg.state is State.REGISTERED:
            _enter(reg, env, State.STALLED, f"{event.why}; its ListAndWatch stream is kept, and the resource "
                   "counts as registered again once the kubelet answers")
    elif isinstance(event, KubeletAnswers):
        if reg.state is State.STALLED:
            _enter(reg, env, State.REGISTERED)
    else:  # pragma: no cover
        raise TypeError(f"unknown event {event!r}")
    return env.actions


# States with the kubelet's stream open (STALLED: the kubelet does not read it now).
STREAMING = (State.REGISTERED, State.STALLED)
_WITH_KUBELET = (State.REGISTERING, State.CONNECTING, State.DRAINING) + STREAMING


def _enter(reg: Registration, env: Env, state: State, reason: str = "",
           deadline: Optional[float] = None) -> None:
    if reg.state is not state:
        reg.since = env.now
    reg.state = state
    reg.reason = reason
    reg.deadline = deadline


def _log(env: Env, level: int, message: str) -> None:
    env.actions.append(Log(level, message))


def _via(reg: Registration, env: Env) -> str:
    """The way to register now: the plugin watcher where configured and usable (and not given up on
    for registration = both), else kubelet.sock."""
    if PLUGIN_WATCHER in env.paths:
        if KUBELET_SOCKET_PATH not in env.paths:
            return PLUGIN_WATCHER
        if not reg.fallback and not env.registry_problem:
            return PLUGIN_WATCHER
    return KUBELET_SOCKET_PATH


def _ready(env: Env, via: str) -> bool:
    if via == PLUGIN_WATCHER:
        return not env.registry_problem
    return not env.directory_problem and env.kubelet is not None


def _register(reg: Registration, env: Env, why: str) -> None:
    """Register with the kubelet there now, safely: serve first, drain a live stream first."""
    via = _via(reg, env)
    if reg.state is State.DRAINING and _ready(env, via):
        return  # a registration follows the drain anyway, with the kubelet there then
    if not _ready(env, via):
        _wait(reg, env)
        return
    if reg.stream is not None and reg.endpoint:
        # kubernetes#121994: the old stream must be gone before the new registration.
        reg.draining = reg.endpoint
        env.actions.append(EndStreams(reg.endpoint))
        _enter(reg, env, State.DRAINING, f"ending the old stream first ({why})", env.now + env.drain_timeout)
        return
    _register_now(reg, env)


def _wait(reg: Registration, env: Env) -> None:
    """Nothing to register with (no kubelet.sock), or nowhere to serve (no socket directory)."""
    reg.stream = reg.early_stream = None
    reg.stream_since = None
    reg.attempt += 1  # an answer still under way is for a kubelet that is gone
    reg.kubelet = None
    via = _via(reg, env)
    problem = env.registry_problem if via == PLUGIN_WATCHER else env.directory_problem
    if problem or via == PLUGIN_WATCHER:
        if reg.endpoint:
            env.actions.append(Retire(reg.endpoint))
            reg.endpoint, reg.offered = 0, False
        reg.via = ""
        _enter(reg, env, State.WAITING, problem or "waiting for the plugins_registry directory")
        return
    if reg.endpoint and (reg.state is State.DRAINING or reg.via == PLUGIN_WATCHER):
        env.actions.append(Retire(reg.endpoint))  # its stream is over: a fresh socket waits instead
        reg.endpoint, reg.offered = 0, False
    if not reg.endpoint:
        _serve(reg, env)  # serve anyway: ready the moment the kubelet appears
    reg.via = KUBELET_SOCKET_PATH
    _enter(reg, env, State.WAITING, "waiting for kubelet.sock")


def _register_now(reg: Registration, env: Env) -> None:
    via = _via(reg, env)
    if not _ready(env, via):
        _wait(reg, env)
        return
    if via == PLUGIN_WATCHER:
        _offer(reg, env)
        return
    if not reg.endpoint or reg.offered or reg.via != KUBELET_SOCKET_PATH:
        old = reg.endpoint
        _serve(reg, env)
        if old:
            env.actions.append(Retire(old))
    reg.via = KUBELET_SOCKET_PATH
    reg.stream = reg.early_stream = None
    reg.early_lost = False
    reg.stream_since = None
    reg.offered = True
    reg.attempt += 1
    reg.kubelet = env.kubelet
    env.actions.append(Register(reg.endpoint, reg.attempt))
    _enter(reg, env, State.REGISTERING, "waiting for the kubelet to answer Register")


def _offer(reg: Registration, env: Env) -> None:
    """A fresh socket in plugins_registry: the plugin watcher finds it and registers it.

    The old socket goes first: its removal makes the kubelet deregister the resource name, which
    must not hit the new registration.
    """
    if reg.endpoint:
        env.actions.append(Retire(reg.endpoint))
    reg.endpoint = env.next_endpoint()
    reg.via = PLUGIN_WATCHER
    reg.offered = True
    reg.info_seen = False
    reg.stream = reg.early_stream = None
    reg.early_lost = False
    reg.stream_since = None
    reg.attempt += 1
    reg.kubelet = env.kubelet
    env.actions.append(Serve(reg.endpoint, PLUGIN_WATCHER))
    env.actions.append(Offer(reg.endpoint, reg.attempt))
    # registration = both: fall back to kubelet.sock if the watcher does not take the socket.
    deadline = env.now + env.fallback_timeout if KUBELET_SOCKET_PATH in env.paths and env.kubelet else None
    _enter(reg, env, State.REGISTERING, "offered in plugins_registry; waiting for the kubelet's plugin watcher",
           deadline)


def _info_requested(reg: Registration, event: InfoRequested, env: Env) -> None:
    if event.endpoint != reg.endpoint or reg.via != PLUGIN_WATCHER:
        return
    reg.info_seen = True
    why = "the kubelet's plugin watcher took our socket; waiting for its registration status"
    if reg.state is State.REGISTERING:
        _enter(reg, env, State.REGISTERING, why, env.now + env.stream_timeout)
    elif reg.state in (State.BACKOFF, State.DRAINING, State.CONNECTING) + STREAMING:
        # A kubelet (restarted) found the socket again by itself: this is its registration.
        reg.attempt += 1
        reg.stream = reg.early_stream = None
        reg.early_lost = False
        reg.stream_since = None
        env.actions.append(Offer(reg.endpoint, reg.attempt))
        _enter(reg, env, State.REGISTERING, why, env.now + env.stream_timeout)


def _serve(reg: Registration, env: Env) -> None:
    reg.endpoint = env.next_endpoint()
    reg.offered = False
    env.actions.append(Serve(reg.endpoint, KUBELET_SOCKET_PATH))


def _answered(reg: Registration, event: Answered, env: Env) -> None:
    if event.attempt != reg.attempt or reg.state is not State.REGISTERING:
        return  # an older attempt, superseded
    if not event.ok:
        what = ("the kubelet's plugin watcher reported the registration failed" if reg.via == PLUGIN_WATCHER
                else "Register failed")
        _backoff(reg, env, f"{what}: {event.why}", logging.WARNING)
        return
    reg.registrations += 1
    if reg.early_lost:
        # The kubelet dialled, opened its stream and dropped it again before answering: the
        # 1.25-1.35 handler does this when an old client's late clean-up hits the new one.
        _lost(reg, env, "the kubelet ended the ListAndWatch stream right after it opened it")
        return
    if reg.early_stream is not None:
        _connected(reg, env, reg.early_stream)
        return
    _enter(reg, env, State.CONNECTING, "the kubelet accepted the registration but has not opened its stream yet",
           env.now + env.stream_timeout)


def _connected(reg: Registration, env: Env, stream: int) -> None:
    reg.stream, reg.early_stream = stream, None
    reg.failed = ""
    reg.stream_since = env.now
    _enter(reg, env, State.REGISTERED)
    how = " through its plugin watcher" if reg.via == PLUGIN_WATCHER else ""
    _log(env, logging.INFO, f"{reg.resource}: registered with the kubelet{how}; its ListAndWatch stream is connected")


def _stream_ended(reg: Registration, event: StreamEnded, env: Env) -> None:
    if event.stream == reg.early_stream:
        reg.early_stream = None
        reg.early_lost = not event.by_us
        return
    if event.stream != reg.stream or event.endpoint != reg.endpoint:
        return
    held = env.now - (reg.stream_since if reg.stream_since is not None else env.now)
    reg.stream, reg.stream_since = None, None
    if event.by_us:
        if reg.state in STREAMING:  # not through a drain or a retirement: no stream, no registration
            _register(reg, env, "our end of the stream was closed")
        return  # draining or retiring: whoever ended it goes on from there
    if held >= STABLE_AFTER:
        reg.backoff = FIRST_RETRY
    _lost(reg, env, f"the kubelet ended the ListAndWatch stream{': ' + event.why if event.why else ''}")


def _lost(reg: Registration, env: Env, why: str) -> None:
    """The kubelet dropped our stream: register again, on a fresh socket, once the kubelet has closed
    the old connection (its clean-up, which on 1.25-1.35 disconnects whatever client holds the name,
    must be over: kubernetes#121994) and not before the backoff allows."""
    reg.streams_lost += 1
    delay = reg.backoff
    reg.backoff = min(reg.backoff * 2, env.backoff_max)
    reg.retry_at = env.now + delay
    reg.draining = reg.endpoint
    reg.stream = reg.early_stream = None
    reg.stream_since = None
    if reg.endpoint:
        # Its stream is over already; the socket keeps serving: a restarted kubelet's plugin watcher
        # may take it again (InfoRequested), and a kubelet that dials it finds it answering.
        env.actions.append(WatchDrain(reg.endpoint))
    _enter(reg, env, State.DRAINING, why, env.now + max(delay, env.drain_timeout))
    _log(env, logging.WARNING, f"{reg.resource}: {why}; registering again on a fresh socket in {delay:.2f} s "
         "(once the kubelet has closed the old connection)")


def _after_drain(reg: Registration, env: Env) -> None:
    if env.now < reg.retry_at:
        _enter(reg, env, State.BACKOFF, reg.reason, reg.retry_at)
    else:
        _register_now(reg, env)


def _tick(reg: Registration, env: Env) -> None:
    if reg.deadline is None or env.now < reg.deadline:
        return
    reg.deadline = None
    if reg.state is State.BACKOFF:
        _register(reg, env, "retry")
    elif reg.state is State.CONNECTING:
        _backoff(reg, env, f"the kubelet accepted the registration but opened no ListAndWatch stream within "
                 f"{env.stream_timeout:g} s (it may have failed to dial our socket)", logging.WARNING)
    elif reg.state is State.REGISTERING and reg.via == PLUGIN_WATCHER:
        if not reg.info_seen and KUBELET_SOCKET_PATH in env.paths and env.kubelet is not None:
            reg.fallback = True
            _log(env, logging.WARNING, f"{reg.resource}: the kubelet's plugin watcher did not take our socket "
                 f"within {env.fallback_timeout:g} s; registering through kubelet.sock instead")
            _register_now(reg, env)
        else:
            _backoff(reg, env, f"the kubelet's plugin watcher did not complete the registration within "
                     f"{env.stream_timeout:g} s", logging.WARNING, "offering a fresh socket")
    elif reg.state is State.DRAINING:
        _after_drain(reg, env)


def _backoff(reg: Registration, env: Env, why: str, level: int, then: str = "retrying") -> None:
    delay = reg.backoff
    reg.backoff = min(reg.backoff * 2, env.backoff_max)
    _enter(reg, env, State.BACKOFF, why, env.now + delay)
    # The same failure again at once (a kubelet that takes a while to stop refuses each retry alike) is
    # one problem, said once at its level; the retries are INFO until the reason changes, an attempt
    # succeeds, or the backoff has grown to its maximum (then each is said: minutes apart).
    if why == reg.failed and level == logging.WARNING and delay < env.backoff_max:
        level = logging.INFO
    reg.failed = why
    _log(env, level, f"{reg.resource}: {why}; {then} in {delay:.2f} s")
