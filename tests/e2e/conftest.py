"""End-to-end fixtures: here ``kubelet`` is the recording stand-in (a StandInKubelet subclass, so it
behaves as the shared one does and also keeps each RegisterRequest and ListAndWatch message)."""

from __future__ import annotations

from typing import Iterator

import pytest

from .helpers import RecordingKubelet


@pytest.fixture
def kubelet(kubelet_dir, kubelet_behaviour) -> Iterator[RecordingKubelet]:
    k = RecordingKubelet(kubelet_dir, behaviour=kubelet_behaviour).start()
    try:
        yield k
    finally:
        k.stop()
