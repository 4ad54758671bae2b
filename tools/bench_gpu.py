"""GPU benchmark of voxtral-run against its memory-bandwidth floor and against transformers, in one command.

On a machine with a CUDA GPU: writes (or takes) a full-size random checkpoint in the real layout, measures
the copy bandwidth, the cold load to first token, per-80 ms encoder and decoder step times on a long stream,
transformers' streaming generate on the same weights, and bf16 logits against transformers' bf16 logits.
Prints one table last and writes every figure as JSON.

Run from the repository root: `python -m tools.bench_gpu [--model DIR] [--seconds 60] [--json OUT.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from voxtral_run.stages.audio.constants import SAMPLE_RATE, SAMPLES_PER_TOKEN, delay_tokens, pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.factory import STAGE_PARAMS, build_stage, open_model
from voxtral_run.stages.kernels.fused import FusedBlocks
from voxtral_run.stages.kernels.graphs import StepGraphs
from voxtral_run.stages.kernels.overlap import NO_OVERLAP, Overlap
from voxtral_run.stages.model.checkpoint import DECODER_PREFIXES, ENCODER_PREFIX, ModelDir
from voxtral_run.stages.model.decoder import streaming_prompt
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE, write_tiny_checkpoint

BYTES_PER_BF16 = 2
# The steps' kernels overlapping their neighbours otherwise than by default (see stages.kernel_overlap).
OVERLAP_VARIANTS = {
    "no_overlap": NO_OVERLAP,
    "no_prefetch": Overlap(prefetch_bytes=0),
    "prefetch_4MB": Overlap(prefetch_bytes=4 << 20),
    "late_weights": Overlap(early_weights=False),
}


def synthetic_speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Deterministic audio whose spectrum changes every 160 ms (no real speech exists on the machine)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = np.zeros(n)
    for start in range(0, n, 2 * SAMPLES_PER_TOKEN):
        part = slice(start, start + 2 * SAMPLES_PER_TOKEN)
        loud, pitch = rng.choice([0.0, 0.05, 0.3]), rng.uniform(100, 3000)
        audio[part] = loud * (0.5 * np.sin(2 * np.pi * pitch * t[part]) + 0.3 * rng.standard_normal(len(t[part])))
    return (np.round(np.clip(audio, -1, 1) * 32767) / 32768).astype(np.float32)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written (median of 20)."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * 2 * 1024**3 / statistics.median(times[3:])


def weight_bytes(model: ModelDir) -> dict[str, int]:
    """Bytes of weights the encoder reads per 80 ms (its transformer) and the decoder per step (its layers,
    the adapter and the whole token-embedding matrix, which is also the LM head)."""
    shapes = model.tensor_shapes()

    def count(*prefixes: str) -> int:
        return sum(int(np.prod(shape)) for name, shape in shapes.items() if name.startswith(prefixes))

    return {
        "encoder": count(ENCODER_PREFIX + "transformer.") * BYTES_PER_BF16,
        "decoder": count(*DECODER_PREFIXES) * BYTES_PER_BF16,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_stream(stages: list, audio: np.ndarray, stream_id: str) -> dict:
    """Push 80 ms chunks through mel/encoder/decoder; time each stage's work per chunk (synchronised)."""
    mel, encoder, decoder = stages
    enc_times, dec_times, tokens, encoder_frames = [], [], [], []
    first_token_s = None
    start = time.perf_counter()
    for offset in range(0, len(audio), SAMPLES_PER_TOKEN):
        frames = mel.push(stream_id, audio[offset : offset + SAMPLES_PER_TOKEN])
        t0 = time.perf_counter()
        enc_out = [out for item in frames for out in encoder.push(stream_id, item)]
        torch.cuda.synchronize()
        encoder_frames.extend(enc_out)
        t1 = time.perf_counter()
        ids = [out for item in enc_out for out in decoder.push(stream_id, item)]
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        new = [int(i) for arr in ids for i in arr]
        if new and first_token_s is None:
            first_token_s = t2 - start
        # Steady state only: one 80 ms step of each (the prompt's prefill is a one-off).
        if sum(len(f) for f in enc_out) == 4 and len(new) == 1:
            enc_times.append(t1 - t0)
            dec_times.append(t2 - t1)
        tokens.extend(new)
    for stage in stages:
        stage.finish(stream_id)
    return {
        "wall_s": time.perf_counter() - start,
        "encoder_ms": [1000 * t for t in enc_times],
        "decoder_ms": [1000 * t for t in dec_times],
        "tokens": tokens,
        "encoder_frames": np.concatenate(encoder_frames) if encoder_frames else np.zeros((0, 0)),
        "first_token_s": first_token_s,
    }


