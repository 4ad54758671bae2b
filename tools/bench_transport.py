"""Transport benchmark: per-hop latency and messages per second of the runner's queues for 80 ms messages.

Run from the repository root: `python -m tools.bench_transport`.
Runs source -> relay -> sink as three spawned processes joined by the runner's own edges (credits, msgpack
envelope, raw array frames), over ipc:// and tcp:// on loopback (CURVE-encrypted and authenticated with a fresh
keypair, as the runner's tcp queues are), and prints a Markdown section whose figures docs/PERFORMANCE.md's CPU
table quotes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from voxtral_run.runner.edges import EdgeReceiver, EdgeSender, EdgeSpec, Policy
from voxtral_run.runner.security import CurveKeys, start_authenticator
from voxtral_run.runner.wire import Envelope, Kind
from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    FRAME_RATE,
    MEL_FRAMES_PER_TOKEN,
    NUM_MEL_BINS,
    SAMPLES_PER_TOKEN,
)

ENCODER_DIM = 1280  # Voxtral's audio encoder width
# One decoder position (80 ms) of data as each hop carries it.
PAYLOADS = {
    "audio (1280 float32)": lambda: np.zeros(SAMPLES_PER_TOKEN, dtype=np.float32),
    "mel (8x128 float32)": lambda: np.zeros((MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS), dtype=np.float32),
    "encoder (4x1280 float32)": lambda: np.zeros((ENCODER_FRAMES_PER_TOKEN, ENCODER_DIM), dtype=np.float32),
}
PACED_INTERVAL_S = 0.002  # latency runs send one message every 2 ms, so nothing queues
CAPACITY = 64
HOPS = 2
SECTION = "## Transport"


def _relay(input_spec: EdgeSpec, output_spec: EdgeSpec | None, keys: CurveKeys, results) -> None:
    """Receive until end of stream, forwarding (relay) or not (sink); report one-way latencies and timings.
    A tcp input is a CURVE server admitting only `keys`, as a stage process's is."""
    context = zmq.Context()
    authenticator = start_authenticator(context, keys) if input_spec.is_tcp else None
    receiver = EdgeReceiver(context, input_spec, keys)
    sender = EdgeSender(context, output_spec, keys=keys) if output_spec is not None else None
    latencies, first, last = [], None, None
    while True:
        envelope = receiver.receive()
        if envelope is None:
            continue
        now = time.time()
        if envelope.kind is Kind.EOS:
            if sender is not None:
                sender.send(envelope)
            break
        latencies.append(now - envelope.sent_time)
        first = first or now
        last = now
        if sender is not None:
            sender.send(Envelope(envelope.stream_id, envelope.seq, envelope.capture_time, Kind.DATA, envelope.item))
    results.send((latencies, first, last))
    for end in (receiver, sender):
        if end is not None:
            end.close()
    if authenticator is not None:
        authenticator.stop()
    context.term()


def _endpoints(transport: str, directory: Path, index: int, port: int) -> tuple[str, str]:
    if transport == "ipc":
        endpoint = f"ipc://{directory / f'edge{index}'}"
        return endpoint, endpoint
    return f"tcp://127.0.0.1:{port + index}", f"tcp://127.0.0.1:{port + index}"


def measure(transport: str, payload: np.ndarray, count: int, paced: bool, port: int) -> dict:
    """Send `count` messages through HOPS hops; per-hop latencies (s) and the sink's messages per second."""
    spawn = multiprocessing.get_context("spawn")
    keys = CurveKeys.generate()  # a run's keypair, as the runner makes one (ipc ignores it)
    with tempfile.TemporaryDirectory() as directory:
        specs = [
            EdgeSpec(f"n{i}", f"n{i + 1}", *_endpoints(transport, Path(directory), i, port), CAPACITY, Policy.BLOCK)
            for i in range(HOPS)
        ]
        pipes, processes = [], []
        for i in range(HOPS):
            receive_end, send_end = spawn.Pipe(duplex=False)
            output = specs[i + 1] if i + 1 < HOPS else None
            process = spawn.Process(target=_relay, args=(specs[i], output, keys, send_end))
            process.start()
            pipes.append(receive_end)
            processes.append(process)
        context = zmq.Context()
        sender = EdgeSender(context, specs[0], keys=keys)
        warmup = 200
        for seq in range(count + warmup):
            sender.send(Envelope("bench", seq, time.time(), Kind.DATA, payload))
            if paced:
                time.sleep(PACED_INTERVAL_S)
        sender.send(Envelope("bench", count + warmup, time.time(), Kind.EOS))
        reports = [pipe.recv() for pipe in pipes]
        for process in processes:
            process.join()
        sender.close()
        context.term()
    latencies = np.concatenate([np.asarray(report[0][warmup:]) for report in reports])
    _, first, last = reports[-1]
    return {"latencies": latencies, "rate": (count + warmup - 1) / (last - first)}


def run(count: int, port: int) -> str:
    """All measurements as a Markdown section."""
    rows, rates = [], []
    for transport in ("ipc", "tcp"):
        for name, make in PAYLOADS.items():
            payload = make()
            paced = measure(transport, payload, count, paced=True, port=port)
            flood = measure(transport, payload, count * 5, paced=False, port=port)
            p50, p99 = np.percentile(paced["latencies"] * 1e3, [50, 99])
            rates.append(flood["rate"])
            rows.append(
                f"| {transport} | {name} | {payload.nbytes / 1024:.1f} KiB | {p50:.3f} | {p99:.3f} | "
                f"{flood['rate']:,.0f} |"
            )
    return "\n".join(
        [
            SECTION,
            "",
            f"`python -m tools.bench_transport --count {count}` on {platform.node()} "
            f"({multiprocessing.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"ZeroMQ {zmq.zmq_version()}).",
            "",
            f"Three spawned processes (source -> relay -> sink, {HOPS} hops) joined by the runner's own queues: "
            "credit-bounded DEALER pairs, msgpack header, the array as a raw frame, tcp encrypted with CURVE. "
            "Latency is one way per hop, "
            f"from encoding at the sender to decoding at the receiver, with one message every "
            f"{PACED_INTERVAL_S * 1e3:g} ms ({count} messages per hop after a warm-up). Messages per second is "
            f"the sink's rate when the source sends as fast as the queue lets it (capacity {CAPACITY}).",
            "",
            "| transport | message (80 ms of) | size | p50 ms/hop | p99 ms/hop | messages/s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Target: p99 under 0.5 ms per hop. A hop costs a fixed per-message overhead (Python, msgpack, one "
            "credit back), not bandwidth: 80 ms of audio is a few KiB. The slowest rate above, "
            f"{min(rates):,.0f} messages/s, would carry {min(rates) / FRAME_RATE:,.0f} real-time streams "
            f"({FRAME_RATE:g} messages/s each) through one hop.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages per latency measurement")
    parser.add_argument("--port", type=int, default=5750, help="first tcp port to use")
    args = parser.parse_args()
    print(run(args.count, args.port))


if __name__ == "__main__":
    main()
