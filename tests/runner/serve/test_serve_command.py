"""`voxtral-run serve` as a user starts it: one line once every stage is ready, naming its address; GET /health
answers; on SIGTERM a session with a stream open gets its last event, the figures are written and the process
exits 0 leaving no process behind; bad options are one line before anything starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import speechlike_audio
from tests.runner.conftest import wait_until_gone, write_toy_pipeline
from tests.runner.serve.conftest import pcm16_base64, wait_for
from tests.runner.test_cli import one_error_line
from voxtral_run.runner.serve.command import run_loop

READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0


def first_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The first line the process writes on stderr, within timeout_s."""
    readable, _, _ = select.select([process.stderr], [], [], timeout_s)
    assert readable, "the server wrote nothing"
    return process.stderr.readline()


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/health") as response:
        return json.loads(response.read())


async def recv(ws) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), EXIT_TIMEOUT_S))


@contextlib.asynccontextmanager
async def streaming(url: str, model: str) -> AsyncIterator[ClientConnection]:
    """A vLLM session whose stream is open on the server, a second of its audio sent."""
    async with connect(url.replace("http", "ws", 1) + "/v1/realtime", proxy=None) as ws:
        assert (await recv(ws))["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "model": model}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        audio = pcm16_base64(speechlike_audio(1.0, seed=9))
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        assert await asyncio.to_thread(wait_for, lambda: health(url)["streams"] == 1)
        yield ws


async def stopped_mid_stream(url: str, model: str, process: subprocess.Popen) -> tuple[list[dict], int]:
    """A vLLM session streaming when the server gets SIGTERM: the events after the signal, and the close code."""
    async with streaming(url, model) as ws:
        process.send_signal(signal.SIGTERM)
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(await recv(ws))
        return events, closed.value.rcvd.code


def test_serve_answers_once_ready_and_stops_cleanly_on_sigterm(runner, tiny_model_dir, tmp_path):
    stats = tmp_path / "stats.json"
    process = runner.start("serve", "--model", tiny_model_dir, "--port", "0", "--stats-json", stats)
    try:
        line = first_line(process, READY_TIMEOUT_S)
        assert line.startswith("voxtral-run: serving on http://127.0.0.1:"), line + process.stderr.read()
        assert "ready in" in line and "resample, mel, encoder, decoder, detokenize" in line
        url = line.split()[3]
        assert health(url) == {"status": "ready", "streams": 0, "capacity": 4}  # the CPU's max_streams
        events, code = asyncio.run(stopped_mid_stream(url, str(tiny_model_dir), process))
        assert events[-1]["type"] == "error" and events[-1]["code"] == "server_shutting_down", events
        assert code == 1012  # uvicorn's close code of a server going away
        _, stderr = process.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "error" not in stderr.lower() and "traceback" not in stderr.lower(), stderr
    assert "per-stage figures" in stderr  # the table of the time it served
    assert set(json.loads(stats.read_text())["stages"]) == {"resample", "mel", "encoder", "decoder", "detokenize"}
    assert wait_until_gone(runner.marker) == []


@pytest.fixture
def taken_port() -> int:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--port", "70000"], "--port: give a port from 0 to 65535, not 70000"),
        (["--delay-ms", "50"], "--delay-ms: 50 is outside 80..2400 ms"),
        (["--stats-every", "0"], "--stats-every: give at least 0.1 seconds, not 0"),
        (["--set", "nostage.x=1"], "--set nostage.x=1: no stage 'nostage' in the pipeline"),
        (["--model", "/no/such/model"], "model directory /no/such/model does not exist"),
        (
            ["{drops}"],
            "queue capture -> relay: policy drop_newest drops audio; serve holds its clients back instead "
            "(policy block)",
        ),
        (["--port", "{taken}"], "--port {taken}: cannot listen on 127.0.0.1:{taken} (Address already in use)"),
    ],
)
def test_bad_options_are_one_line_before_anything_starts(runner, tiny_model_dir, tmp_path, taken_port, args, expected):
    drops = write_toy_pipeline(tmp_path / "drops.yaml", policy="drop_newest")
    args = [arg.format(drops=drops, taken=taken_port) for arg in args]
    model = [] if "--model" in args else ["--model", tiny_model_dir]
    port = [] if "--port" in args else ["--port", "0"]  # were an option let through, nothing would wait on 8000
    result = runner.run("serve", *args, *model, *port, timeout=60)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == f"voxtral-run: error: {expected.format(taken=taken_port)}"
    assert wait_until_gone(runner.marker) == []


def test_the_server_loop_is_uvloops_where_it_is_installed(monkeypatch) -> None:
    """The serve extra brings uvloop (uvicorn's standard extra), whose loop `run_loop` serves on; without it,
    asyncio's own."""
    uvloop = pytest.importorskip("uvloop")
    loops = []

    async def record() -> None:
        loops.append(asyncio.get_running_loop())

    run_loop(record())
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: importing it fails
    run_loop(record())
    assert isinstance(loops[0], uvloop.Loop)
    assert isinstance(loops[1], asyncio.BaseEventLoop) and not isinstance(loops[1], uvloop.Loop)
