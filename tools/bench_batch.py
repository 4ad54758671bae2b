"""GPU benchmark of many streams batched on one GPU, in one command.

On a machine with a CUDA GPU, with a full-size random checkpoint in the real layout (written once, or --model):
1. ids: a dozen streams of different audio, lengths and delays batched, each against its ids run alone;
2. step times of the encoder and decoder steps against batch size, each beside its floor (weights read once
   plus the KV bytes the step reads, over the copy bandwidth measured here), and KV memory per stream;
3. concurrent real-time streams: the stage cores driven tick by tick at live pace (12.5 steps/s a stream), the
   encoder's and decoder's batched steps one after the other as the pipeline runs them, for 60 s streams
   (joining and leaving all the time, ages spread over their minute) and for streams whose rings are full
   (entered at positions past the window, as if 11 minutes had run); per-token latency beyond the delay for
   several stream counts, and whether the GPU keeps up.
Prints a table last and writes every figure as JSON.

Run from the repository root: `python -m voxtral_run.tools.bench_batch [--model DIR] [--json OUT.json]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    FRAME_RATE,
    MEL_FRAMES_PER_TOKEN,
    SAMPLES_PER_TOKEN,
    SECONDS_PER_TOKEN,
)
from voxtral_run.stages.base import END, StreamEnd, StreamStart
from voxtral_run.stages.factory import build_stage, open_model
from voxtral_run.stages.kernels.steps import DecoderStep, EncoderStep
from voxtral_run.stages.model.cache import PAGE_SLOTS
from voxtral_run.stages.model.encoder import CONV1_TAIL_LENGTHS
from voxtral_run.tools.bench_gpu import copy_bandwidth, synthetic_speechlike, weight_bytes
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE, write_tiny_checkpoint

DEVICE = "cuda:0"  # --device cpu: a dry run of the whole script on a small model
LATENCY_BUDGET_S = 0.050  # per-token latency beyond the delay that still counts as real time (p95)
TICK_S = SECONDS_PER_TOKEN
GB = 1e9
MINUTE_POSITIONS = round(60 * FRAME_RATE)  # a one-minute stream's decoder positions at its end (750)
STREAM_TAIL = CONV1_TAIL_LENGTHS[1]  # a live stream's conv1 tail: its first push has an odd frame count


def model_stage(kind: str, model_dir: Path, **params) -> object:
    """An encoder or decoder stage core on cuda:0 with these batching settings (decoding goes on past EOS)."""
    if kind == "decoder":
        params = {"stop_at_eos": False, **params}
    return build_stage(kind, model_dir=model_dir, device=DEVICE, params=params)


def synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def mel_items(model_dir: Path, audio: np.ndarray, delay_ms: int) -> list[np.ndarray]:
    """The mel stage's items for audio arriving 80 ms at a time (the first: the left pad's frames too), and
    those of the stream's end."""
    mel = build_stage("mel", model_dir=model_dir, delay_ms=delay_ms)
    chunks = range(0, len(audio), SAMPLES_PER_TOKEN)
    items = [item for start in chunks for item in mel.push("m", audio[start : start + SAMPLES_PER_TOKEN])]
    return items + mel.finish("m")


def stream_ids(encoder, decoder, items: dict[str, list[np.ndarray]], delays: dict, joins: dict) -> dict:
    """Streams pushing one mel item a tick from their join tick, through the encoder's then the decoder's
    `step`; each stream's ids."""
    ids = {name: [] for name in items}
    tick, ended = 0, set()
    while len(ended) < len(items):
        work = []
        for name, stream in items.items():
            index = tick - joins[name]
            if index == 0:
                work.append((name, StreamStart(delays[name])))
            if 0 <= index < len(stream):
                work.append((name, stream[index]))
            elif index == len(stream):
                work.append((name, END))
        starts = [(name, item) for name, item in work if isinstance(item, StreamStart)]
        for name, item in decoder.step(starts + encoder.step(work)):
            if isinstance(item, StreamEnd):
                ended.add(name)
            elif isinstance(item, np.ndarray):
                ids[name].extend(int(i) for i in item)
        tick += 1
    return ids


