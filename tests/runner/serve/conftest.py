"""Serve test helpers: a uvicorn server in a thread on a free port, reference transcripts, WAV files."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import uvicorn

from voxtral_run.runner.config import load_pipeline
from voxtral_run.runner.serve.app import create_app, uvicorn_config
from voxtral_run.runner.serve.hub import InProcessHub, StreamHub
from voxtral_run.runner.serve.pipeline_hub import PipelineHub
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.base import Item
from voxtral_run.stages.transcribe import build_chain, run_chain

MODEL = "voxtral-tiny"
MAX_STREAMS = 24  # the 20 concurrent sessions of the tests, and a few more
TEST_SETTINGS = ServeSettings(model_name=MODEL, max_message_bytes=256 * 1024, max_upload_bytes=8 * 1024 * 1024)
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Server:
    """A running server: its base URLs, its hub, its settings."""

    http: str
    ws: str
    hub: StreamHub
    settings: ServeSettings

    @property
    def realtime(self) -> str:
        return f"{self.ws}/v1/realtime"


@contextlib.contextmanager
def running_server(hub: StreamHub, settings: ServeSettings = TEST_SETTINGS) -> Iterator[Server]:
    """The app over `hub` served by uvicorn in a thread, on a port the OS picked, until the block ends."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_app(hub, settings), settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", hub, settings)
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_S)
        listener.close()


@pytest.fixture(scope="module")
def hub(tiny_model_dir: Path) -> Iterator[InProcessHub]:
    """One in-process hub on the tiny model per test module."""
    hub = InProcessHub.load(tiny_model_dir, max_streams=MAX_STREAMS)
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def pipeline_hub(tiny_model_dir: Path) -> Iterator[PipelineHub]:
    """The default pipeline's stages on the tiny model, each in its own process as `voxtral-run serve` starts them,
    once per test module (they take seconds to start); the model stages batch up to MAX_STREAMS."""
    config = load_pipeline(None, [f"encoder.max_streams={MAX_STREAMS}", f"decoder.max_streams={MAX_STREAMS}"])
    hub = PipelineHub(config, model_dir=tiny_model_dir)
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def server(hub: InProcessHub) -> Iterator[Server]:
    with running_server(hub) as running:
        yield running


def reference_events(audio: np.ndarray, model_dir: Path, delay_ms: int | None = None) -> list[Item]:
    """The detokenize events of the stage chain run alone over 16 kHz audio (transcribe_audio's)."""
    return run_chain(build_chain(model_dir, delay_ms=delay_ms), "reference", [np.asarray(audio, np.float32)])


def pcm16_base64(audio: np.ndarray) -> str:
    """Float samples as base64 PCM16 (the samples of the test audio are 16-bit exact)."""
    pcm = np.clip(np.round(np.asarray(audio) * 32768), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


def write_wav(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    soundfile.write(path, audio, rate, subtype="PCM_16")
    return path


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    """Whether `condition()` became true within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
