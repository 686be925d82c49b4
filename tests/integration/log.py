"""One line per check, shown in CI's log whether or not pytest captures output (``-s``)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

_config: Optional[Any] = None


def use_config(config: Optional[Any]) -> None:
    """Called from conftest's pytest_configure with pytest's config."""
    global _config
    _config = config


def say(line: str) -> None:
    """Write ``[integration] line`` to the terminal, past output capture (as pytest's live logging does)."""
    text = f"[integration] {line}"
    plugins = _config.pluginmanager if _config is not None else None
    reporter = plugins.getplugin("terminalreporter") if plugins else None
    capture = plugins.getplugin("capturemanager") if plugins else None
    if reporter is None:
        print(text, flush=True)
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_line(text)
