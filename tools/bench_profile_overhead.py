"""Profiling overhead: the tiny-model pipeline's wall time with `--profile` on and off, and the cost of the
per-item measurement every run takes.

Run from the repository root: `python -m tools.bench_profile_overhead [--seconds 120] [--repeats 10]`.
Builds a tiny random checkpoint, then runs `python -m runner pipeline.yaml` on CPU over the same noise file,
profiling off and on in pairs (in alternating order, so drift favours neither), one torch thread per stage
process (the stages already run in parallel; more threads on few cores fight over them and swamp the figure).
It reports the median of the pairs' relative change of the stream's wall time (capture start to the last text,
from --stats-json) and of the whole command (start-up, loading, trace writing included), checks that every run
gives the same token ids, and times StageMetrics.record, which runs for every item in every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from voxtral_run.runner.metrics import StageMetrics, StepRecord
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.tools.make_tiny_checkpoint import TINY, write_tiny_checkpoint

PIPELINE = Path("pipeline.yaml")
ON_CPU = ["--set", "encoder.device=cpu", "--set", "decoder.device=cpu"]
TARGET = 0.05  # the bound on the relative change of wall time
RECORD_CALLS = 100_000
NOISE_LEVEL = 0.1
STAGE_THREADS = {"OMP_NUM_THREADS": "1"}


def run_once(model_dir: Path, wav: Path, workdir: Path, *, profile: bool) -> dict:
    """One run: its stream and command wall times (s), and its token ids."""
    stats, transcript, trace = workdir / "stats.json", workdir / "out.jsonl", workdir / "trace.json"
    command = [sys.executable, "-m", "runner", str(PIPELINE), "--model", str(model_dir), *ON_CPU, "--input", str(wav)]
    command += ["--format", "jsonl", "--output", str(transcript), "--stats-json", str(stats)]
    command += ["--profile", str(trace)] if profile else []
    started = time.perf_counter()
    environment = os.environ | STAGE_THREADS
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, env=environment
    )
    command_s = time.perf_counter() - started
    token_ids = json.loads(transcript.read_text().splitlines()[-1])["token_ids"]
    return {"stream_s": json.loads(stats.read_text())["wall_s"], "command_s": command_s, "token_ids": token_ids}


def record_cost_us(*, keep_records: bool) -> float:
    """Microseconds per StageMetrics.record call with the StepRecord of a one-message step (keep_records: as when
    profiling)."""
    metrics = StageMetrics(keep_records=keep_records)
    rng = np.random.default_rng(0)
    durations = rng.lognormal(np.log(0.005), 1.0, size=(RECORD_CALLS, 3)).tolist()
    started = time.perf_counter()
    for wait_s, service_s, send_s in durations:
        metrics.record(StepRecord(0.0, service_s, send_s, 5120, batch_sizes=[1], items=[["s", wait_s, 0.0, False]]))
    return (time.perf_counter() - started) / RECORD_CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="audio length (80 ms frames = seconds x 12.5)")
    parser.add_argument("--repeats", type=int, default=10, help="pairs of runs, profiling off and on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as temp:
        workdir = Path(temp)
        model_dir = write_tiny_checkpoint(workdir / "model", TINY, seed=1)
        rng = np.random.default_rng(0)
        wav = workdir / "noise.wav"
        soundfile.write(wav, rng.standard_normal(int(args.seconds * SAMPLE_RATE)) * NOISE_LEVEL, SAMPLE_RATE, "PCM_16")
        run_once(model_dir, wav, workdir, profile=False)  # warm the file cache and the imports
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for profile in (False, True) if repeat % 2 == 0 else (True, False):
                runs[profile].append(run_once(model_dir, wav, workdir, profile=profile))
                state = "on" if profile else "off"
                print(f"run {repeat + 1} profiling {state}: stream {runs[profile][-1]['stream_s']:.3f} s", flush=True)
    same_ids = all(run["token_ids"] == runs[False][0]["token_ids"] for run in runs[False] + runs[True])
    machine = f"{platform.node()} ({len(os.sched_getaffinity(0))} CPU cores, Python {platform.python_version()})"
    print(
        f"\n`python -m tools.bench_profile_overhead --seconds {args.seconds:g} --repeats {args.repeats}` on "
        f"{machine}: tiny model on CPU, one torch thread per stage, {args.seconds:g} s of audio read as fast as the "
        "pipeline takes it.\n"
    )
    print("| wall time | profiling off (median, range) | profiling on (median, range) | change (median of pairs) |")
    print("|---|---|---|---|")
    changes = {}
    for key, title in (("stream_s", "stream (capture start to last text)"), ("command_s", "whole command")):
        off, on = ([run[key] for run in runs[profile]] for profile in (False, True))
        changes[key] = statistics.median(b / a - 1 for a, b in zip(off, on, strict=True))
        cells = [f"{statistics.median(times):.3f} s ({min(times):.2f}-{max(times):.2f})" for times in (off, on)]
        print(f"| {title} | {cells[0]} | {cells[1]} | {changes[key]:+.1%} |")
    measured, kept = record_cost_us(keep_records=False), record_cost_us(keep_records=True)
    print(
        f"\nSame token ids in every run: {same_ids}. Per one-message step and stage, the measurement every run "
        f"takes costs {measured:.1f} µs; keeping the record for the trace (profiling) brings it to {kept:.1f} µs."
    )
    verdict = "within" if abs(changes["stream_s"]) < TARGET else "OUTSIDE"
    print(f"Stream wall-time change {changes['stream_s']:+.1%}: {verdict} the {TARGET:.0%} bound.")


if __name__ == "__main__":
    main()
