"""Serve test helpers: a hub per module, reference transcripts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from voxtral_run.runner.serve.hub import InProcessHub
from voxtral_run.stages.base import Item
from voxtral_run.stages.transcribe import build_chain, run_chain

MAX_STREAMS = 24  # the 20 concurrent sessions of the tests, and a few more


@pytest.fixture(scope="module")
def hub(tiny_model_dir: Path) -> Iterator[InProcessHub]:
    """One in-process hub on the tiny model per test module."""
    hub = InProcessHub.load(tiny_model_dir, max_streams=MAX_STREAMS)
    yield hub
    hub.close()


def reference_events(audio: np.ndarray, model_dir: Path, delay_ms: int | None = None) -> list[Item]:
    """The detokenize events of the stage chain run alone over 16 kHz audio (transcribe_audio's)."""
    return run_chain(build_chain(model_dir, delay_ms=delay_ms), "reference", [np.asarray(audio, np.float32)])


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    """Whether `condition()` became true within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
