"""Write a random Voxtral Realtime model directory in the real Mistral layout.

params.json, consolidated.safetensors and tekken.json, exactly as Mistral publishes them, with dimensions,
heads, windows and delay as options; deterministic for a seed. Tiny by default (tests use it); `--real-size`
writes the published model's shapes (for GPU benchmarks).

Run from the repository root: `python -m tools.make_tiny_checkpoint OUT_DIR [options]`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    FRAME_RATE,
    HOP_LENGTH,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    WINDOW_SIZE,
)
from voxtral_run.stages.model.checkpoint import (
    ADA_NORM_DIM,
    CONSOLIDATED_FILE,
    PARAMS_FILE,
    TEKKEN_FILE,
    expected_tensor_shapes,
    parse_params,
    torch_dtype,
)
from voxtral_run.tools.tiny_tekken import write_tiny_tekken

NUM_SPECIAL_TOKENS = 1000


@dataclass(frozen=True)
class CheckpointSpec:
    """Shapes and settings of a model to write; the defaults are a tiny model that runs in seconds on a CPU."""

    enc_dim: int = 32
    enc_layers: int = 2
    enc_heads: int = 4
    enc_head_dim: int = 16
    enc_hidden_dim: int = 64
    enc_window: int = 750
    dec_dim: int = 64
    dec_layers: int = 2
    dec_heads: int = 4
    dec_kv_heads: int = 2
    dec_head_dim: int = 16
    dec_hidden_dim: int = 96
    dec_window: int = 8192
    num_normal_tokens: int = 266
    delay_ms: int = 480
    left_pad_tokens: int = 32


TINY = CheckpointSpec()

# The published model's shapes (docs/MODEL.md §1).
REAL_SIZE = CheckpointSpec(
    enc_dim=1280, enc_layers=32, enc_heads=32, enc_head_dim=64, enc_hidden_dim=5120, enc_window=750,
    dec_dim=3072, dec_layers=26, dec_heads=32, dec_kv_heads=8, dec_head_dim=128, dec_hidden_dim=9216,
    dec_window=8192, num_normal_tokens=131072 - NUM_SPECIAL_TOKENS,
)  # fmt: skip


def params_json(spec: CheckpointSpec) -> dict:
    """params.json content in the published structure (docs/MODEL.md §1) for these shapes."""
    return {
        "dim": spec.dec_dim,
        "n_layers": spec.dec_layers,
        "head_dim": spec.dec_head_dim,
        "hidden_dim": spec.dec_hidden_dim,
        "n_heads": spec.dec_heads,
        "n_kv_heads": spec.dec_kv_heads,
        "use_biases": False,
        "causal": True,
        "rope_theta": 1000000.0,
        "norm_eps": 1e-05,
        "vocab_size": NUM_SPECIAL_TOKENS + spec.num_normal_tokens,
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": spec.dec_window,
        "model_max_length": 131072,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": SAMPLE_RATE,
                        "frame_rate": FRAME_RATE,
                        "num_mel_bins": NUM_MEL_BINS,
                        "hop_length": HOP_LENGTH,
                        "window_size": WINDOW_SIZE,
                        "chunk_length_s": None,
                        "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": spec.enc_dim,
                    "n_layers": spec.enc_layers,
                    "head_dim": spec.enc_head_dim,
                    "hidden_dim": spec.enc_hidden_dim,
                    "n_heads": spec.enc_heads,
                    "vocab_size": 131072,
                    "n_kv_heads": spec.enc_heads,
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": 1000000.0,
                    "causal": True,
                    "norm_eps": 1e-05,
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": spec.enc_window,
                },
                "downsample_args": {"downsample_factor": ENCODER_FRAMES_PER_TOKEN},
            }
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": ADA_NORM_DIM,
    }


# With plain 1/sqrt(fan_in) weights the fed-back token's embedding dominates the residual stream and the
# greedy output repeats one id; small embeddings and a strong adapter let the audio decide.
TOKEN_EMBEDDING_STD = 0.3
ADAPTER_GAIN = 3.0


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random weights scaled so activations keep unit size and the greedy output varies with the audio."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if name.endswith("norm.weight"):
        return 1 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if name.endswith("tok_embeddings.weight"):
        return TOKEN_EMBEDDING_STD * noise
    gain = ADAPTER_GAIN if "audio_language_projection" in name else 1.0
    return gain * noise / math.sqrt(math.prod(shape[1:]))


def write_tiny_checkpoint(
    out_dir: Path, spec: CheckpointSpec = TINY, *, seed: int = 0, dtype: str = "float32", device: str = "cpu"
) -> Path:
    """Write params.json, consolidated.safetensors and tekken.json for `spec` into `out_dir`; returns it.

    `device` is where the random numbers are drawn (a GPU makes the real size take seconds, not minutes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PARAMS_FILE).write_text(json.dumps(params_json(spec), indent=2) + "\n")
    generator = torch.Generator(device=device).manual_seed(seed)
    target = torch_dtype(dtype)
    tensors = {
        name: random_tensor(name, shape, generator).to(target).cpu()
        for name, shape in sorted(expected_tensor_shapes(parse_params(out_dir / PARAMS_FILE)).items())
    }
    save_file(tensors, str(out_dir / CONSOLIDATED_FILE))
    write_tiny_tekken(
        out_dir / TEKKEN_FILE,
        num_normal_tokens=spec.num_normal_tokens,
        delay_ms=spec.delay_ms,
        left_pad_tokens=spec.left_pad_tokens,
        seed=seed,
    )
    return out_dir


def main() -> None:
    """Command line: every CheckpointSpec field is an option."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--real-size", action="store_true", help="the published model's shapes (8.9 GB in bf16)")
    parser.add_argument("--device", default="cpu", help="where to draw the random weights (cpu, cuda)")
    for item in fields(CheckpointSpec):
        parser.add_argument("--" + item.name.replace("_", "-"), type=int, default=None)
    args = parser.parse_args()
    base = REAL_SIZE if args.real_size else TINY
    overrides = {k: getattr(args, k) for k in asdict(base) if getattr(args, k) is not None}
    out = write_tiny_checkpoint(
        args.out_dir, replace(base, **overrides), seed=args.seed, dtype=args.dtype, device=args.device
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
