"""Builds a stage core by kind from a model directory, device and settings: the one entry point the runner uses."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxtral_run.stages.audio.constants import delay_tokens
from voxtral_run.stages.base import Source, Stage, StageError
from voxtral_run.stages.text.tekken import TEKKEN_FILE, Tekken, load_tekken

if TYPE_CHECKING:
    import torch

    from voxtral_run.stages.model.checkpoint import ModelDir

# Model stages import torch and the model code only when built, so the resample, detokenize and capture
# processes start in a fraction of a second.

STAGE_KINDS = ("capture", "resample", "mel", "encoder", "decoder", "detokenize")
MODEL_STAGE_KINDS = ("encoder", "decoder")  # the kinds that compute on their device; the others run on the CPU
AUTO_DEVICE = "auto"
# How many streams a model stage batches and how much KV memory it pools for them (stages/model_stages.py).
BATCH_PARAMS = ("max_streams", "kv_memory_gb", "reserve_s", "when_full")
DEFAULT_MAX_STREAMS = {"cuda": 32, "cpu": 4}
# kv_dtype, weights and lm_head: `auto`, the stage's dtype, or `fp8` (e4m3 with float32 scales; stages/model/fp8.py).
NUMBER_FORMATS = ("auto", "fp8")
FP8_PRODUCTS = ("weights", "lm_head")  # the decoder's products whose weights `fp8` stores in e4m3
MAX_STREAMS = 1024  # every one with its whole window's KV memory by default
# What the encoder and decoder both take: their number formats, their fast paths and their batching.
MODEL_PARAMS = ("dtype", "kv_dtype", "fused_kernels", "cuda_graphs", "capture_all", *BATCH_PARAMS)
# Settings each kind accepts in pipeline.yaml beyond device (capture checks its own: audio/capture.py).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "resample": (),
    "mel": (),
    "encoder": MODEL_PARAMS,
    "decoder": (*MODEL_PARAMS, "weights", "lm_head", "stop_at_eos"),
    "detokenize": (),
}


@functools.lru_cache(maxsize=4)
def open_model(model_dir: Path) -> ModelDir:
    """Open (and validate) a model directory once per process."""
    from voxtral_run.stages.model.checkpoint import ModelDir

    return ModelDir(model_dir)


def cuda_device_count() -> int:
    """CUDA GPUs this process can use (0 with a CPU-only torch build)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def auto_device() -> str:
    """What `device: auto` means on this host: the first CUDA GPU where there is one, else the CPU."""
    return "cuda:0" if cuda_device_count() else "cpu"


def resolve_device(device: str) -> torch.device:
    """A torch device for a placement string (auto, cpu, cuda, cuda:N), checked to exist on this host."""
    import torch

    if device == AUTO_DEVICE:
        device = auto_device()
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise StageError(f"unknown device '{device}' (use auto, cpu or cuda:N)") from None
    if resolved.type == "cuda":
        count = cuda_device_count()
        index = resolved.index or 0
        if index >= count:
            raise StageError(f"device '{device}' does not exist on this host ({count} CUDA device(s))")
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise StageError(f"unsupported device '{device}' (use auto, cpu or cuda:N)")
    return resolved


def _tekken(model_dir: Path) -> Tekken:
    path = Path(model_dir)
    if not path.is_dir():
        raise StageError(f"{path}: model directory not found")
    return load_tekken(path / TEKKEN_FILE)


def num_delay_tokens(tekken: Tekken, delay_ms: float | None) -> int:
    """Delay in tokens: the given delay, or tekken.json's transcription_delay_ms when None."""
    return delay_tokens(tekken.audio.transcription_delay_ms if delay_ms is None else delay_ms)


