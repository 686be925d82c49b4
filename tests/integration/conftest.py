"""Integration tests under a real systemd (see container.py).

They need root and debootstrap, systemd-container, rpm, make and git on the
host; a host without them fails these tests with a message saying what to
install.  Skip them only explicitly: ``pytest -m "not integration"`` or
``UDP_SKIP_INTEGRATION=1``.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Iterator, List

import pytest

from .container import Container, HostNotReady, require_host, rootfs
from .log import say, use_config
from .packages import build_rpm

HERE = os.path.dirname(os.path.abspath(__file__))
# Host tools beyond container.HOST_TOOLS, with the Debian package of each.
BUILD_TOOLS = {"make": "make", "git": "git", "rpmbuild": "rpm"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs root and a booted systemd container (tests/integration)")
    use_config(config)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the journal of its container, still running at this point."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        ct = value if isinstance(value, Container) else getattr(value, "ct", None)
        if isinstance(ct, Container) and ct.leader:
            try:
                text = ct.run("journalctl", "--no-pager", "-o", "short-precise", "-n", "300", check=False).stdout
            except Exception as exc:  # noqa: BLE001 - the report must not fail
                text = f"(journal unavailable: {exc!r})"
            report.sections.append((f"journal of container {ct.name} (last 300 lines)", text))


@pytest.fixture(scope="session")
def host_ready() -> None:
    """Skip on explicit request only; otherwise fail, naming what the host lacks."""
    if os.environ.get("UDP_SKIP_INTEGRATION") == "1":
        pytest.skip("UDP_SKIP_INTEGRATION=1: integration tests skipped on request")
    missing = sorted({pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None})
    try:
        require_host()
    except HostNotReady as exc:
        pytest.fail(f"integration tests cannot run here: {exc}", pytrace=False)
    if missing:
        pytest.fail("integration tests cannot run here: apt-get install -y " + " ".join(missing), pytrace=False)


@pytest.fixture(scope="session")
def cached_rootfs(host_ready: None) -> str:
    """The container root filesystem, built once (about a minute) before the first test needs it."""
    try:
        return rootfs(log=say)
    except HostNotReady as exc:
        pytest.fail(f"integration tests cannot run here: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def rpms(host_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, str]]:
    """The RPM built from this tree twice: release "1", and release "2" to upgrade to."""
    out = str(tmp_path_factory.mktemp("rpms"))
    built = {release: build_rpm(out, release) for release in ("1", "2")}
    for path in built.values():
        say(f"built {os.path.basename(path)}")
    yield built
