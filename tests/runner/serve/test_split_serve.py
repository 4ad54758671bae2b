"""`voxtral-run serve` split over two invocations on this machine, as two hosts would run it (tcp on 127.0.0.1, one
key file): the worker's stages serve stream after stream and several at once with the single-process ids; a worker
that stops fails the open stream, and the server serves again once it is back; SIGTERM stops the server, and its
worker stops on its own in one line, leaving no process. A server whose worker never comes is one line."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import yaml

from tests.conftest import speechlike_audio
from tests.runner.conftest import REPO, wait_until_gone
from tests.runner.serve.conftest import reference_events, wait_for, write_wav
from tests.runner.serve.test_serve_command import (
    EXIT_TIMEOUT_S,
    READY_TIMEOUT_S,
    first_line,
    health,
    recv,
    streaming,
)
from tests.runner.test_cli import one_error_line
from tests.runner.test_pipeline_model import free_port_block
from voxtral_run.runner.security import load_or_create_key_file
from voxtral_run.stages.transcribe import transcript_of

SERVER = "capture,resample,mel,output"
WORKER = "encoder,decoder,detokenize"
ON_CPU = ["--set", "encoder.device=cpu", "--set", "decoder.device=cpu"]
AUDIO = {"first.wav": speechlike_audio(1.6, seed=21), "second.wav": speechlike_audio(1.2, seed=22)}


def split_pipeline(tmp_path: Path, **top: object) -> Path:
    """The repository's pipeline on a free block of ports: mel -> encoder and detokenize -> output cross hosts."""
    data = yaml.safe_load((REPO / "pipeline.yaml").read_text()) | {"base_port": free_port_block(6), **top}
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def upload_ids(url: str, wav: Path) -> list[int]:
    """The token ids of a file sent to /v1/audio/transcriptions."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=EXIT_TIMEOUT_S)
    with wav.open("rb") as file:
        return client.audio.transcriptions.create(model="m", file=file).model_extra["token_ids"]


async def cut_off(url: str, model: str, worker: subprocess.Popen) -> dict:
    """A vLLM session streaming when the worker gets SIGTERM: the event the stream ends with."""
    async with streaming(url, model) as ws:
        worker.send_signal(signal.SIGTERM)
        while (event := await recv(ws))["type"] == "transcription.delta":
            pass
        return event


def not_ready(url: str) -> bool:
    try:
        health(url)
    except urllib.error.HTTPError as error:
        return error.code == 503
    return False


def test_a_split_serve_keeps_its_worker_across_streams_and_stops_whole(runner, tiny_model_dir, tmp_path):
    pipeline = split_pipeline(tmp_path)
    keys = tmp_path / "curve.key"
    load_or_create_key_file(keys, "--keys")  # before both start: neither may make its own
    common = ["serve", pipeline, "--model", tiny_model_dir, *ON_CPU, "--keys", keys]
    wavs = {name: write_wav(tmp_path / name, audio) for name, audio in AUDIO.items()}
    expected = {name: transcript_of(reference_events(audio, tiny_model_dir)).token_ids for name, audio in AUDIO.items()}
    worker = runner.start(*common, "--stages", WORKER)
    server = runner.start(*common, "--stages", SERVER, "--port", "0")
    try:
        line = first_line(server, READY_TIMEOUT_S)
        assert line.startswith("voxtral-run: serving on http://127.0.0.1:") and "resample, mel)" in line, line
        url = line.split()[3]
        for name, wav in wavs.items():  # one after the other: the worker outlives the first
            assert upload_ids(url, wav) == expected[name]
            assert worker.poll() is None
        with ThreadPoolExecutor(len(wavs)) as pool:  # at once
            ids = dict(zip(wavs, pool.map(lambda wav: upload_ids(url, wav), wavs.values()), strict=True))
        assert ids == expected

        failed = asyncio.run(cut_off(url, str(tiny_model_dir), worker))
        assert failed["type"] == "error" and "lost the link" in failed["error"], failed
        _, worker_err = worker.communicate(timeout=EXIT_TIMEOUT_S)
        assert worker.returncode == 0 and "error" not in worker_err.lower(), worker_err  # stopped, as asked
        assert wait_for(lambda: not_ready(url), EXIT_TIMEOUT_S)
        worker = runner.start(*common, "--stages", WORKER)  # back: the server links to it again
        assert wait_for(lambda: not not_ready(url), READY_TIMEOUT_S)
        assert upload_ids(url, wavs["first.wav"]) == expected["first.wav"]

        server.send_signal(signal.SIGTERM)
        _, server_err = server.communicate(timeout=EXIT_TIMEOUT_S)
        _, worker_err = worker.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        server.kill()
        worker.kill()
    assert server.returncode == 0 and "traceback" not in server_err.lower(), server_err
    # The worker cannot tell a server stopping from one lost: it stops on its own, naming the queue.
    assert worker.returncode == 1
    assert one_error_line(worker_err).startswith("voxtral-run: error: stage 'encoder' failed: queue mel -> encoder: ")
    assert wait_until_gone(runner.marker) == []


def test_a_server_whose_worker_never_comes_is_one_line(runner, tiny_model_dir, tmp_path):
    pipeline = split_pipeline(tmp_path, startup_timeout_s=2)
    port = yaml.safe_load(pipeline.read_text())["base_port"] + 5
    result = runner.run(
        "serve",
        pipeline,
        "--model",
        tiny_model_dir,
        "--stages",
        "capture,output",
        "--port",
        "0",
        "--keys",
        tmp_path / "curve.key",
        timeout=60,
    )
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        f"voxtral-run: error: queue detokenize -> output: no sender connected to tcp://127.0.0.1:{port} within 2 s "
        "(startup_timeout_s); is the invocation running its other end started, with the same key?"
    )
    assert wait_until_gone(runner.marker) == []


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            "capture,resample",
            "--stages: the server takes the places of capture and output: name both on the server's host, neither on "
            "a worker host",
        ),
        (
            "encoder",
            "--host, --port: a worker host (--stages without capture and output) serves no clients; give "
            "them to the server's host",
        ),
    ],
)
def test_a_split_serve_that_cannot_work_is_one_line(runner, tiny_model_dir, tmp_path, stages, expected):
    result = runner.run("serve", "--model", tiny_model_dir, "--stages", stages, "--port", "0", timeout=60)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == f"voxtral-run: error: {expected}"
