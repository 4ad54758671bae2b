"""bf16 rounding of the elementwise layers follows the reference (spec 11.9), bit for bit; the steps' fused
product kernels (in Triton's CPU interpreter here) compute what the eager blocks do."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers.models.voxtral_realtime.modeling_voxtral_realtime import (
    VoxtralRealtimeRMSNorm,
    apply_rotary_pos_emb,
)

from voxtral_run.stages.kernels.matvec import matvec_available
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.layers import (
    EAGER,
    Block,
    RMSNorm,
    RollingKVCache,
    RotaryEmbedding,
    StaticKVCache,
    attention_bias,
    fuse_projections,
    fused_block_functions,
    fused_products_serve,
)

HEAD_DIM = 64


def test_rms_norm_in_bf16_equals_the_reference_bit_for_bit() -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(7, 256)).bfloat16()
    weight = (1 + 0.5 * torch.randn(256)).bfloat16()
    ours, theirs = RMSNorm(256, 1e-5).bfloat16(), VoxtralRealtimeRMSNorm(256, eps=1e-5).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        assert torch.equal(ours(x), theirs(x))


def test_rope_in_bf16_equals_the_reference_rotate_half_bit_for_bit() -> None:
    """Interleaved pairs (2i, 2i+1) are the reference's rotate-half pairs (i, i + head_dim/2), permuted."""
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 749, 5000, 123456])
    q, k = torch.randn(len(positions), 4, HEAD_DIM).bfloat16(), torch.randn(len(positions), 2, HEAD_DIM).bfloat16()
    rope = RotaryEmbedding(HEAD_DIM, 1e6)
    rotations = rope.rotations(positions, torch.bfloat16)
    ours_q, ours_k = RotaryEmbedding.apply(q, rotations), RotaryEmbedding.apply(k, rotations)

    def rotate_half_order(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] interleaved -> [1, H, T, D] halves
        return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1).transpose(0, 1)[None]

    # transformers' cos/sin: the same fp32 angles, each half repeated, rounded to bf16.
    angles = positions.float()[:, None] * rope.inv_freq[None, :]
    doubled = torch.cat((angles, angles), -1)
    cos, sin = doubled.cos().bfloat16()[None], doubled.sin().bfloat16()[None]
    theirs_q, theirs_k = apply_rotary_pos_emb(rotate_half_order(q), rotate_half_order(k), cos, sin)
    assert torch.equal(rotate_half_order(ours_q), theirs_q)
    assert torch.equal(rotate_half_order(ours_k), theirs_k)


DECODER_LIKE = TransformerParams(
    dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=1e-5,
    sliding_window=12, use_biases=False,
)  # fmt: skip
ENCODER_LIKE = dataclasses.replace(DECODER_LIKE, n_kv_heads=4, use_biases=True)


@pytest.mark.skipif(not matvec_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)")
@pytest.mark.parametrize(
    ("params", "rows", "scaled"), [(DECODER_LIKE, 1, True), (ENCODER_LIKE, 4, False)], ids=["decoder", "encoder"]
)
@pytest.mark.parametrize("static", [True, False], ids=["static-ring", "rolling"])
def test_fused_blocks_step_like_the_eager_blocks(params, rows, scaled, static) -> None:
    """A decoder-like pair of blocks (one row, no biases, an FFN scale: the one-row kernel) and an encoder-like
    pair (4 rows, biases: the tile kernel) stepped over a static ring that wraps (whose slots the q/k/v kernel
    fills) or a rolling cache: the fused kernels' blocks give the eager blocks' output at every step."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(params) for _ in range(2))
    fuse_projections(blocks)
    assert fused_products_serve(blocks)
    rope = RotaryEmbedding(params.head_dim, params.rope_theta)
    ffn_scale = 1 + 0.1 * torch.randn(params.dim) if scaled else None
    shape = (params.sliding_window, rows, len(blocks), params.n_kv_heads, params.head_dim)
    caches = [
        StaticKVCache(*shape, dtype=torch.float32, device="cpu")
        if static
        else RollingKVCache(params.sliding_window, len(blocks))
        for _ in "ab"
    ]
    with torch.inference_mode():
        for step in range(40 // rows):
            x = torch.randn(rows, params.dim)
            positions = torch.arange(step * rows, (step + 1) * rows)
            rotations = rope.rotations(positions, x.dtype)
            outputs = []
            for cache, functions in zip(caches, (EAGER, fused_block_functions(blocks)), strict=True):
                cache.prepare((step + 1) * rows)
                bias = attention_bias(positions, cache.begin(positions), params.sliding_window, x.dtype)
                h = x
                for index, block in enumerate(blocks):
                    h = block(h, rotations, cache, index, bias, ffn_scale, functions)
                cache.end()
                outputs.append(h)
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
