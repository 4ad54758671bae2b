"""What a sleeping stage pays on waking: the log-mel of one 80 ms push, back to back, after sleeping 80 ms,
and after spinning 80 ms (as a busy-polling stage waits), on one torch thread as a stage process runs.

Run from the repository root: `python -m tools.bench_cold_core [--pushes 200]`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

# As a stage process sets them, before torch is imported: its thread pools read these once.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

from voxtral_run.stages.audio.constants import MS_PER_TOKEN, SAMPLE_RATE, SAMPLES_PER_TOKEN  # noqa: E402
from voxtral_run.stages.audio.mel import MelStage  # noqa: E402


def spin(seconds: float) -> None:
    """Wait without sleeping, as a busy-polling stage does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def push_times_us(wait: Callable[[float], None] | None, pushes: int) -> np.ndarray:
    """Microseconds of each of `pushes` log-mel pushes of 80 ms of noise, with `wait` (80 ms) before each."""
    audio = (np.random.default_rng(0).standard_normal(pushes * SAMPLES_PER_TOKEN) * 0.1).astype(np.float32)
    stage = MelStage(left_pad_tokens=32, num_delay_tokens=6)
    times = []
    for start in range(0, len(audio), SAMPLES_PER_TOKEN):
        if wait is not None:
            wait(MS_PER_TOKEN / 1000)
        began = time.perf_counter()
        stage.push("stream", audio[start : start + SAMPLES_PER_TOKEN])
        times.append(1e6 * (time.perf_counter() - began))
    return np.asarray(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=200, help="pushes per way of waiting")
    args = parser.parse_args()
    print(f"log-mel of one 80 ms push ({SAMPLES_PER_TOKEN} samples at {SAMPLE_RATE} Hz), one thread:")
    for label, wait in (("back to back", None), ("after sleeping 80 ms", time.sleep), ("after spinning 80 ms", spin)):
        times = push_times_us(wait, args.pushes)
        print(f"  {label:22s} p50 {np.percentile(times, 50):7.0f} us, p95 {np.percentile(times, 95):7.0f} us")


if __name__ == "__main__":
    main()
