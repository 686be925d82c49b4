"""Fixtures for the real-kubelet tests: one node (containerd + kubelet v1.20.2 in a mount namespace of
its own) per test module, our own udevd and loop devices, the daemon (``udev-device-plugin serve``
from this venv) started per test through the shared ``start_daemon`` fixture against the node's
device-plugins directory, the pods each test made deleted after it, and a printer for figures.

Needs root and the Debian packages golang-go, dpkg-dev (the one-time kubelet build), containerd, runc,
busybox-static, udev, iproute2 and util-linux.  A missing one fails the module with a message.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List

import pytest

from tests.hotplug import realudev

from . import build
from .node import Node, NodeError

HERE = os.path.dirname(os.path.abspath(__file__))
_built: Dict[str, str] = {}  # "path" or "error"


def _fail(message: str) -> None:
    pytest.fail(message, pytrace=False)


def pytest_collection_finish(session) -> None:
    """Build the kubelet (once per machine: minutes) before the first test, outside every test's timeout."""
    if not any(str(item.fspath).startswith(HERE + os.sep) for item in session.items):
        return
    if build.built_version(build.kubelet_path()) != build.VERSION:
        reporter = session.config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[kubelet] building kubelet {build.VERSION} into {build.CACHE_DIR} "
                                "(once per machine, a few minutes)")
    try:
        _built["path"] = build.build()
    except build.BuildError as exc:
        _built["error"] = str(exc)


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[Node]:
    """A running node for the whole module; torn down (processes, mounts, containers) even on failure."""
    if "error" in _built:
        _fail(f"cannot run the real-kubelet tests: the kubelet build failed: {_built['error']}")
    try:
        kubelet = _built.get("path") or build.build()
    except build.BuildError as exc:
        _fail(f"cannot run the real-kubelet tests: the kubelet build failed: {exc}")
    # Short: the daemon's socket paths under base/dp must fit in 107 bytes.
    base = str(tmp_path_factory.mktemp("node"))
    n = Node(base, kubelet)
    try:
        n.start()
    except NodeError as exc:
        problems = n.close()
        _fail(f"the real node did not start: {exc}" + (f"\nteardown: {problems}" if problems else "")
              + f"\n(logs in {base})")
    try:
        yield n
    finally:
        problems = n.close()
        if problems:
            _fail(f"the node's teardown met problems (logs in {base}): " + "; ".join(problems))


@pytest.fixture(scope="module")
def udevd(tmp_path_factory) -> Iterator[realudev.Udevd]:
    """Our own systemd-udevd for the module (or the one already running), so hotplug events flow."""
    problem = realudev.Udevd.problem()
    if problem:
        _fail(f"cannot run the real-kubelet hotplug tests: {problem}")
    realudev.clean_leftovers()
    daemon = realudev.Udevd(str(tmp_path_factory.mktemp("udevd") / "udevd.log")).start()
    try:
        yield daemon
    finally:
        realudev.clean_leftovers()
        daemon.stop()


@pytest.fixture
def loops(udevd) -> Iterator[realudev.LoopDevices]:
    devices = realudev.LoopDevices()
    try:
        yield devices
    finally:
        devices.close()


@pytest.fixture
def kubelet_dir(node) -> str:
    """The shared ``start_daemon`` fixture points the daemon here: the node's device-plugins directory."""
    return node.dp


@pytest.fixture
def pods(node) -> Iterator[List[str]]:
    """Names of the static pods a test adds (append them); all are deleted after the test."""
    names: List[str] = []
    yield names
    if node.kubelet is not None and node.kubelet.process.alive():
        node.delete_pods(names)
    else:
        for name in names:
            node.remove_pod(name)


@pytest.fixture
def say(request) -> Callable[[str], None]:
    """Print a figure or a finding into the test log, even with output captured: ``[kubelet] ...``."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(line: str) -> None:
        text = f"\n    [kubelet] {request.node.name}: {line}"
        if capture is None:
            print(text)
            return
        with capture.global_and_fixture_disabled():
            print(text, flush=True)

    return write


@pytest.fixture
def share(node) -> Dict[str, str]:
    """A host directory with one file, for resources that mount it into containers."""
    d = os.path.join(node.base, "share")
    with open(os.path.join(d, "hello"), "w") as f:
        f.write("hello from the host\n")
    return {"dir": d, "file": "hello", "text": "hello from the host"}
