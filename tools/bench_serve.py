"""Benchmark of a running `voxtral-run serve`: N WebSocket clients in vLLM's dialect, each streaming its own audio
at real-time pace, and the per-token latency they see.

Each client connects to /v1/realtime, names the served model and its delay in session.update, commits, then
sends its audio (synthetic speech-like, a different seed each) as base64 PCM16 16 kHz in 80 ms appends, each
when the wall clock says the audio was captured, then a final commit, and reads its deltas to
transcription.done. A delta's latency is its arrival time minus the time the audio it needed was sent: the audio
up to its `end_s` plus the session's delay plus the log-mel's 12.5 ms look-ahead (as the server counts it), or
the stream's end when that is the right pad; the times are the pacing's, so a client or server that falls behind
shows in the figures. A session falls behind when an append goes out more than 1 s after its time: the server
stopped reading its audio, or this process cannot keep up. Sessions start spread over one 80 ms period, or over
`--join-over` seconds (callers arriving one after another, as a service sees them); the verdict takes the deltas
that arrived while every session was live (after the last one started, before the first one ended).

`--warm-s W` measures streams whose caches are full, as a service of many long streams has them (the decoder's
8192-position window is about 11 minutes), without waiting that long live: each session first sends its first W
seconds as fast as the server takes them, waits until the server has sent the text that audio allows (a delta
whose next token needs audio not yet sent, or a second without any: tokens without text send none), then paces
the rest as if it had been live from W seconds earlier. Only the paced part's deltas count, and the measured
period runs from the last session's catch-up to the first one's end of audio; each trial gives the warm-ups'
durations (`warm_up_s`).

`--streams 50,100,200` runs the counts one after the other against the same server and reports the largest
whose p95 is within 50 ms with every session finished, none refused, failed or behind. Give `--url` of a
running server, or `--start PIPELINE --model DIR [--set STAGE.KEY=VALUE ...]` to start `voxtral-run serve` for
the run and stop it with SIGTERM after. Prints a table and writes every figure as JSON (`--json`).

One asyncio loop runs every client (no permessage-deflate). On a 2-core CPU machine, against a trivial server in
another process answering each append at once, one process kept pace with 1,000 clients (86% of a core; appends
late by 12 ms at p99, deltas 5 ms at p95); at 1,200 the trivial server ran out of its core. Each trial gives this
process's CPU time over its wall time (`client_cpu`): near 1, the figures are the client's, not the server's.

Run: `python -m voxtral_run.tools.bench_serve --url ws://127.0.0.1:8000/v1/realtime --streams 50,100,200`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from voxtral_run.runner.stage_process import freeze_startup_heap
from voxtral_run.stages.audio.constants import (
    MAX_DELAY_MS,
    MIN_DELAY_MS,
    MS_PER_TOKEN,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    SECONDS_PER_TOKEN,
    delay_tokens,
)
from voxtral_run.stages.audio.mel import CENTER_PAD
from voxtral_run.tools.bench_gpu import synthetic_speechlike

LATENCY_BUDGET_MS = 50.0  # p95 per-token latency beyond the delay that still counts as real time
BEHIND_S = 1.0  # an append this late: the session fell behind (as the runner says of a live source)
CONNECT_TIMEOUT_S = 60.0  # hundreds of clients connecting at once wait in the server's accept queue
START_LEAD_S = 0.5  # between the last client ready and the first audio
DONE_TIMEOUT_S = 60.0  # after the final commit, how long the last text and transcription.done may take
IDLE_TIMEOUT_S = 60.0  # between trials, how long the server may take to free the last trial's streams
CHUNK_BYTES = 2 * SAMPLES_PER_TOKEN  # an 80 ms append of PCM16
# Warm appends of 12 tokens (0.96 s, 41 kB of JSON, far within the server's 2 MiB message limit): a twelfth of the
# messages 80 ms appends would cost the client for 11 minutes of audio a session.
WARM_CHUNK_BYTES = 12 * CHUNK_BYTES
WARM_TIMEOUT_S = 1800.0  # from a session's first send to caught up: past it, the warm-up is the session's error
# A delta's end tells how far the server got, but tokens without text (specials, part of a character) send
# none: this long without a delta after the warm part went out, the server is taken to have caught up.
CAUGHT_UP_QUIET_S = 1.0
WARM_AHEAD_SAMPLES = 8 * SAMPLE_RATE  # the warm part's sender runs at most 8 s of audio ahead of the text
CLOSED_EARLY = "the server closed the connection before transcription.done"
MAX_ERRORS_KEPT = 5  # distinct session errors a trial's figures name
DISTINCT_AUDIOS = 8  # different signals among the sessions' audio (the rest are copies)


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


@dataclass
class Session:
    """One client's stream and what it saw."""

    index: int
    pcm: bytes
    delay_s: float
    warm_samples: int = 0  # the first samples, sent as fast as the server takes them (whole 80 ms appends)
    start: float = 0.0  # its first send
    live_from: float | None = None  # when its pacing started: its start without a warm part, else its catch-up
    warm_up_s: float | None = None  # from its first send to caught up
    caught_up_by_quiet: bool = False  # judged caught up by CAUGHT_UP_QUIET_S without a delta
    last_delta_at: float = 0.0
    taken_samples: int = 0  # the audio the deltas so far needed: the server has taken at least that much
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set on each delta (the warm part's sender waits)
    refused: bool = False
    finished: bool = False
    error: str = ""
    deltas: int = 0
    tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # each paced delta's arrival time, beside its latency
    lags_s: list[float] = field(default_factory=list)  # each append's lateness against its time

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    def needed(self, end_s: float) -> int:
        """The samples a delta ending at `end_s` needed sent, in whole appends; all of them for the right pad (it
        came with the final commit)."""
        due = round((end_s + self.delay_s) * SAMPLE_RATE) + CENTER_PAD
        return min(math.ceil(due / SAMPLES_PER_TOKEN) * SAMPLES_PER_TOKEN, self.samples)

    def due_at(self, samples: int) -> float:
        """When the stream's first `samples` were due to be sent: paced as live from `live_from` on, as if the
        stream had been live since its warm part's length before."""
        return self.live_from + (samples - self.warm_samples) / SAMPLE_RATE


def warm_samples(warm_s: float) -> int:
    """`warm_s` seconds of audio rounded down to whole 80 ms appends, in samples."""
    return round(warm_s * SAMPLE_RATE) // SAMPLES_PER_TOKEN * SAMPLES_PER_TOKEN


def append_event(pcm: bytes) -> str:
    """vLLM's input_audio_buffer.append of PCM16 bytes."""
    return f'{{"type":"input_audio_buffer.append","audio":"{base64.b64encode(pcm).decode("ascii")}"}}'


def speechlike_pcm16(seconds: float, seed: int) -> bytes:
    """Synthetic speech-like audio as PCM16 little-endian bytes (its samples are 16-bit exact)."""
    audio = synthetic_speechlike(seconds, seed=seed)
    return np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()


def http_url(ws_url: str, path: str) -> str:
    """The server's HTTP URL for `path`, from its WebSocket URL."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}[parts.scheme]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def get_json(url: str, timeout_s: float = 10.0) -> tuple[int, Any]:
    """A GET's status and JSON body (status 0 and the reason when the server cannot be reached)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with contextlib.suppress(ValueError):
            return error.code, json.loads(error.read())
        return error.code, None
    except (OSError, ValueError) as error:
        return 0, str(getattr(error, "reason", error))


def served_model(ws_url: str) -> str:
    """The model name the server serves (vLLM's session.update must name it), from GET /v1/models."""
    url = http_url(ws_url, "/v1/models")
    status, body = get_json(url)
    if status != 200:
        raise BenchError(f"GET {url}: {body if status == 0 else f'status {status}'}")
    try:
        return body["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url}: no model listed") from None


def wait_until_idle(ws_url: str, timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Wait until /health says the server is ready and holds no stream (the last trial's are freed)."""
    url = http_url(ws_url, "/health")
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = get_json(url)
        if status == 200 and isinstance(body, dict) and body.get("streams") == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"GET {url}: the server was not idle within {timeout_s:g} s (last answer: {body})")
        time.sleep(0.2)


async def _connect(session: Session, url: str, model: str, delay_ms: int) -> ClientConnection | None:
    """A connected session with its stream opened (commit), or None when refused or failed (noted)."""
    try:
        ws = await connect(url, compression=None, open_timeout=CONNECT_TIMEOUT_S, max_size=None)
    except (OSError, InvalidHandshake, asyncio.TimeoutError) as error:
        session.error = f"connect: {type(error).__name__}: {error}"
        return None
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), CONNECT_TIMEOUT_S))
        if hello.get("type") == "error":
            session.refused = hello.get("code") == "server_at_capacity"
            session.error = f"{hello.get('code')}: {hello.get('error')}"
            await ws.close()
            return None
        await ws.send(json.dumps({"type": "session.update", "model": model, "delay_ms": delay_ms}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    except (ConnectionClosed, asyncio.TimeoutError, ValueError) as error:
        session.error = f"session start: {type(error).__name__}: {error}"
        await ws.close()
        return None
    return ws


async def _stream(session: Session, ws: ClientConnection) -> None:
    """Send the session's audio (its warm part first, then paced as live) and read its events to
    transcription.done."""
    caught_up = asyncio.Event()
    receiver = asyncio.create_task(_receive(session, ws, caught_up))
    try:
        if session.warm_samples:
            await _warm_up(session, ws, receiver, caught_up)
            if session.error:  # it failed or timed out: nothing more to send or read
                return
        for offset in range(2 * session.warm_samples, len(session.pcm), CHUNK_BYTES):
            chunk = session.pcm[offset : offset + CHUNK_BYTES]
            due = session.due_at((offset + len(chunk)) // 2)  # a live capture has the chunk once it is whole
            await asyncio.sleep(due - time.monotonic())
            if receiver.done():  # refused or failed: the server takes no more of this stream
                break
            session.lags_s.append(time.monotonic() - due)
            await ws.send(append_event(chunk))
        else:
            await ws.send('{"type":"input_audio_buffer.commit","final":true}')
        await asyncio.wait_for(asyncio.shield(receiver), DONE_TIMEOUT_S)
        if not session.finished and not session.error:
            session.error = CLOSED_EARLY
    except asyncio.TimeoutError:
        session.error = f"no transcription.done within {DONE_TIMEOUT_S:g} s of the final commit"
    except (ConnectionClosed, OSError) as error:
        session.error = session.error or f"connection lost: {type(error).__name__}: {error}"
    finally:
        receiver.cancel()
        await ws.close()


async def _warm_up(session: Session, ws: ClientConnection, receiver: asyncio.Task, caught_up: asyncio.Event) -> None:
    """From its start, send the session's warm part as fast as the server takes it, wait until the server has
    sent the text it allows, and start the pacing then; a session that fails first or takes past WARM_TIMEOUT_S
    gets its error instead."""
    await asyncio.sleep(session.start - time.monotonic())
    first_send = time.monotonic()
    try:
        await asyncio.wait_for(_catch_up(session, ws, receiver, caught_up), WARM_TIMEOUT_S)
    except asyncio.TimeoutError:
        warm_s = session.warm_samples / SAMPLE_RATE
        session.error = f"warm-up: the server did not catch up with {warm_s:g} s of audio within {WARM_TIMEOUT_S:g} s"
        return
    if receiver.done():  # refused or failed: the receiver noted why
        session.error = session.error or CLOSED_EARLY
        return
    session.live_from = time.monotonic()
    session.warm_up_s = session.live_from - first_send


async def _catch_up(session: Session, ws: ClientConnection, receiver: asyncio.Task, caught_up: asyncio.Event) -> None:
    """Send the warm part (the server reads it no faster than it takes it), then wait for the delta whose next
    token needs audio not yet sent, CAUGHT_UP_QUIET_S without any delta, or the receiver's end."""
    warm_bytes = 2 * session.warm_samples
    sent_at = time.monotonic()
    for offset in range(0, warm_bytes, WARM_CHUNK_BYTES):
        # No further ahead of the text than WARM_AHEAD_S (unless the text goes quiet): deeper, the sockets' buffers
        # queue this client's keepalive answers behind audio the server reads only as fast as it transcribes, and
        # the server closes a connection whose answer is 20 s late.
        while offset // 2 - session.taken_samples > WARM_AHEAD_SAMPLES and not receiver.done():
            quiet_until = max(sent_at, session.last_delta_at) + CAUGHT_UP_QUIET_S
            if time.monotonic() >= quiet_until:
                break
            session.progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.progress.wait(), quiet_until - time.monotonic())
        if receiver.done():
            return
        await ws.send(append_event(session.pcm[offset : min(offset + WARM_CHUNK_BYTES, warm_bytes)]))
        sent_at = time.monotonic()
    waiter = asyncio.ensure_future(caught_up.wait())
    try:
        while not waiter.done() and not receiver.done():
            quiet_until = max(sent_at, session.last_delta_at) + CAUGHT_UP_QUIET_S
            if time.monotonic() >= quiet_until:
                session.caught_up_by_quiet = True
                return
            await asyncio.wait(
                {waiter, receiver}, timeout=quiet_until - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
    finally:
        waiter.cancel()


async def _receive(session: Session, ws: ClientConnection, caught_up: asyncio.Event) -> None:
    async for message in ws:
        now = time.monotonic()
        try:
            event = json.loads(message)
            kind = event.get("type")
        except (ValueError, AttributeError):
            session.error = f"the server sent a message that is not a JSON event: {str(message)[:80]!r}"
            return
        if kind == "transcription.delta":
            if "end_s" not in event:
                session.error = "a delta without end_s: the server is not voxtral-run serve"
                return
            session.deltas += 1
            session.tokens += len(event.get("token_ids", ()))
            session.last_delta_at = now
            needed = session.needed(event["end_s"])
            session.taken_samples = max(session.taken_samples, needed)
            session.progress.set()
            if needed > session.warm_samples:  # its audio went out paced, as live: a latency
                session.latencies_s.append(now - session.due_at(needed))
                session.arrivals.append(now)
            if session.needed(event["end_s"] + SECONDS_PER_TOKEN) > session.warm_samples:
                caught_up.set()  # the next token needs audio beyond the warm part
        elif kind == "transcription.done":
            session.finished = True
            return
        elif kind == "error":
            session.refused = event.get("code") == "server_at_capacity"
            session.error = f"{event.get('code')}: {event.get('error')}"
            return


async def _run_sessions(url: str, model: str, sessions: list[Session], delay_ms: int, join_over_s: float) -> None:
    """Every session, the i-th starting (its first send) i * join_over_s / n after the first."""
    connections = await asyncio.gather(*(_connect(session, url, model, delay_ms) for session in sessions))
    start = time.monotonic() + START_LEAD_S
    for session in sessions:
        session.start = start + session.index * join_over_s / len(sessions)
        if not session.warm_samples:  # paced from its first send
            session.live_from = session.start
    await asyncio.gather(*(_stream(s, ws) for s, ws in zip(sessions, connections, strict=True) if ws))


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """The least, p50, p95, p99 and the largest, in ms (None without values)."""
    if not values_s:
        return dict.fromkeys(("min", "p50", "p95", "p99", "max"))
    ms = 1000 * np.asarray(values_s)
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"min": float(ms.min()), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def spread_s(values_s: Sequence[float]) -> dict[str, float | None]:
    """The least, p50 and the largest, in seconds (None without values)."""
    if not values_s:
        return dict.fromkeys(("min", "p50", "max"))
    low, p50, high = np.percentile(values_s, [0, 50, 100])
    return {"min": float(low), "p50": float(p50), "max": float(high)}


def run_trial(
    url: str,
    audio: Sequence[bytes],
    *,
    delay_ms: int = 480,
    model: str | None = None,
    join_over_s: float = SECONDS_PER_TOKEN,
    warm_s: float = 0.0,
) -> dict:
    """A client for each of `audio` (PCM16 16 kHz mono bytes, all as long) against the server at `url`, their
    starts spread over `join_over_s`, each sending its first `warm_s` as fast as the server takes it; the figures."""
    model = model or served_model(url)
    delay_s = delay_tokens(delay_ms) * MS_PER_TOKEN / 1000  # the server rounds it up to whole tokens
    warm = warm_samples(warm_s)
    if not 0 <= warm < min(len(pcm) // 2 for pcm in audio):
        raise ValueError(f"warm_s={warm_s:g} must be >= 0 and leave an 80 ms append of the audio to pace")
    sessions = [Session(i, pcm, delay_s, warm) for i, pcm in enumerate(audio)]
    wall, cpu = time.monotonic(), time.process_time()
    asyncio.run(_run_sessions(url, model, sessions, delay_ms, join_over_s))
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    latencies = [latency for s in sessions for latency in s.latencies_s]
    # All live: from the last session's pacing start to the end of the first one's audio (a session that never
    # got to pacing, its warm-up failed, bounds nothing).
    paced = [s for s in sessions if s.live_from is not None]
    live_from = max((s.live_from for s in paced), default=0.0)
    live_to = min((s.due_at(s.samples) for s in paced), default=0.0)
    steady = [
        latency
        for s in sessions
        for latency, arrival in zip(s.latencies_s, s.arrivals, strict=True)
        if live_from <= arrival <= live_to
    ]
    lags = [lag for s in sessions for lag in s.lags_s]
    errors = sorted({s.error for s in sessions if s.error and not s.refused})
    return {
        "streams": len(sessions),
        "finished": sum(s.finished for s in sessions),
        "refused": sum(s.refused for s in sessions),
        "failed": sum(not s.finished and not s.refused for s in sessions),
        "behind": sum(max(s.lags_s, default=0.0) > BEHIND_S for s in sessions),
        "deltas": sum(s.deltas for s in sessions),
        "tokens": sum(s.tokens for s in sessions),
        "paced_deltas": len(latencies),  # those whose audio went out paced: what latency_ms counts
        "latency_ms": percentiles_ms(latencies),
        "join_over_s": join_over_s,
        "warm_s": warm / SAMPLE_RATE,
        "warm_up_s": spread_s([s.warm_up_s for s in sessions if s.warm_up_s is not None]),
        "caught_up_by_quiet": sum(s.caught_up_by_quiet for s in sessions),
        "all_live_s": max(0.0, live_to - live_from),
        "all_live_latency_ms": percentiles_ms(steady),  # the verdict's
        "send_lag_ms": percentiles_ms(lags),
        "wall_s": wall,
        "client_cpu": cpu / wall,  # this process's share of one core: near 1, the figures are the client's
        "errors": errors[:MAX_ERRORS_KEPT],
    }


def within_budget(trial: dict) -> bool:
    """Every session finished on time (none refused, failed or behind) and p95 within the budget while all were
    live."""
    p95 = trial["all_live_latency_ms"]["p95"]
    on_time = trial["finished"] == trial["streams"] and not trial["behind"]
    return on_time and p95 is not None and p95 <= LATENCY_BUDGET_MS


def ramp(
    url: str,
    counts: Sequence[int],
    seconds: float,
    *,
    delay_ms: int = 480,
    join_over_s: float = SECONDS_PER_TOKEN,
    warm_s: float = 0.0,
) -> dict:
    """Trials of each stream count in turn against one server (idle between them), and the largest within budget."""
    model = served_model(url)
    # Made before any trial's clock starts; a few distinct signals, copied: 60 sessions of 11 minutes are then quick.
    distinct = [speechlike_pcm16(seconds, seed=i) for i in range(min(max(counts), DISTINCT_AUDIOS))]
    audio = [distinct[i % len(distinct)] for i in range(max(counts))]
    trials = []
    for count in counts:
        wait_until_idle(url)
        trial = run_trial(url, audio[:count], delay_ms=delay_ms, model=model, join_over_s=join_over_s, warm_s=warm_s)
        p95, slowest = trial["all_live_latency_ms"]["p95"], trial["warm_up_s"]["max"]
        shown = "-" if p95 is None else f"{p95:.1f}"
        warmed = "" if slowest is None else f", slowest warm-up {slowest:.1f} s"
        print(f"{count} streams: {trial['finished']} finished, p95 {shown} ms{warmed}", flush=True)
        trials.append(trial)
    largest = max((t["streams"] for t in trials if within_budget(t)), default=0)
    return {"url": url, "model": model, "seconds": seconds, "delay_ms": delay_ms, "join_over_s": join_over_s,
            "warm_s": warm_samples(warm_s) / SAMPLE_RATE, "budget_p95_ms": LATENCY_BUDGET_MS, "trials": trials,
            "largest_within_budget": largest}  # fmt: skip


def free_port(host: str) -> int:
    """A TCP port free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def started_server(pipeline: str, model_dir: Path, sets: Sequence[str], log: Path, timeout_s: float) -> Iterator[str]:
    """`voxtral-run serve` in a child process until /health says ready; its WebSocket URL; SIGTERM after."""
    command = shutil.which("voxtral-run")
    if command is None:
        raise BenchError("voxtral-run is not on PATH: install the package (pip install -e '.[serve]')")
    host = "127.0.0.1"
    port = free_port(host)
    argv = [command, "serve", pipeline, "--host", host, "--port", str(port), "--model", str(model_dir)]
    argv += [arg for setting in sets for arg in ("--set", setting)]
    url = f"ws://{host}:{port}/v1/realtime"
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while get_json(http_url(url, "/health"), timeout_s=2.0)[0] != 200:
            if process.poll() is not None:
                last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise BenchError(f"voxtral-run serve exited with {process.returncode}: {last} (log: {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"voxtral-run serve was not ready within {timeout_s:g} s (log: {log})")
            time.sleep(0.5)
        yield url
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, as an operator stops it; SIGKILL to its process group if it has not exited in a minute."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        print("voxtral-run serve did not exit within 60 s of SIGTERM: killing it", flush=True)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def report(results: dict) -> None:
    """Print the trials as a table and the largest stream count within budget."""
    head = f"{'streams':>7} {'done':>5} {'refused':>7} {'failed':>6} {'behind':>6} {'deltas':>7} {'tokens':>7}"
    print(f"\n{head} {'live s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'lag p99':>7} {'cpu':>4}")
    for t in results["trials"]:
        shown = [t["all_live_latency_ms"][p] for p in ("p50", "p95", "p99")] + [t["send_lag_ms"]["p99"]]
        figures = " ".join("      -" if v is None else f"{v:7.1f}" for v in shown)
        print(
            f"{t['streams']:>7} {t['finished']:>5} {t['refused']:>7} {t['failed']:>6} {t['behind']:>6} "
            f"{t['deltas']:>7} {t['tokens']:>7} {t['all_live_s']:7.1f} {figures} {100 * t['client_cpu']:3.0f}%"
        )
        for error in t["errors"]:
            print(f"{'':>7} {error}")
    budget, largest = results["budget_p95_ms"], results["largest_within_budget"]
    print(
        f"latency while every session was live; largest stream count with p95 within {budget:g} ms, every "
        f"session finished: {largest}"
    )


class OneLineParser(argparse.ArgumentParser):
    """Bad options are one line, as the rest of voxtral-run says them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def stream_counts(text: str) -> list[int]:
    """`50,100,200` as stream counts, each 1..10000."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers separated by commas, got {text!r}") from None
    if not all(1 <= count <= 10_000 for count in counts):
        raise argparse.ArgumentTypeError(f"must each be 1..10000, got {text!r}")
    return counts


def main() -> None:
    parser = OneLineParser(prog="bench_serve", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server's realtime endpoint, ws://HOST:PORT/v1/realtime")
    target.add_argument("--start", metavar="PIPELINE", help="start `voxtral-run serve PIPELINE` for the run")
    parser.add_argument("--model", type=Path, help="with --start: the model directory")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE", help="with --start")
    parser.add_argument("--streams", type=stream_counts, default=[50, 100, 200], help="counts to try, in turn")
    parser.add_argument("--seconds", type=float, default=30.0, help="each session's audio, 1..3600 s")
    delays = f"{MIN_DELAY_MS}..{MAX_DELAY_MS}"
    parser.add_argument("--join-over", type=float, default=SECONDS_PER_TOKEN, help="seconds the starts spread over")
    parser.add_argument("--delay-ms", type=int, default=480, help=f"each session's delay, {delays} ms")
    parser.add_argument(
        "--warm-s", type=float, default=0.0, help="seconds of each session's audio sent first as fast as taken"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_serve.json"))
    parser.add_argument("--server-log", type=Path, default=Path("bench_serve_server.log"), help="with --start")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="with --start: seconds to get ready")
    args = parser.parse_args()
    if args.url is not None and urllib.parse.urlsplit(args.url).scheme not in ("ws", "wss"):
        parser.error(f"--url must be ws://HOST:PORT/v1/realtime or wss://..., got {args.url!r}")
    if args.start is not None and args.model is None:
        parser.error("--start needs --model DIR")
    if args.url is not None and (args.model is not None or args.set):
        parser.error("--model and --set go with --start; a running server has its own")
    if not 1 <= args.seconds <= 3600:
        parser.error(f"--seconds must be 1..3600, got {args.seconds:g}")
    if not 0 < args.join_over < args.seconds:
        parser.error(f"--join-over must be more than 0 and less than --seconds, got {args.join_over:g}")
    if not 0 <= args.warm_s < args.seconds or warm_samples(args.warm_s) >= int(args.seconds * SAMPLE_RATE):
        pace = f"leave an 80 ms append of --seconds {args.seconds:g} to pace"
        parser.error(f"--warm-s must be >= 0 and {pace}, got {args.warm_s:g}")
    if not MIN_DELAY_MS <= args.delay_ms <= MAX_DELAY_MS:
        parser.error(f"--delay-ms must be {MIN_DELAY_MS}..{MAX_DELAY_MS}, got {args.delay_ms}")
    if not 0 < args.start_timeout <= 86400:
        parser.error(f"--start-timeout must be in (0, 86400] seconds, got {args.start_timeout:g}")
    for option, path in (("--json", args.json), ("--server-log", args.server_log)):
        if not path.parent.is_dir():
            parser.error(f"{option}: no folder {path.parent} to write {path.name} in")
    try:
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(
                started_server(args.start, args.model, args.set, args.server_log, args.start_timeout)
            )
            freeze_startup_heap()  # a full collection here would delay the arrivals this process times
            results = ramp(
                url,
                args.streams,
                args.seconds,
                delay_ms=args.delay_ms,
                join_over_s=args.join_over,
                warm_s=args.warm_s,
            )
    except BenchError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    args.json.write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
