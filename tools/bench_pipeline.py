"""The real multi-process pipeline at N concurrent real-time streams: N WAV files of synthetic speech-like audio
through `voxtral-run PIPELINE --input DIR --realtime`, each file its own stream paced from its start, all starting
together (the worst case for a start: every join in the first tick), or with `--join-over S` one after another
over S seconds (the capture's `stagger_s`), as live callers join, each at its own phase of the 80 ms tick.
Reports the run's own figures: per-token latency beyond the delay, how far the capture fell behind real time,
each stage's utilisation and batch sizes.

Run from the repository root: `python -m tools.bench_pipeline --model DIR [--pipeline pipeline.yaml] [--streams
200] [--seconds 60] [--join-over 0] [--set STAGE.KEY=VALUE ...] [--json bench_pipeline.json]`. The files are
written once to a temporary folder (8 distinct audios, copied), the transcripts to another; both are removed
after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import soundfile

from voxtral_run.stages.audio.capture import MAX_STAGGER_S, MAX_STREAMS
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.tools.bench_gpu import synthetic_speechlike
from voxtral_run.tools.bench_serve import BEHIND_S, DISTINCT_AUDIOS, LATENCY_BUDGET_MS


class BenchError(Exception):
    """A one-line reason the benchmark could not run."""


def write_streams(folder: Path, streams: int, seconds: float) -> list[Path]:
    """`streams` 16 kHz PCM16 WAV files of `seconds` each in `folder`, named in order."""
    paths = [folder / f"stream{index:04d}.wav" for index in range(streams)]
    for index, path in enumerate(paths):
        if index < DISTINCT_AUDIOS:
            soundfile.write(path, synthetic_speechlike(seconds, seed=index), SAMPLE_RATE, subtype="PCM_16")
        else:
            shutil.copyfile(paths[index % DISTINCT_AUDIOS], path)
    return paths


def run_pipeline(
    pipeline: Path, model_dir: Path, inputs: Path, outputs: Path, sets: Sequence[str], timeout_s: float
) -> dict:
    """Run the pipeline over the folder in real time; its --stats-json figures."""
    command = shutil.which("voxtral-run")
    if command is None:
        raise BenchError("voxtral-run is not on PATH: install the package (pip install -e .)")
    stats = outputs / "stats.json"
    argv = [command, str(pipeline), "--model", str(model_dir), "--input", str(inputs), "--realtime"]
    argv += ["-o", str(outputs / "transcripts"), "--stats-json", str(stats), "--quiet"]
    argv += [arg for setting in sets for arg in ("--set", setting)]
    (outputs / "transcripts").mkdir()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the pipeline did not finish within {timeout_s:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"the pipeline exited {done.returncode}: {last}")
    return json.loads(stats.read_text())


def summary(figures: dict, streams: int, transcripts: int) -> dict:
    """The figures that judge the run, from the pipeline's own."""
    capture = figures["stages"].get("capture", {})
    result = {
        "streams": streams,
        "transcripts": transcripts,
        "latency_ms": figures.get("end_to_end_ms", {}),
        "capture_max_lag_s": capture.get("max_lag_s", 0.0),
        "late_chunks": capture.get("late_chunks", 0),
        "stages": {
            name: {"utilisation": entry.get("utilisation"), "batch": entry.get("batch"), "graphs": entry.get("graphs")}
            for name, entry in figures["stages"].items()
            if name != "capture"
        },
        "wall_s": figures.get("wall_s"),
    }
    p95 = result["latency_ms"].get("p95")
    result["within_budget"] = (
        transcripts == streams
        and p95 is not None
        and p95 <= LATENCY_BUDGET_MS
        and result["capture_max_lag_s"] <= BEHIND_S
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the model directory")
    parser.add_argument("--pipeline", type=Path, default=Path("pipeline.yaml"))
    parser.add_argument("--streams", type=int, default=200, help=f"files at once, 1..{MAX_STREAMS}")
    parser.add_argument("--seconds", type=float, default=60.0, help="each file's audio, 1..3600 s")
    parser.add_argument("--join-over", type=float, default=0.0, help="seconds the files' starts spread over")
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    parser.add_argument("--json", type=Path, default=Path("bench_pipeline.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.streams <= MAX_STREAMS:
        parser.error(f"--streams must be 1..{MAX_STREAMS}, got {args.streams}")
    if not 1 <= args.seconds <= 3600:
        parser.error(f"--seconds must be 1..3600, got {args.seconds:g}")
    if not 0 <= args.join_over <= MAX_STAGGER_S:
        parser.error(f"--join-over must be 0..{MAX_STAGGER_S:g} s, got {args.join_over:g}")
    sets = args.set + ([f"capture.stagger_s={args.join_over / args.streams:.6g}"] if args.join_over else [])
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as temp:
        inputs, outputs = Path(temp) / "in", Path(temp) / "out"
        inputs.mkdir()
        outputs.mkdir()
        write_streams(inputs, args.streams, args.seconds)
        try:
            timeout_s = 4 * args.seconds + args.join_over + 900
            figures = run_pipeline(args.pipeline, args.model, inputs, outputs, sets, timeout_s)
        except BenchError as error:
            print(f"bench_pipeline: {error}", file=sys.stderr)
            return 1
        result = summary(figures, args.streams, len(list((outputs / "transcripts").iterdir())))
    result |= {"pipeline": str(args.pipeline), "seconds": args.seconds, "join_over_s": args.join_over}
    result |= {"sets": sets, "figures": figures}
    args.json.write_text(json.dumps(result, indent=1))
    latency = result["latency_ms"]
    print(
        f"{args.streams} streams of {args.seconds:g} s: {result['transcripts']} transcripts; per-token latency "
        f"beyond the delay p50 / p95 / p99 {latency.get('p50', float('nan')):.1f} / "
        f"{latency.get('p95', float('nan')):.1f} / {latency.get('p99', float('nan')):.1f} ms; capture up to "
        f"{result['capture_max_lag_s']:.2f} s behind ({result['late_chunks']} chunks over 1 s late); "
        f"{'within' if result['within_budget'] else 'not within'} {LATENCY_BUDGET_MS:g} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
