"""GPU benchmark of 8-bit KV caches and decoder weights (`kv_dtype: fp8`, `weights: fp8`), in one command.

On a machine with a CUDA GPU, with a full-size random checkpoint in the real layout (written once, or --model):
1. logits: teacher-forced logits over `--positions` decoder positions (random ids after the prompt, over
   synthetic audio) with fp8 KV, fp8 weights and both, against bf16 and against fp32, beside bf16's own distance
   from fp32 (max and median relative error per position, greedy agreement); and the KV write kernel's e4m3
   bits against `fp8.quantize`'s;
2. memory: KV memory per full-window stream in bf16 (the stages' dtype: float32 in a CPU dry run) and fp8, and
   the full-window streams that fit beside the weights in the GPU's free memory (less `--headroom-gb` for
   activations and graphs);
3. steps: the decoder's one-stream step with fp8 weights (and fp8 KV) against bf16, at a full window; the
   batched encoder and decoder steps with fp8 KV at the many-streams stream counts;
4. full: full-window streams with fp8 KV paced in real time (bench_batch's), up to the count that fits.
Accuracy on real speech is not measured here: the weights are random. Prints JSON as it goes and writes it all.

Run from the repository root: `python -m voxtral_run.tools.bench_fp8 [--model DIR] [--json OUT.json]`;
`--device cpu --model TINY_DIR` is a dry run of the whole script on a small model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from voxtral_run.stages.audio.constants import delay_tokens, pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.factory import open_model
from voxtral_run.stages.kernels.fp8_cache import store_fp8
from voxtral_run.stages.model.checkpoint import DECODER_LAYERS_PREFIX, TOKEN_EMBEDDING, ModelDir
from voxtral_run.stages.model.decoder import streaming_prompt
from voxtral_run.stages.model.fp8 import FP8, quantize
from voxtral_run.tools import bench_batch
from voxtral_run.tools.bench_batch import (
    GB,
    MINUTE_POSITIONS,
    largest_real_time,
    model_stage,
    realtime_full_windows,
    release_memory,
    step_sweep,
)
from voxtral_run.tools.bench_gpu import (
    compare_logits,
    copy_bandwidth,
    synthetic_speechlike,
    teacher_forced_logits,
    weight_bytes,
)
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE, write_tiny_checkpoint

# The variants measured against bf16 and fp32: the stages' kv_dtype and weights settings.
VARIANTS = {
    "fp8_kv": {"kv_dtype": "fp8"},
    "fp8_weights": {"weights": "fp8"},
    "fp8_kv_and_weights": {"kv_dtype": "fp8", "weights": "fp8"},
    "fp8_weights_and_lm_head": {"weights": "fp8", "lm_head": "fp8"},
}
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # the many-streams benchmark's (bench_batch's steps part)
LINEAR_NAMES = (".attention.w", ".feed_forward.w")  # the decoder layers' products `weights: fp8` stores in e4m3


def logits(model_dir: Path, device: torch.device, positions: int) -> dict:
    """Teacher-forced logits of each variant and of bf16 against fp32, and of each variant against bf16."""
    model = open_model(model_dir.resolve())
    num_delay = delay_tokens(model.tekken.audio.transcription_delay_ms)
    prompt = streaming_prompt(model.tekken, num_delay)
    left = model.tekken.audio.streaming_n_left_pad_tokens
    audio = synthetic_speechlike((positions - len(prompt)) * 0.08)
    mel = log_mel_frames(pad_audio(audio, left, num_delay))
    count = min(positions, mel.shape[0] // 8)
    ids = np.random.default_rng(0).integers(1000, model.params.vocab_size, count - len(prompt)).tolist()
    sequence = torch.tensor(prompt + ids, device=device)
    reference = teacher_forced_logits(model_dir, mel, sequence, "float32")
    bf16 = teacher_forced_logits(model_dir, mel, sequence, "bfloat16")
    results = {"positions": count, "bf16_vs_fp32": compare_logits(bf16, reference)}
    for name, formats in VARIANTS.items():
        ours = teacher_forced_logits(model_dir, mel, sequence, "bfloat16", **formats)
        results[name] = {"vs_bf16": compare_logits(ours, bf16), "vs_fp32": compare_logits(ours, reference)}
        print("logits:", name, json.dumps(results[name]), flush=True)
    return results


def cache_write_bits(device: torch.device) -> bool:
    """Whether the KV write kernel stores `quantize`'s bits and scales (on a GPU: its own e4m3 rounding)."""
    generator = torch.Generator().manual_seed(0)
    new = (torch.randn(2, 64, 8, 128, generator=generator) * 10.0 ** torch.randint(-3, 3, (1, 64, 8, 1))).to(device)
    slots = torch.randperm(256, generator=generator)[:64].to(device)
    stored = [torch.zeros(256, 8, 128, dtype=FP8, device=device) for _ in "kv"]
    scales = [torch.zeros(256, 8, device=device) for _ in "kv"]
    store_fp8(new[0], new[1], tuple(stored), tuple(scales), slots)
    expected = [quantize(part) for part in new]
    return all(
        torch.equal(values[slots].view(torch.uint8), want.view(torch.uint8)) and torch.equal(s[slots], want_scales)
        for values, s, (want, want_scales) in zip(stored, scales, expected, strict=True)
    )


