"""tests/stacks runs on the newest stack only (``make test-stacks``), after every stack's venv exists."""

from __future__ import annotations

import os
import subprocess
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND_VARIABLE = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class Stack(NamedTuple):
    """One library stack: its venv's python and, optionally, the protobuf backend forced on it."""

    name: str
    venv: str
    target: str  # the make target that builds the venv
    backend: Optional[str] = None

    @property
    def python(self) -> str:
        return os.path.join(ROOT, self.venv, "bin", "python")

    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != BACKEND_VARIABLE}
        if self.backend:
            env[BACKEND_VARIABLE] = self.backend
        return env

    def run(self, args: List[str], stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
        if not os.access(self.python, os.X_OK):
            pytest.fail(f"the {self.name} stack's venv is missing ({self.python}): run `make {self.target}` "
                        "(make test-stacks builds every stack first)", pytrace=False)
        return subprocess.run([self.python, *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                              env=self.env(), timeout=timeout)


STACKS = (
    Stack("newest", ".venv", "venv"),
    Stack("newest-python", ".venv", "venv", backend="python"),
    Stack("el9", ".venv-el9", "venv-el9"),
    Stack("el10", ".venv-el10", "venv-el10"),
)
