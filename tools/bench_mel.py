"""The mel stage's cost per 80 ms item when a step carries many streams' items (as a stage process takes every
message waiting), on one torch thread as a stage process runs.

Run from the repository root: `python -m tools.bench_mel [--streams 1,20,200] [--items 4000]`.
"""

from __future__ import annotations

import argparse
import os
import time

# As a stage process sets them, before torch is imported: its thread pools read these once.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

from voxtral_run.stages.audio.constants import SAMPLES_PER_TOKEN  # noqa: E402
from voxtral_run.stages.audio.mel import MelStage  # noqa: E402


def step_item_us(streams: int, items: int) -> float:
    """Microseconds per item of `step` calls each carrying one 80 ms push of every one of `streams` streams."""
    rng = np.random.default_rng(0)
    work = [(f"s{i}", (rng.standard_normal(SAMPLES_PER_TOKEN) * 0.1).astype(np.float32)) for i in range(streams)]
    stage = MelStage(left_pad_tokens=32, num_delay_tokens=6)
    stage.step(work)  # the first push of each stream (the left pad's frames too)
    calls = max(3, items // streams)
    began = time.perf_counter()
    for _ in range(calls):
        stage.step(work)
    return 1e6 * (time.perf_counter() - began) / (calls * streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,20,200", help="streams a step carries, comma-separated")
    parser.add_argument("--items", type=int, default=4000, help="items timed per stream count")
    args = parser.parse_args()
    print("log-mel per 80 ms item, one thread:")
    for streams in (int(count) for count in args.streams.split(",")):
        print(f"  {streams:4d} streams a step: {step_item_us(streams, args.items):6.0f} us")


if __name__ == "__main__":
    main()
