"""The batched step's norm, RoPE-and-cache-write and SwiGLU kernels (Triton's CPU interpreter here) against the
model's eager operations, in float32: the interpreter truncates to bfloat16 where a GPU rounds to nearest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voxtral_run.stages.kernels.matvec import Heads, Norm
from voxtral_run.stages.kernels.rows_elementwise import norm_rows, rope_rows, swiglu_rows
from voxtral_run.stages.model.layers import RotaryEmbedding, rms_norm


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "ffn-scaled"])
def test_norm_rows_is_the_models_rms_norm(scaled) -> None:
    """Each row normalised, times the weight, times its stream's scale (one per stream, for all of its
    positions): within a few units in the last place (the sum's order, a square root and a division for
    rsqrt)."""
    torch.manual_seed(0)
    batch, length, dim = 3, 4, 80  # a width that is no power of two
    x = 4 * torch.randn(batch, length, dim)
    weight = 1 + 0.2 * torch.randn(dim)
    scale = 1 + 0.1 * torch.randn(batch, 1, dim) if scaled else None
    expected = rms_norm(x, weight, 1e-5)
    if scaled:
        expected = expected * scale
    got = norm_rows(x, Norm(weight, 1e-5, scale))
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    if not scaled:  # another stream's scale never reaches a row
        other = norm_rows(x, Norm(weight, 1e-5, torch.ones(batch, 1, dim)))
        torch.testing.assert_close(other, got, rtol=0, atol=0)


@pytest.mark.parametrize("cached", [True, False], ids=["cache-writes", "rotate-only"])
def test_rope_rows_rotates_as_the_model_and_writes_each_rows_slot(cached) -> None:
    """Queries and keys rotated exactly as `RotaryEmbedding.apply` rotates them, values untouched; with the
    cache's slot buffers, every row's key and value land in its own slot and no other slot changes."""
    torch.manual_seed(1)
    rows, heads, kv_heads, head_dim = 21, 4, 2, 16  # more rows than a program's tile; width 128 < its columns
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(rows, q_dim + 2 * kv_dim)
    positions = torch.randint(0, 5000, (1, rows))
    rotations = RotaryEmbedding(head_dim, 1e6).rotations(positions, torch.float32)[:, 0]
    keys = torch.full((64, kv_heads, head_dim), 7.0)
    values = torch.full((64, kv_heads, head_dim), 7.0)
    slots = torch.randperm(64)[:rows]
    original = qkv.clone()
    rotated = rope_rows(qkv, Heads(rotations, q_dim, kv_dim, head_dim, (keys, values, slots) if cached else None))
    expected = RotaryEmbedding.apply(original[None, :, : q_dim + kv_dim].unflatten(-1, (-1, head_dim)),
                                     rotations[:, None])[0].flatten(1)  # fmt: skip
    assert torch.equal(rotated, expected)
    assert torch.equal(qkv[:, q_dim + kv_dim :], original[:, q_dim + kv_dim :])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    if cached:
        assert torch.equal(keys[slots].flatten(1), expected[:, q_dim:])
        assert torch.equal(values[slots].flatten(1), original[:, q_dim + kv_dim :])
    else:
        untouched[:] = True
    assert (keys[untouched] == 7).all() and (values[untouched] == 7).all()


def test_swiglu_rows_is_silu_of_the_gate_times_up() -> None:
    """`silu(gate) * up` over [w1; w3]'s output."""
    torch.manual_seed(2)
    gate_up = 3 * torch.randn(2, 5, 2 * 1100)  # more columns than a program's block
    gate, up = gate_up.chunk(2, dim=-1)
    got = swiglu_rows(gate_up)
    assert got.shape == (2, 5, 1100)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-7)