def check_ids(model_dir: Path, streams: int) -> dict:
    """`streams` streams of different audio, lengths, delays and join ticks batched, against each alone."""
    delays = {f"s{i}": (480, 160, 960, 2400)[i % 4] for i in range(streams)}
    items = {
        name: mel_items(model_dir, synthetic_speechlike(6.0 + 0.5 * i, seed=i), delays[name])
        for i, name in enumerate(delays)
    }
    joins = {name: 3 * i for i, name in enumerate(delays)}
    settings = {"max_streams": streams, "reserve_s": 20.0}
    encoder, decoder = model_stage("encoder", model_dir, **settings), model_stage("decoder", model_dir, **settings)
    batched = stream_ids(encoder, decoder, items, delays, joins)
    alone = {name: stream_ids(encoder, decoder, {name: items[name]}, delays, {name: 0})[name] for name in items}
    agreement = [
        sum(a == b for a, b in zip(batched[name], alone[name], strict=True)) / len(alone[name]) for name in items
    ]
    del encoder, decoder
    release_memory()
    return {
        "streams": streams,
        "ids_equal": sum(batched[name] == alone[name] for name in items),
        "min_agreement": min(agreement),
        "tokens_per_stream": [len(alone[name]) for name in items],
    }


def time_replays(call, repeats: int = 20) -> float:
    """Median wall time of `call` (each synchronised), after warm-up calls that compile and capture."""
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def step_sweep(stage, kind: str, positions: int, sizes: list[int], bandwidth: float, weights: int) -> list[dict]:
    """The stage's batched step at each batch size, every row at `positions` (its ring that full), beside its
    floor: the weights once plus every row's KV span, read at the copy bandwidth."""
    pool = stage.pool
    rows = [pool.admit(positions) for _ in range(max(sizes))]
    figures = []
    for size in sizes:
        for row in rows[:size]:
            pool.grow(row, positions + ENCODER_FRAMES_PER_TOKEN)
        if kind == "encoder":
            step = EncoderStep(
                stage.encoder, pool, (stage.mel_tails, stage.conv1_tails), stage.blocks, size, graphs=stage.cuda_graphs
            )
            mel = np.zeros((size, MEL_FRAMES_PER_TOKEN, 128), np.float32)
            call = lambda step=step, mel=mel, size=size: step(mel, rows[:size], [positions] * size, STREAM_TAIL)  # noqa: E731
            new_positions = ENCODER_FRAMES_PER_TOKEN
        else:
            dim = stage.decoder.params.encoder.dim
            step = DecoderStep(
                stage.decoder,
                pool,
                stage.tokens,
                stage.ffn_scales,
                stage.blocks,
                size,
                fused=stage.fused_kernels,
                graphs=stage.cuda_graphs,
            )
            frames = np.zeros((size, ENCODER_FRAMES_PER_TOKEN, dim), np.float32)
            call = lambda step=step, frames=frames, size=size: step(frames, rows[:size], [positions] * size)  # noqa: E731
            new_positions = 1
        seconds = time_replays(call)
        span = step.inputs.cache.span
        # The pages each row holds; the rest of its span is the one empty page, read from L2.
        kv = size * min(pool.pages_for(positions), span // PAGE_SLOTS) * pool.page_bytes()
        floor = (weights + kv) / bandwidth
        figures.append(
            {"batch": size, "ms": 1000 * seconds, "floor_ms": 1000 * floor, "x_floor": seconds / floor,
             "span": span, "kv_GB": kv / GB, "new_positions": new_positions}
        )  # fmt: skip
        print(kind, positions, json.dumps(figures[-1]), flush=True)
        del step
    for row in rows:
        pool.release(row)
    return figures


def paced_ticks(tick, seconds: float, idle=None) -> dict:
    """Call `tick()` every 80 ms of wall time for `seconds` (late ticks run at once, as queued audio does), and
    between ticks `idle()` while it has work (it returns whether it had), as a stage process runs the rounds its
    stage kept while no input waits: each tick's latency is from its audio's arrival to its tokens; returns
    p50/p95/p99 and whether it kept up."""
    count = round(seconds / TICK_S)
    latencies, computes = [], []
    begin = time.perf_counter()
    for index in range(count):
        due = begin + index * TICK_S
        while idle is not None and time.perf_counter() < due and idle():
            synchronize()
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        started = time.perf_counter()
        tick()
        synchronize()
        done = time.perf_counter()
        computes.append(done - started)
        latencies.append(done - due)
    late = np.asarray(latencies[len(latencies) // 2 :])
    return {
        "ticks": count,
        "latency_ms": {f"p{q}": 1000 * float(np.percentile(latencies, q)) for q in (50, 95, 99)},
        "compute_ms_p50": 1000 * float(np.median(computes)),
        "kept_up": bool(late.max() < 4 * TICK_S and latencies[-1] < 4 * TICK_S),
    }


def realtime_minute_streams(
    encoder, decoder, items: list[np.ndarray], last: np.ndarray, count: int, seconds: float
) -> dict:
    """`count` 60 s streams, one joining every 60 / count s and each leaving after its minute (so `count` live
    at once, their ages spread over the minute), driven through the stage cores a round a call, as the stage
    processes drive them (a stream's first and last items, of many positions, take later rounds, between
    ticks): unpaced for a minute of ticks (every age present), then paced for `seconds`. A stream's items after
    the first cycle through `items`; its end brings `last` (the right pad's frames) first. Besides the ticks'
    latency: a leaving stream's, from the start of its last item's tick to its end out of the decoder."""
    life = round(60 / TICK_S)  # ticks a stream lives
    state = {"tick": 0, "joined": 0, "ages": {}}
    leaving: dict[str, float] = {}  # stream -> when its last item's tick began
    flushes: list[float] = []

    def decode(outputs: list) -> None:
        for name, item in outputs:
            if item is END:
                flushes.append(time.perf_counter() - leaving.pop(name))

    def one_tick() -> None:
        work = []
        ages = state["ages"]
        while state["joined"] * life // count <= state["tick"]:
            name = f"m{state['joined']}"
            state["joined"] += 1
            ages[name] = 0
        for name, age in list(ages.items()):
            if age == 0:
                work.append((name, StreamStart()))
            if age < life:
                work.append((name, items[0] if age == 0 else items[1 + (age - 1) % (len(items) - 1)]))
                ages[name] = age + 1
            else:
                work += [(name, last), (name, END)]
                del ages[name]
                leaving[name] = state["began"]
        starts = [(name, item) for name, item in work if isinstance(item, StreamStart)]
        began = time.perf_counter()
        encoded = encoder.step_round(work)
        synchronize()
        middle = time.perf_counter()
        decode(decoder.step_round(starts + encoded))
        synchronize()
        changed = bool(starts) or any(item is END for _, item in work)
        parts.append((changed, middle - began, time.perf_counter() - middle))
        state["tick"] += 1

    def idle_round() -> bool:
        if not (encoder.has_work or decoder.has_work):
            return False
        decode(decoder.step_round(encoder.step_round([])))
        return True

    def timed_tick() -> None:
        state["began"] = time.perf_counter()  # paced_ticks calls it at (or after) its due time
        one_tick()

    parts: list[tuple[bool, float, float]] = []
    started = time.perf_counter()
    for _ in range(life):  # unpaced: brings the population to every age
        timed_tick()
        while idle_round():
            pass
    synchronize()
    warm_s = time.perf_counter() - started
    parts.clear()
    flushes.clear()
    figures = paced_ticks(timed_tick, seconds, idle_round)
    figures["leave_to_end_ms"] = {f"p{q}": 1000 * float(np.percentile(flushes, q)) for q in (50, 95) if flushes}
    figures |= {"streams": count, "warm_up_s": warm_s, "decoder_pages": decoder.pool.pages_in_use}
    # Where a tick's time goes: the encoder's and decoder's `step` calls, on ticks a stream joined or left, and
    # others (a prompt's prefill comes a few ticks after its join).
    for joined, label in ((True, "join_or_leave_ticks"), (False, "other_ticks")):
        chosen = np.asarray([(enc, dec) for change, enc, dec in parts if change == joined]).reshape(-1, 2)
        figures[label] = {
            "count": len(chosen),
            **{f"{stage}_ms_p{q}": 1000 * float(np.percentile(chosen[:, i], q)) if len(chosen) else None
               for i, stage in enumerate(("encoder", "decoder")) for q in (50, 95)},
        }  # fmt: skip
    decoder.step(encoder.step([(name, END) for name in state["ages"]]))
    return figures


def realtime_full_windows(encoder, decoder, count: int, seconds: float) -> dict:
    """`count` streams whose rings are full (entered at positions past both windows), one batched encoder step
    and one decoder step a tick, paced for `seconds`."""
    enc_pool, dec_pool = encoder.pool, decoder.pool
    enc_rows = [enc_pool.admit(enc_pool.window) for _ in range(count)]
    dec_rows = [dec_pool.admit(dec_pool.window) for _ in range(count)]
    for row in enc_rows:
        enc_pool.grow(row, enc_pool.capacity)
    for row in dec_rows:
        dec_pool.grow(row, dec_pool.capacity)
    enc_step = EncoderStep(
        encoder.encoder, enc_pool, (encoder.mel_tails, encoder.conv1_tails), encoder.blocks,
        encoder.bucket(count), graphs=encoder.cuda_graphs,
    )  # fmt: skip
    dec_step = DecoderStep(
        decoder.decoder, dec_pool, decoder.tokens, decoder.ffn_scales, decoder.blocks, decoder.bucket(count),
        fused=decoder.fused_kernels, graphs=decoder.cuda_graphs,
    )  # fmt: skip
    mel = np.zeros((count, MEL_FRAMES_PER_TOKEN, 128), np.float32)
    frames = np.zeros((count, ENCODER_FRAMES_PER_TOKEN, decoder.decoder.params.encoder.dim), np.float32)
    position = {"enc": 4 * dec_pool.capacity, "dec": dec_pool.capacity}

    def one_tick() -> None:
        enc_step(mel, enc_rows, [position["enc"]] * count, STREAM_TAIL)
        dec_step(frames, dec_rows, [position["dec"]] * count)
        position["enc"] += ENCODER_FRAMES_PER_TOKEN
        position["dec"] += 1

    for _ in range(3):
        one_tick()
    figures = paced_ticks(one_tick, seconds) | {"streams": count}
    for row in enc_rows:
        enc_pool.release(row)
    for row in dec_rows:
        dec_pool.release(row)
    return figures


def release_memory() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / GB if DEVICE.startswith("cuda") else 0.0


def largest_real_time(trials: list[dict]) -> int:
    """The most streams a trial served with p95 latency within the budget and keeping up."""
    ok = [t["streams"] for t in trials if t["kept_up"] and t["latency_ms"]["p95"] <= 1000 * LATENCY_BUDGET_S]
    return max(ok, default=0)


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: write a full-size random one)")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--json", type=Path, default=Path("bench_batch.json"))
    parser.add_argument("--parts", default="ids,steps,minute,full", help="which parts to run, comma-separated")
    parser.add_argument("--minute-streams", default="128,192,256", help="stream counts for 60 s streams")
    parser.add_argument("--full-streams", default="32,48,64", help="stream counts for full-window streams")
    parser.add_argument("--paced-seconds", type=float, default=30.0)
    parser.add_argument("--device", default=DEVICE, help="cpu: a dry run (give --model a small model)")
    args = parser.parse_args()
    DEVICE = args.device
    device = torch.device(DEVICE)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"gpu": name, "torch": torch.__version__}
    if args.json.exists():
        results = json.loads(args.json.read_text()) | results
    model_dir = args.model or args.workdir / "model"
    if not (model_dir / "consolidated.safetensors").exists():
        write_tiny_checkpoint(model_dir, REAL_SIZE, seed=0, dtype="bfloat16", device="cuda")
    for part in args.parts.split(","):  # each part's figures saved as soon as it ends
        measure(args, model_dir, {part}, results)
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def measure(args: argparse.Namespace, model_dir: Path, parts: set[str], results: dict) -> None:
    """The parts asked for, filling `results` as they go."""
    model = open_model(model_dir.resolve())
    weights = weight_bytes(model)
    if "ids" in parts:
        results["ids"] = check_ids(model_dir, 12)
        print("ids:", json.dumps(results["ids"]), flush=True)
    if "steps" in parts:
        bandwidth = copy_bandwidth(torch.device(DEVICE)) if DEVICE.startswith("cuda") else 1e10
        results["copy_bandwidth_GBps"] = bandwidth / GB
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        encoder = model_stage("encoder", model_dir, max_streams=256)
        results["encoder_steps"] = step_sweep(encoder, "encoder", 3000, sizes, bandwidth, weights["encoder"])
        results["encoder_kv_GB_per_stream"] = encoder.pool.pages_per_stream * encoder.pool.page_bytes() / GB
        del encoder
        release_memory()
        decoder = model_stage("decoder", model_dir, max_streams=256, kv_memory_gb=30.0, reserve_s=60.0)
        results["decoder_steps_60s"] = step_sweep(
            decoder, "decoder", MINUTE_POSITIONS, sizes, bandwidth, weights["decoder"]
        )
        per_position = decoder.pool.page_bytes() / PAGE_SLOTS
        results["decoder_kv_GB_per_stream"] = {
            "60s": decoder.pool.pages_for(MINUTE_POSITIONS) * decoder.pool.page_bytes() / GB,
            "full_window": decoder.pool.pages_per_stream * decoder.pool.page_bytes() / GB,
            "per_position_KiB": per_position / 1024,
        }
        del decoder
        release_memory()
        decoder = model_stage("decoder", model_dir, max_streams=64)
        results["decoder_steps_full"] = step_sweep(
            decoder, "decoder", 9000, [1, 2, 4, 8, 16, 32, 64], bandwidth, weights["decoder"]
        )
        del decoder
        release_memory()
    if "minute" in parts:
        counts = [int(n) for n in args.minute_streams.split(",")]
        settings = {"max_streams": max(counts), "reserve_s": 61.0}
        encoder = model_stage("encoder", model_dir, **settings)
        decoder = model_stage("decoder", model_dir, kv_memory_gb=25.0, **settings)
        *items, last = mel_items(model_dir, synthetic_speechlike(40.0), 480)
        trials = results.setdefault("minute_streams", [])
        for count in counts:
            trials.append(realtime_minute_streams(encoder, decoder, items, last, count, args.paced_seconds))
            print("minute:", json.dumps(trials[-1]), flush=True)
        results["minute_streams_real_time"] = largest_real_time(trials)
        results["memory_GB_after_minute"] = peak_memory_gb()
        del encoder, decoder
        release_memory()
    if "full" in parts:
        counts = [int(n) for n in args.full_streams.split(",")]
        encoder = model_stage("encoder", model_dir, max_streams=max(counts))
        decoder = model_stage("decoder", model_dir, max_streams=max(counts))
        trials = results.setdefault("full_window_streams", [])
        for count in counts:
            trials.append(realtime_full_windows(encoder, decoder, count, args.paced_seconds))
            print("full:", json.dumps(trials[-1]), flush=True)
        results["full_window_streams_real_time"] = largest_real_time(trials)
        results["memory_GB_full"] = peak_memory_gb()


if __name__ == "__main__":
    main()
