"""Shared fixtures: tiny random checkpoints (built once per session) and the transformers oracle."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.interpreted_kernels import patch_language_once_per_launch
from tests.runner.conftest import Runner, marked_processes
from voxtral_run.stages.audio.constants import SAMPLE_RATE, SAMPLES_PER_TOKEN
from voxtral_run.tools.hf_reference import hf_model_for
from voxtral_run.tools.make_tiny_checkpoint import TINY, CheckpointSpec, write_tiny_checkpoint

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_language_once_per_launch()

# Windows smaller than the test audio, so the rolling caches really slide.
SMALL_WINDOWS = CheckpointSpec(enc_window=16, dec_window=12)


@pytest.fixture
def runner():
    """A Runner (voxtral-run in a child process) whose processes are all killed after the test, whatever
    happened."""
    marker = uuid.uuid4().hex
    yield Runner(marker)
    for pid in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Build (once per session) a tiny Mistral-layout model directory for a spec and seed."""
    built: dict[tuple[CheckpointSpec, int], Path] = {}

    def build(spec: CheckpointSpec = TINY, seed: int = 0) -> Path:
        key = (spec, seed)
        if key not in built:
            built[key] = write_tiny_checkpoint(tmp_path_factory.mktemp("model"), spec, seed=seed)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(checkpoint_factory) -> Path:
    """The default tiny model (real windows, 480 ms delay)."""
    return checkpoint_factory()


@pytest.fixture(scope="session")
def small_window_model_dir(checkpoint_factory) -> Path:
    """A tiny model whose encoder (16 frames) and decoder (12 positions) windows are shorter than test audio."""
    return checkpoint_factory(SMALL_WINDOWS, 1)


def speechlike_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Deterministic 16 kHz test signal, 16-bit exact: 160 ms segments of tone plus noise at random
    loudness (silence included) and pitch, so the tiny models' output changes along the stream."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = np.zeros(n)
    segment = 2 * SAMPLES_PER_TOKEN
    for start in range(0, n, segment):
        part = slice(start, start + segment)
        loudness, pitch = rng.choice([0.0, 0.05, 0.3, 0.8]), rng.uniform(100, 4000)
        noise = rng.standard_normal(len(t[part]))
        audio[part] = loudness * (0.5 * np.sin(2 * np.pi * pitch * t[part]) + 0.5 * noise)
    return (np.round(np.clip(audio, -1, 1) * 32767) / 32768).astype(np.float32)


def is_utf8(token: bytes) -> bool:
    """Whether some bytes are whole UTF-8 text."""
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="session")
def hf_oracle():
    """Factory: model dir -> transformers model with the same weights (cached per directory)."""
    cache: dict[Path, object] = {}

    def get(model_dir: Path):
        if model_dir not in cache:
            cache[model_dir] = hf_model_for(model_dir)
        return cache[model_dir]

    return get