def transformers_streaming(hf_model, audio: np.ndarray, model: ModelDir, num_delay: int, device) -> dict:
    """transformers' own streaming generate (first chunk, then 8 mel frames per step), timed per token."""
    left = model.tekken.audio.streaming_n_left_pad_tokens
    mel = log_mel_frames(pad_audio(audio, left, num_delay))
    prompt = streaming_prompt(model.tekken, num_delay)
    first = len(prompt) * 8

    def chunks():
        yield torch.from_numpy(mel[:first].T[None].copy()).to(device, torch.bfloat16)
        for start in range(first, mel.shape[0] - 7, 8):
            yield torch.from_numpy(mel[start : start + 8].T[None].copy()).to(device, torch.bfloat16)

    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=torch.tensor([prompt], device=device),
            input_features=chunks(),
            num_delay_tokens=num_delay,
            do_sample=False,
        )
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    generated = out.shape[1] - len(prompt)
    return {"ms_per_token": 1000 * elapsed / max(generated, 1), "tokens": generated}


def teacher_forced_logits(
    model_dir: Path, mel: np.ndarray, sequence: torch.Tensor, dtype: str, **formats: str
) -> torch.Tensor:
    """Our logits [T, vocab] (as float32) for a whole id sequence over its audio, run as one block; `formats`
    are the stages' kv_dtype, weights and lm_head settings (the decoder's; the encoder takes kv_dtype)."""
    device = sequence.device
    settings = {"dtype": dtype, "cuda_graphs": False, "fused_kernels": False, "max_streams": 1, **formats}
    encoder_settings = {key: value for key, value in settings.items() if key in STAGE_PARAMS["encoder"]}
    encoder = build_stage("encoder", model_dir=model_dir, device=str(device), params=encoder_settings)
    decoder = build_stage("decoder", model_dir=model_dir, device=str(device), params=settings)
    dec = decoder.decoder
    with torch.inference_mode():
        # The stage cuts a long item into pieces of one block, an output each.
        frames = np.concatenate(encoder.push("tf", mel[: 8 * len(sequence)]))
        frames = torch.from_numpy(frames).to(device, dec.norm.weight.dtype)
        cache = dec.new_cache(block=len(sequence))  # every position in one forward
        cache.prepare(len(sequence))
        positions = torch.arange(len(sequence), device=device)[None]
        scales = list(decoder.scales(decoder.num_delay_tokens))
        hidden = dec(dec.adapt(frames[None]), sequence[None], positions, cache, scales)
        return dec.logits(hidden)[0].float()


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative error per position (max |difference| over max |reference|) and greedy agreement."""
    relative = (logits - reference).abs().max(-1).values / reference.abs().max(-1).values
    return {
        "max_relative": float(relative.max()),
        "median_relative": float(relative.median()),
        "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


@contextmanager
def products_summed_in_reverse(model: torch.nn.Module) -> Iterator[None]:
    """Every nn.Linear of `model` adds its terms in reverse order: the same products and the same roundings,
    only the order of the float32 additions changed (what any other kernel or fusion changes)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.forward = lambda x, m=m: F.linear(x.flip(-1), m.weight.flip(-1), m.bias)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def logits_agreement(hf_model, model_dir: Path, stages: list, audio: np.ndarray, num_delay: int, device) -> dict:
    """Teacher-forced logits on the ids our decoder generates for `audio`: our bf16 against transformers' bf16, and
    both against our fp32 (which equals transformers' fp32 in the CPU tests). Transformers' bf16 against
    itself with its products summed in reverse order is what bf16 rounding alone moves the logits by."""
    ids = run_stream(stages, audio, "logits")["tokens"]
    model = open_model(model_dir.resolve())
    mel = log_mel_frames(pad_audio(audio, model.tekken.audio.streaming_n_left_pad_tokens, num_delay))
    prompt = streaming_prompt(model.tekken, num_delay)
    sequence = torch.tensor((prompt + ids)[: mel.shape[0] // 8], device=device)
    ours = teacher_forced_logits(model_dir, mel, sequence, "bfloat16")
    reference = teacher_forced_logits(model_dir, mel, sequence, "float32")
    with torch.inference_mode():
        # transformers needs exactly 8 mel frames per input id (a stream that hit EOS is shorter).
        features = torch.from_numpy(mel[: 8 * len(sequence)].T[None].copy()).to(device, torch.bfloat16)
        inputs = {"input_ids": sequence[None], "input_features": features, "num_delay_tokens": num_delay}
        theirs = hf_model(**inputs).logits[0].float()
        with products_summed_in_reverse(hf_model):
            theirs_reversed = hf_model(**inputs).logits[0].float()
    return {
        "ours_bf16_vs_transformers_bf16": compare_logits(ours, theirs),
        "ours_bf16_vs_fp32": compare_logits(ours, reference),
        "transformers_bf16_vs_fp32": compare_logits(theirs, reference),
        "transformers_bf16_vs_itself_summed_in_reverse": compare_logits(theirs_reversed, theirs),
    }


def transformers_comparison(model_dir: Path, stages: list, audio: np.ndarray, device, *, timed: bool) -> dict:
    """transformers in bf16 on the same weights: its streaming generate per token (when `timed`) and the bf16
    logits comparison."""
    from voxtral_run.tools.hf_reference import hf_model_for

    model = open_model(model_dir.resolve())
    num_delay = delay_tokens(model.tekken.audio.transcription_delay_ms)
    hf_model = hf_model_for(model_dir, dtype=torch.bfloat16, device="cuda")
    results = {}
    if timed:
        transformers_streaming(hf_model, audio[:SAMPLE_RATE], model, num_delay, device)  # warm-up
        results["transformers"] = transformers_streaming(hf_model, audio, model, num_delay, device)
    results["bf16_logits"] = logits_agreement(hf_model, model_dir, stages, audio, num_delay, device)
    return results


def profile_steps(stages: list, audio: np.ndarray) -> None:
    """Print the GPU kernels of a few steady-state 80 ms steps, most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    run_stream(stages, audio[: int(4 * SAMPLE_RATE)], "profile-warm")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_stream(stages, audio[: int(4 * SAMPLE_RATE)], "profile")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45), flush=True)


def run_pipeline(
    pipeline: Path, model_dir: Path, wav: Path, out_dir: Path, name: str, sets: tuple[str, ...] = ()
) -> dict:
    """The multi-process pipeline on a file fed at real-time pace: its ids and its end-of-run figures (its
    output, figures and trace written under `out_dir` as `name`.*)."""
    jsonl, stats, trace = (out_dir / f"{name}.{suffix}" for suffix in ("jsonl", "stats.json", "trace.json"))
    command = [
        sys.executable, "-m", "voxtral_run.runner", str(pipeline), "--model", str(model_dir), "--input", str(wav),
        "--realtime", "--format", "jsonl", "--output", str(jsonl), "--stats-json", str(stats),
        "--profile", str(trace), "--set", "decoder.stop_at_eos=false",
    ]  # fmt: skip
    for setting in sets:
        command += ["--set", setting]
    subprocess.run(command, check=True, timeout=600, stdout=subprocess.DEVNULL)
    done = json.loads(jsonl.read_text().splitlines()[-1])
    figures = json.loads(stats.read_text())
    service = {name: figures["stages"][name]["service_ms"]["p50"] for name in ("encoder", "decoder")}  # per 80 ms item
    latencies = token_latencies_ms(json.loads(trace.read_text()))
    return {
        "token_ids": done["token_ids"],
        "token_latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "n": len(latencies)},
        "end_to_end_ms": figures.get("end_to_end_ms"),
        "service_p50_ms": service,
    }


def token_latencies_ms(trace: dict) -> list[float]:
    """Per token, from the capture of the 80 ms chunk that completed its position to its detokenization.

    That chunk arrives `delay` after the audio the token describes, so this is the latency beyond the delay.
    Bursts (the prompt's prefill, the end-of-stream flush) share one capture time and are left out.
    """
    spans = [
        event
        for event in trace["traceEvents"]
        if event.get("ph") == "X" and event.get("name") == "detokenize" and not event["args"].get("end_of_stream")
    ]
    frames = [event["args"]["frame_ms"] for event in spans]
    return [
        (event["ts"] + event["dur"]) / 1000 - event["args"]["frame_ms"]
        for event in spans
        if frames.count(event["args"]["frame_ms"]) == 1
    ]


def pipelines(model_dir: Path, audio: np.ndarray, workdir: Path, results: dict) -> None:
    """Single-GPU pipeline latency as configured (every stage after capture polls busily), with every stage
    sleeping while it waits and with only the GPU stages polling; the two-GPU placement's ids against it when two
    GPUs exist."""
    import soundfile

    wav = workdir / "stream.wav"
    soundfile.write(wav, audio, SAMPLE_RATE, subtype="PCM_16")
    single = run_pipeline(Path("pipeline.yaml"), model_dir, wav, workdir, "pipeline")
    results["pipeline"] = {k: v for k, v in single.items() if k != "token_ids"}
    print("pipeline:", json.dumps(results["pipeline"]), flush=True)
    cpu_stages, gpu_stages = ("resample", "mel", "detokenize"), ("encoder", "decoder")
    variants = {
        "pipeline_sleeping": tuple(f"{stage}.busy_poll=false" for stage in cpu_stages + gpu_stages),
        "pipeline_gpu_stages_polling": tuple(f"{stage}.busy_poll=false" for stage in cpu_stages),
    }
    for key, sets in variants.items():
        run = run_pipeline(Path("pipeline.yaml"), model_dir, wav, workdir, key, sets)
        results[key] = {k: v for k, v in run.items() if k != "token_ids"}
        results[key]["ids_equal"] = run["token_ids"] == single["token_ids"]
        print(f"{key}:", json.dumps(results[key]), flush=True)
    if torch.cuda.device_count() >= 2:
        two = run_pipeline(Path("examples/two-gpus.yaml"), model_dir, wav, workdir, "two_gpus")
        results["two_gpus"] = {k: v for k, v in two.items() if k != "token_ids"}
        results["two_gpus"]["ids_equal_single_gpu"] = two["token_ids"] == single["token_ids"]
        results["two_gpus"]["tokens"] = len(two["token_ids"])
        print("two GPUs:", json.dumps(results["two_gpus"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory; default: write a random real-size one")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/voxtral-bench"))
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the long stream")
    parser.add_argument("--hf-seconds", type=float, default=12.0, help="audio for transformers' streaming run")
    parser.add_argument("--json", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the kernels of the steps, run without graphs")
    parser.add_argument("--pipeline-seconds", type=float, default=20.0, help="audio for the pipeline runs (0: skip)")
    parser.add_argument("--cold-start-only", action="store_true", help="print load and first-token time as JSON")
    parser.add_argument("--logits-only", action="store_true", help="only the bf16 logits comparison, printed as JSON")
    args = parser.parse_args()
    if args.cold_start_only:
        print(json.dumps(first_token(args.model)))
        return
    device = torch.device("cuda", 0)
    results: dict = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    try:
        measure(args, device, results)
    except BaseException:
        # Keep what was measured before the failure.
        args.json.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        raise
    if args.logits_only:
        args.json.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
    else:
        report(results, args)


def cold_start(model_dir: Path, compile_cache: Path) -> dict:
    """Load to first token in a fresh process (as a pipeline stage starts), with the given compile cache."""
    command = [sys.executable, "-m", "voxtral_run.tools.bench_gpu", "--model", str(model_dir), "--cold-start-only"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(compile_cache)}
    done = subprocess.run(command, check=True, timeout=600, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.splitlines()[-1])


def first_token(model_dir: Path) -> dict:
    """Open the directory, build the mel, encoder and decoder stages on the GPU, run until the first token."""
    start = time.perf_counter()
    stages = [build_stage(kind, model_dir=model_dir, device="cuda:0") for kind in ("mel", "encoder", "decoder")]
    load_s = time.perf_counter() - start
    warm = run_stream(stages, synthetic_speechlike(2.0), "cold")
    return {"load_s": load_s, "first_token_s": load_s + warm["first_token_s"]}


def model_stages(model_dir: Path, **settings) -> list:
    """Mel, encoder and decoder stages on cuda:0 with the given encoder and decoder settings."""
    settings = {"max_streams": 1, **settings}  # one stream: KV memory for no more
    decoder = {"stop_at_eos": False, **settings}  # random weights may say EOS anywhere; steps must go on
    params = {"mel": None, "encoder": settings, "decoder": decoder}
    return [build_stage(kind, model_dir=model_dir, device="cuda:0", params=params[kind]) for kind in params]


def variant(stages: list, audio: np.ndarray, reference: dict) -> dict:
    """Step times of a stage set on a short stream, and how its ids and encoder frames compare to a run's."""
    run = run_stream(stages, audio, "variant")
    figures = {f"{part}_p50_ms": percentile(run[f"{part}_ms"], 50) for part in ("encoder", "decoder")}
    figures["ids_equal"] = run["tokens"] == reference["tokens"]
    pairs = list(zip(run["tokens"], reference["tokens"], strict=False))  # a stream may end at EOS sooner
    figures["ids_agreement"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    figures["encoder_max_abs_diff"] = float(np.abs(run["encoder_frames"] - reference["encoder_frames"]).max())
    return figures


def matmul_only_ms(stages: list) -> dict:
    """Per step, the layers' matrix products alone (rows as in a step: 4 in the encoder, 1 in the decoder),
    replayed as one CUDA graph: what cuBLAS makes of the weight reads, before any other kernel."""
    encoder, decoder = stages[1].encoder, stages[2].decoder
    figures = {}
    for part, blocks, rows in (("encoder", encoder.transformer.layers, 4), ("decoder", decoder.layers, 1)):
        x = torch.randn(rows, blocks[0].attention.wqkv.in_features, device="cuda:0", dtype=torch.bfloat16)

        def step(blocks=blocks, x=x) -> None:
            for block in blocks:
                attention, ffn = block.attention, block.feed_forward
                out = attention.wo(attention.wqkv(x)[:, : attention.wo.in_features])
                ffn.w2(ffn.w13(out)[:, : ffn.w2.in_features])

        graphs = StepGraphs(step, torch.device("cuda:0"))
        graphs("only")  # warm-up and capture
        times = []
        for _ in range(50):
            torch.cuda.synchronize()
            start = time.perf_counter()
            graphs("only")
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        figures[part] = percentile(times, 50)
    return figures


def measure(args: argparse.Namespace, device: torch.device, results: dict) -> None:
    """Every measurement, filling `results` as it goes."""
    model_dir = args.model
    if model_dir is None:
        model_dir = args.workdir / "model"
        if not (model_dir / "consolidated.safetensors").exists():
            t = time.perf_counter()
            write_tiny_checkpoint(model_dir, REAL_SIZE, seed=0, dtype="bfloat16", device="cuda")
            results["write_checkpoint_s"] = time.perf_counter() - t
    if args.logits_only:
        audio = synthetic_speechlike(args.hf_seconds)
        results.update(transformers_comparison(model_dir, model_stages(model_dir), audio, device, timed=False))
        return
    results["copy_bandwidth_GBps"] = copy_bandwidth(device) / 1e9

    # Cold start in fresh processes: first with an empty compile cache (a first run on a machine), then
    # with the cache that run left (every later start). This process then uses that cache too.
    compile_cache = args.workdir / "compile-cache"
    shutil.rmtree(compile_cache, ignore_errors=True)
    results["cold_start"] = {when: cold_start(model_dir, compile_cache) for when in ("empty_cache", "warm_cache")}
    print("cold start:", json.dumps(results["cold_start"]), flush=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)

    audio = synthetic_speechlike(args.seconds)
    model = open_model(model_dir.resolve())
    stages = model_stages(model_dir)
    # The same code without CUDA graphs, with the model's own blocks (cuBLAS products, SDPA attention) in the
    # graphs instead of the fused kernels, and without the kernels' overlap (or with other L2 prefetching):
    # what each is worth, and how much each changes what is computed.
    check_audio = audio[: int(10 * SAMPLE_RATE)]
    graphed = run_stream(stages, check_audio, "graphed")
    # The default itself again, on the same audio as the variants: their yardstick (and a determinism check).
    results["variants"] = {"default": variant(stages, check_audio, graphed)}
    settings_of = {
        "no_cuda_graphs": {"cuda_graphs": False},
        "model_blocks": {"fused_kernels": False},
        **{name: {} for name in OVERLAP_VARIANTS},
    }
    for name, settings in settings_of.items():
        other = model_stages(model_dir, **settings)
        if name in OVERLAP_VARIANTS:
            encoder, decoder = other[1].encoder, other[2].decoder
            other[1].blocks = FusedBlocks(encoder.transformer.layers, encoder.rope, OVERLAP_VARIANTS[name])
            other[2].blocks = FusedBlocks(decoder.layers, decoder.rope, OVERLAP_VARIANTS[name])
        results["variants"][name] = variant(other, check_audio, graphed)
        if args.profile and name == "no_cuda_graphs":
            profile_steps(other, check_audio)
        del other
        torch.cuda.empty_cache()
    print("variants:", json.dumps(results["variants"]), flush=True)

    results["matmul_only_p50_ms"] = matmul_only_ms(stages)
    stream = run_stream(stages, audio, "long")
    floors = {k: v / (results["copy_bandwidth_GBps"] * 1e9) * 1000 for k, v in weight_bytes(model).items()}
    for part in ("encoder", "decoder"):
        times = stream[f"{part}_ms"]
        results[part] = {
            "p50_ms": percentile(times, 50),
            "p95_ms": percentile(times, 95),
            "floor_ms": floors[part],
            "p50_over_floor": percentile(times, 50) / floors[part],
            "steps": len(times),
        }
    results["real_time_factor"] = stream["wall_s"] / args.seconds
    results["distinct_ids"] = len(set(stream["tokens"]))
    print(json.dumps(results, indent=2), flush=True)
    step_ms = results["encoder"]["p50_ms"] + results["decoder"]["p50_ms"]

    if not args.skip_transformers:
        hf_audio = audio[: int(args.hf_seconds * SAMPLE_RATE)]
        results.update(transformers_comparison(model_dir, stages, hf_audio, device, timed=True))
        results["speedup_vs_transformers"] = results["transformers"]["ms_per_token"] / step_ms
        print(json.dumps(results["bf16_logits"], indent=2), flush=True)
    del stages
    torch.cuda.empty_cache()
    if args.pipeline_seconds > 0:
        pipelines(model_dir, audio[: int(args.pipeline_seconds * SAMPLE_RATE)], args.workdir, results)


def report(results: dict, args: argparse.Namespace) -> None:
    """Write the JSON and print the summary table."""
    args.json.write_text(json.dumps(results, indent=2))
    rows = [
        ("GPU", results["gpu"]),
        ("copy bandwidth", f"{results['copy_bandwidth_GBps']:.0f} GB/s"),
    ]
    for when, figures in results["cold_start"].items():
        rows.append(
            (f"cold start, {when.replace('_', ' ')}", f"load {figures['load_s']:.1f} s, first token "
             f"{figures['first_token_s']:.1f} s")
        )  # fmt: skip
    for part in ("encoder", "decoder"):
        r = results[part]
        rows.append(
            (f"{part} per 80 ms", f"p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, floor {r['floor_ms']:.2f} ms "
             f"({r['p50_over_floor']:.2f}x)")
        )  # fmt: skip
    only = results["matmul_only_p50_ms"]
    rows.append(("matrix products alone", f"encoder {only['encoder']:.2f} ms, decoder layers {only['decoder']:.2f} ms"))
    for name, v in results["variants"].items():
        rows.append(
            (name.replace("_", " "), f"p50 encoder {v['encoder_p50_ms']:.2f} ms, decoder {v['decoder_p50_ms']:.2f} "
             f"ms; ids equal: {v['ids_equal']} ({100 * v['ids_agreement']:.1f}%), encoder frames max |diff| "
             f"{v['encoder_max_abs_diff']:.2e}")
        )  # fmt: skip
    rows.append(("real-time factor", f"{results['real_time_factor']:.3f} ({args.seconds:.0f} s stream)"))
    if "transformers" in results:
        rows.append(("transformers streaming", f"{results['transformers']['ms_per_token']:.1f} ms/token"))
        rows.append(("speed-up vs transformers", f"{results['speedup_vs_transformers']:.1f}x"))
        for name, lg in results["bf16_logits"].items():
            rows.append(
                (name.replace("_", " "), f"max rel {lg['max_relative']:.2e}, median {lg['median_relative']:.2e}, "
                 f"greedy agreement {100 * lg['greedy_agreement']:.1f}%")
            )  # fmt: skip
    labels = {
        "pipeline": "pipeline",
        "pipeline_sleeping": "pipeline, no busy polling",
        "pipeline_gpu_stages_polling": "pipeline, GPU stages polling",
    }
    for key, label in labels.items():
        if key not in results:
            continue
        latency = results[key]["token_latency_ms"]
        service = results[key]["service_p50_ms"]
        rows.append(
            (f"{label}, per token", f"p50 {latency['p50']:.2f} ms, p95 {latency['p95']:.2f} ms beyond the "
             f"delay; service p50 encoder {service['encoder']:.2f} ms, decoder {service['decoder']:.2f} ms")
        )  # fmt: skip
    if "two_gpus" in results:
        two = results["two_gpus"]
        rows.append(("two GPUs: ids == one GPU", f"{two['ids_equal_single_gpu']} ({two['tokens']} tokens)"))
        rows.append(
            ("two GPUs: service p50", f"encoder {two['service_p50_ms']['encoder']:.2f} ms, decoder "
             f"{two['service_p50_ms']['decoder']:.2f} ms, token latency p95 {two['token_latency_ms']['p95']:.2f} ms")
        )  # fmt: skip
    print()
    for name, value in rows:
        print(f"{name:<30} {value}")


if __name__ == "__main__":
    main()
