"""The 8-bit KV cache's write kernel (in Triton's CPU interpreter here) stores what `fp8.quantize` computes, and
the kernels' 8-bit paths compile for an H100/H200."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.stages.kernels.test_overlap import PTX_FOR_HOPPER
from voxtral_run.stages.kernels.fp8_cache import store_fp8
from voxtral_run.stages.kernels.step_attention import step_attention_available
from voxtral_run.stages.model.fp8 import FP8, quantize

pytestmark = pytest.mark.skipif(
    not step_attention_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)"
)


def test_new_keys_and_values_enter_their_slots_as_quantize_computes_them() -> None:
    """Keys and values as a q/k/v product leaves them (strided views of one row per position) into scattered
    slots: the same bits and scales as `quantize`; the other slots untouched."""
    kv_heads, head_dim, slots = 2, 16, 10
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, (4 + 2 * kv_heads) * head_dim, generator=generator) * 10.0 ** torch.arange(-2, 1)[:, None]
    _, k, v = qkv.view(3, -1, head_dim).split((4, kv_heads, kv_heads), dim=1)
    stored = [torch.zeros(slots, kv_heads, head_dim, dtype=FP8) for _ in "kv"]
    scales = [torch.zeros(slots, kv_heads) for _ in "kv"]
    at = torch.tensor([7, 2, 5])
    store_fp8(k, v, tuple(stored), tuple(scales), at)
    for new, values, new_scales in zip((k, v), stored, scales, strict=True):
        expected, expected_scales = quantize(new)
        assert torch.equal(values[at].view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(new_scales[at], expected_scales)
        others = torch.ones(slots, dtype=torch.bool).index_fill_(0, at, False)
        assert values[others].float().eq(0).all() and new_scales[others].eq(0).all()


EIGHT_BIT_KERNELS = """
from voxtral_run.stages.kernels import fp8_cache
fp8 = {"w_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "keys_ptr": "*fp8e4nv",
       "values_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
       "pages_ptr": "*i64"}
codes = {
    "matvec": ptx(matvec._matvec, {
        "N": 9216, "K": 3072, "NORM": True, "SCALE": True, "SWIGLU": True, "RESIDUAL": False, "GELU": False,
        "W_SCALE": True, "BLOCK_N": 2, "BLOCK_K": 4096, "PREFETCH": True, "PDL": True, "EARLY": True,
        "ROPE": False, "CACHE": False, "Q_DIM": 0, "KV_DIM": 0, "HEAD_DIM": 2}, fp8),
    "split_attention": ptx(step_attention._split_attention, {
        "DOT": triton.language.bfloat16, "PRECISION": "tf32", "FP8_DOT": triton.language.float16,
        "LOG2_E": 1.4426950408889634, "ROWS": 16,
        "BLOCK": 64, "PREFETCH": False, "PDL": True, "PAGED": True, "LENGTH": 1, "GROUP": 4, "HEAD_DIM": 128,
        "MERGE_SLICES": 16, "MERGE_ROWS": 4, "EMPTY_PAGE": 0, "FP8": True, "SUB": 32}, fp8),
    "store_fp8": ptx(fp8_cache._store_fp8, {"E4M3_MAX": 448.0, "HEAD_DIM": 128},
                     {**fp8, "key_scales_ptr": "*fp32", "value_scales_ptr": "*fp32"}),
}
print(json.dumps({name: "cvt" in code for name, code in codes.items()}))
"""


def test_the_8_bit_paths_compile_for_hopper() -> None:
    """The fused product reading an e4m3 weight with its scales, attention over an e4m3 pool, and the cache
    write, compiled to PTX (and by ptxas) for an H100/H200, each with its e4m3 conversions."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = PTX_FOR_HOPPER + EIGHT_BIT_KERNELS
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"matvec": True, "split_attention": True, "store_fp8": True}