def build_stage(
    kind: str,
    *,
    model_dir: Path | None,
    device: str = "cpu",
    delay_ms: float | None = None,
    params: dict[str, Any] | None = None,
) -> Stage | Source:
    """The stage core of `kind` with its weights (if any) loaded on `device`; for `capture`, the audio source."""
    if kind == "capture":
        from voxtral_run.stages.audio.capture import build_source

        return build_source(params or {})
    if kind not in STAGE_PARAMS:
        raise StageError(f"unknown stage kind '{kind}' (choose from {', '.join(STAGE_PARAMS)})")
    params = dict(params or {})
    unknown = sorted(set(params) - set(STAGE_PARAMS[kind]))
    if unknown:
        raise StageError(f"stage '{kind}': unknown setting '{unknown[0]}'")
    target = resolve_device(device) if kind in MODEL_STAGE_KINDS else None
    if kind == "resample":
        from voxtral_run.stages.audio.resample import ResampleStage

        return ResampleStage()
    tekken = _tekken(model_dir)
    delay = num_delay_tokens(tekken, delay_ms)
    if kind == "mel":
        from voxtral_run.stages.audio.mel import MelStage

        return MelStage(tekken.audio.streaming_n_left_pad_tokens, delay)
    if kind == "detokenize":
        from voxtral_run.stages.text.detokenize import DetokenizeStage

        return DetokenizeStage(tekken)
    import torch

    from voxtral_run.stages.kernels.triton_cache import pin_triton_cache
    from voxtral_run.stages.model.checkpoint import torch_dtype
    from voxtral_run.stages.model.decoder import load_text_decoder
    from voxtral_run.stages.model.encoder import load_audio_encoder
    from voxtral_run.stages.model.fp8 import FP8
    from voxtral_run.stages.model_stages import DecoderStage, EncoderStage

    model = open_model(Path(model_dir).resolve())
    # On a GPU: bf16 (the published weights' dtype, as the reference runs), the fused kernels and CUDA graphs.
    # On a CPU: fp32, exact against the reference.
    on_gpu = target.type == "cuda"
    if on_gpu:
        pin_triton_cache(target)
    dtype = torch_dtype(params.get("dtype", "bfloat16" if on_gpu else "float32"))
    fp8 = {key: number_format(params, key) == "fp8" for key in ("kv_dtype", *FP8_PRODUCTS)}
    for key in FP8_PRODUCTS:
        if fp8[key] and dtype == torch.float16:
            # A product with e4m3 values (up to 448) before its scale may leave float16's range.
            raise StageError(f"{key}: fp8 runs with dtype bfloat16 or float32, not float16")
    fast = {
        "fused_kernels": bool(params.get("fused_kernels", on_gpu)),
        "cuda_graphs": bool(params.get("cuda_graphs", on_gpu)),
        "kv_fp8": fp8["kv_dtype"],
        **batch_settings(params, target.type, dtype),
    }
    capture_all = params.get("capture_all", False)
    if not isinstance(capture_all, bool):
        raise StageError(f"capture_all must be true or false, got {capture_all!r}")
    kv_dtype = FP8 if fp8["kv_dtype"] else dtype
    if kind == "encoder":
        encoder = load_audio_encoder(model, dtype=dtype, device=target)
        stage: EncoderStage | DecoderStage = EncoderStage(encoder, **pool_pages(fast, encoder.params, kv_dtype))
    else:
        decoder = load_text_decoder(
            model, dtype=dtype, device=target, fp8_weights=fp8["weights"], fp8_lm_head=fp8["lm_head"]
        )
        stop_at_eos = bool(params.get("stop_at_eos", True))
        settings = pool_pages(fast, decoder.params.decoder, kv_dtype)
        stage = DecoderStage(decoder, model.tekken, delay, stop_at_eos=stop_at_eos, **settings)
    if stage.fused_kernels or stage.cuda_graphs:
        # Compiling and capturing take seconds: done before the stage reports ready. Without graphs, capture_all
        # has nothing to capture.
        stage.warm_up(capture_all and stage.cuda_graphs)
    return stage


def number_format(params: dict[str, Any], key: str) -> str:
    """A model stage's kv_dtype, weights or lm_head setting, checked: one of NUMBER_FORMATS (default auto)."""
    value = params.get(key, "auto")
    if value not in NUMBER_FORMATS:
        raise StageError(f"{key} must be one of {', '.join(NUMBER_FORMATS)}, got {value!r}")
    return value


def batch_settings(params: dict[str, Any], device_type: str, dtype: torch.dtype) -> dict[str, Any]:
    """A model stage's batching settings from its params, checked: max_streams, when_full, reserve_s, and
    kv_memory_gb (kept for `pool_pages`, which knows the model)."""
    max_streams = params.get("max_streams", DEFAULT_MAX_STREAMS[device_type])
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not 1 <= max_streams <= MAX_STREAMS:
        raise StageError(f"max_streams must be an integer in 1..{MAX_STREAMS}, got {max_streams!r}")
    settings: dict[str, Any] = {"max_streams": max_streams, "when_full": params.get("when_full", "wait")}
    for key in ("reserve_s", "kv_memory_gb"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise StageError(f"{key} must be a number > 0, got {value!r}")
        settings[key] = value
    return settings


def pool_pages(settings: dict[str, Any], params: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Settings with kv_memory_gb turned into the pool's pages for a stack of `params` (None: whole windows)."""
    from voxtral_run.stages.model.cache import page_bytes

    settings = dict(settings)
    memory_gb = settings.pop("kv_memory_gb")
    size = page_bytes(params.n_layers, params.n_kv_heads, params.head_dim, dtype)
    settings["kv_pages"] = None if memory_gb is None else max(1, int(memory_gb * 1e9 // size))
    return settings
