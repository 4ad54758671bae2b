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
MAX_ERRORS_KEPT = 5  # distinct session errors a trial's figures name


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


@dataclass
class Session:
    """One client's stream and what it saw."""

    index: int
    pcm: bytes
    delay_s: float
    refused: bool = False
    finished: bool = False
    error: str = ""
    deltas: int = 0
    tokens: int = 0
    latencies_s: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # each delta's arrival time, beside its latency
    lags_s: list[float] = field(default_factory=list)  # each append's lateness against its time

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    def available_at(self, start: float, end_s: float) -> float:
        """When the audio a delta ending at `end_s` needed was due to be sent (pacing from `start`)."""
        due = round((end_s + self.delay_s) * SAMPLE_RATE) + CENTER_PAD
        if due > self.samples:  # the right pad: it came with the final commit
            return start + self.samples / SAMPLE_RATE
        sent = min(math.ceil(due / SAMPLES_PER_TOKEN) * SAMPLES_PER_TOKEN, self.samples)
        return start + sent / SAMPLE_RATE


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


async def _stream(session: Session, ws: ClientConnection, start: float) -> None:
    """Send the session's audio paced from `start` and read its events to transcription.done."""
    receiver = asyncio.create_task(_receive(session, ws, start))
    try:
        for offset in range(0, len(session.pcm), CHUNK_BYTES):
            chunk = session.pcm[offset : offset + CHUNK_BYTES]
            due = start + (offset + len(chunk)) / 2 / SAMPLE_RATE  # a live capture has the chunk once it is whole
            await asyncio.sleep(due - time.monotonic())
            if receiver.done():  # refused or failed: the server takes no more of this stream
                break
            session.lags_s.append(time.monotonic() - due)
            audio = base64.b64encode(chunk).decode("ascii")
            await ws.send(f'{{"type":"input_audio_buffer.append","audio":"{audio}"}}')
        else:
            await ws.send('{"type":"input_audio_buffer.commit","final":true}')
        await asyncio.wait_for(asyncio.shield(receiver), DONE_TIMEOUT_S)
        if not session.finished and not session.error:
            session.error = "the server closed the connection before transcription.done"
    except asyncio.TimeoutError:
        session.error = f"no transcription.done within {DONE_TIMEOUT_S:g} s of the final commit"
    except (ConnectionClosed, OSError) as error:
        session.error = session.error or f"connection lost: {type(error).__name__}: {error}"
    finally:
        receiver.cancel()
        await ws.close()


async def _receive(session: Session, ws: ClientConnection, start: float) -> None:
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
            session.latencies_s.append(now - session.available_at(start, event["end_s"]))
            session.arrivals.append(now)
        elif kind == "transcription.done":
            session.finished = True
            return
        elif kind == "error":
            session.refused = event.get("code") == "server_at_capacity"
            session.error = f"{event.get('code')}: {event.get('error')}"
            return


async def _run_sessions(url: str, model: str, sessions: list[Session], delay_ms: int, join_over_s: float) -> float:
    """Every session, the i-th starting i * join_over_s / n after the first; when the first started."""
    connections = await asyncio.gather(*(_connect(session, url, model, delay_ms) for session in sessions))
    start = time.monotonic() + START_LEAD_S
    period = join_over_s / len(sessions)
    streams = [_stream(s, ws, start + s.index * period) for s, ws in zip(sessions, connections, strict=True) if ws]
    await asyncio.gather(*streams)
    return start


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """The least, p50, p95, p99 and the largest, in ms (None without values)."""
    if not values_s:
        return dict.fromkeys(("min", "p50", "p95", "p99", "max"))
    ms = 1000 * np.asarray(values_s)
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"min": float(ms.min()), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def run_trial(
    url: str,
    audio: Sequence[bytes],
    *,
    delay_ms: int = 480,
    model: str | None = None,
    join_over_s: float = SECONDS_PER_TOKEN,
) -> dict:
    """A client for each of `audio` (PCM16 16 kHz mono bytes, all as long) against the server at `url`, their
    starts spread over `join_over_s`; the figures."""
    model = model or served_model(url)
    delay_s = delay_tokens(delay_ms) * MS_PER_TOKEN / 1000  # the server rounds it up to whole tokens
    sessions = [Session(i, pcm, delay_s) for i, pcm in enumerate(audio)]
    wall, cpu = time.monotonic(), time.process_time()
    start = asyncio.run(_run_sessions(url, model, sessions, delay_ms, join_over_s))
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    latencies = [latency for s in sessions for latency in s.latencies_s]
    # All live: from the last session's start to the end of the first one's audio.
    live_from = start + (len(sessions) - 1) * join_over_s / len(sessions)
    live_to = start + min(s.samples for s in sessions) / SAMPLE_RATE
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
        "latency_ms": percentiles_ms(latencies),
        "join_over_s": join_over_s,
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
    url: str, counts: Sequence[int], seconds: float, *, delay_ms: int = 480, join_over_s: float = SECONDS_PER_TOKEN
) -> dict:
    """Trials of each stream count in turn against one server (idle between them), and the largest within budget."""
    model = served_model(url)
    audio = [speechlike_pcm16(seconds, seed=i) for i in range(max(counts))]  # made before any trial's clock starts
    trials = []
    for count in counts:
        wait_until_idle(url)
        trial = run_trial(url, audio[:count], delay_ms=delay_ms, model=model, join_over_s=join_over_s)
        p95 = trial["all_live_latency_ms"]["p95"]
        shown = "-" if p95 is None else f"{p95:.1f}"
        print(f"{count} streams: {trial['finished']} finished, p95 {shown} ms", flush=True)
        trials.append(trial)
    largest = max((t["streams"] for t in trials if within_budget(t)), default=0)
    return {"url": url, "model": model, "seconds": seconds, "delay_ms": delay_ms, "join_over_s": join_over_s,
            "budget_p95_ms": LATENCY_BUDGET_MS, "trials": trials, "largest_within_budget": largest}  # fmt: skip


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
    print(f"\n{head} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'lag p99':>7} {'cpu':>4}")
    for t in results["trials"]:
        shown = [t["all_live_latency_ms"][p] for p in ("p50", "p95", "p99")] + [t["send_lag_ms"]["p99"]]
        figures = " ".join("      -" if v is None else f"{v:7.1f}" for v in shown)
        print(
            f"{t['streams']:>7} {t['finished']:>5} {t['refused']:>7} {t['failed']:>6} {t['behind']:>6} "
            f"{t['deltas']:>7} {t['tokens']:>7} {figures} {100 * t['client_cpu']:3.0f}%"
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
            results = ramp(url, args.streams, args.seconds, delay_ms=args.delay_ms, join_over_s=args.join_over)
    except BenchError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    args.json.write_text(json.dumps(results, indent=2))
    report(results)


if __name__ == "__main__":
    main()