def fp8_decoder_bytes(model: ModelDir, formats: dict[str, str]) -> int:
    """Bytes the decoder step reads in `formats`: its bf16 bytes less a byte of each weight stored in e4m3 (the
    layers' products with `weights: fp8`, the LM head's with `lm_head: fp8`)."""
    shapes = model.tensor_shapes()
    linear = sum(
        int(np.prod(shape))
        for name, shape in shapes.items()
        if name.startswith(DECODER_LAYERS_PREFIX) and any(part in name for part in LINEAR_NAMES)
    )
    head = int(np.prod(shapes[TOKEN_EMBEDDING]))
    fp8 = {key: formats.get(key) == "fp8" for key in ("weights", "lm_head")}
    return weight_bytes(model)["decoder"] - linear * fp8["weights"] - head * fp8["lm_head"]


def full_window_memory(model_dir: Path, headroom_gb: float) -> dict:
    """KV memory per full-window stream in each format and, on a GPU, how many such streams fit beside the
    encoder's and decoder's weights (the GPU's free memory with both loaded, less the headroom)."""
    results = {}
    for name, kv_dtype in (("bf16", "auto"), ("fp8", "fp8")):
        stages = [model_stage(kind, model_dir, max_streams=1, kv_dtype=kv_dtype) for kind in ("encoder", "decoder")]
        per_stream = sum(stage.pool.pages_per_stream * stage.pool.page_bytes() for stage in stages)
        results[name] = {"GB_per_stream": per_stream / GB}
        if bench_batch.DEVICE.startswith("cuda"):  # the one stream each pool holds counts among those that fit
            free = torch.cuda.mem_get_info()[0] - headroom_gb * GB
            results[name]["streams_that_fit"] = 1 + int(max(0.0, free) // per_stream)
        del stages
        release_memory()
    return results


def full_window_streams(model_dir: Path, counts: list[int], seconds: float) -> dict:
    """bench_batch's paced full-window streams with fp8 KV at each count, and the most that kept real time."""
    settings = {"max_streams": max(counts), "kv_dtype": "fp8"}
    encoder, decoder = (model_stage(kind, model_dir, **settings) for kind in ("encoder", "decoder"))
    trials = [realtime_full_windows(encoder, decoder, count, seconds) for count in counts]
    return {"trials": trials, "real_time": largest_real_time(trials)}


def decoder_steps(model_dir: Path, bandwidth: float, full: int) -> dict:
    """The one-stream decoder step at a full window in bf16, with fp8 KV, fp8 weights, and both; each beside
    the same step at MINUTE_POSITIONS (a one-minute stream's end)."""
    model = open_model(model_dir.resolve())
    results = {}
    for name, formats in {"bf16": {}, **VARIANTS}.items():
        decoder = model_stage("decoder", model_dir, max_streams=1, **formats)
        weights = fp8_decoder_bytes(model, formats)
        results[name] = step_sweep(decoder, "decoder", full, [1], bandwidth, weights)[0]
        results[name]["minute"] = step_sweep(decoder, "decoder", MINUTE_POSITIONS, [1], bandwidth, weights)[0]
        del decoder
        release_memory()
    for name in VARIANTS:
        results[name]["x_bf16"] = results[name]["ms"] / results["bf16"]["ms"]
        results[name]["minute"]["x_bf16"] = results[name]["minute"]["ms"] / results["bf16"]["minute"]["ms"]
    return results


def batched_steps(model_dir: Path, bandwidth: float, sizes: list[int]) -> dict:
    """bench_batch's batched step sweep with fp8 KV: the encoder at 3000 frames, the decoder at 750 positions."""
    weights = weight_bytes(open_model(model_dir.resolve()))
    results = {}
    settings = {"max_streams": max(sizes), "kv_dtype": "fp8", "reserve_s": 60.0}
    # The decoder's pool sized for the sweep's 750 positions a stream, not whole windows (which would not fit).
    for kind, positions, memory in (("encoder", 3000, {}), ("decoder", MINUTE_POSITIONS, {"kv_memory_gb": 15.0})):
        stage = model_stage(kind, model_dir, **settings, **memory)
        results[kind] = step_sweep(stage, kind, positions, sizes, bandwidth, weights[kind])
        del stage
        release_memory()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: write a full-size random one)")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--json", type=Path, default=Path("bench_fp8.json"))
    parser.add_argument("--parts", default="logits,memory,steps,full", help="which parts to run, comma-separated")
    parser.add_argument("--positions", type=int, default=1100, help="teacher-forced decoder positions")
    parser.add_argument("--headroom-gb", type=float, default=6.0, help="GPU memory kept for activations, graphs")
    parser.add_argument("--full-streams", default="", help="full-window stream counts (default: up to what fits)")
    parser.add_argument("--paced-seconds", type=float, default=30.0)
    parser.add_argument("--device", default=bench_batch.DEVICE, help="cpu: a dry run (give --model a small model)")
    args = parser.parse_args()
    bench_batch.DEVICE = args.device  # bench_batch's stages, synchronisation and memory figures follow it
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    results: dict = {"gpu": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__}
    model_dir = args.model or args.workdir / "model"
    if not (model_dir / "consolidated.safetensors").exists():
        write_tiny_checkpoint(model_dir, REAL_SIZE, seed=0, dtype="bfloat16", device="cuda")
    bandwidth = copy_bandwidth(device) if on_gpu and "steps" in args.parts else 1e10
    full = open_model(model_dir.resolve()).params.decoder.sliding_window + 100  # a ring past its window
    for part in args.parts.split(","):  # each part's figures saved as soon as it ends
        if part == "logits":
            figures = logits(model_dir, device, args.positions)
            figures["cache_write_bits_equal_quantize"] = cache_write_bits(device)
        elif part == "memory":
            figures = full_window_memory(model_dir, args.headroom_gb)
        elif part == "steps":
            sizes = BATCH_SIZES if on_gpu else BATCH_SIZES[:2]
            figures = {
                "copy_bandwidth_GBps": bandwidth / GB,
                "decoder_one_stream": decoder_steps(model_dir, bandwidth, full),
                "batched_fp8_kv": batched_steps(model_dir, bandwidth, sizes),
            }
        elif part == "full":
            if args.full_streams:
                counts = [int(n) for n in args.full_streams.split(",")]
            else:  # half of what fits, and all of it
                most = (results.get("memory") or full_window_memory(model_dir, args.headroom_gb))["fp8"]
                counts = [max(1, most["streams_that_fit"] // 2), most["streams_that_fit"]]
            figures = full_window_streams(model_dir, counts, args.paced_seconds)
        else:
            parser.error(f"unknown part {part!r} (logits, memory, steps, full)")
        results[part] = figures
        print(f"{part}:", json.dumps(figures), flush=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
