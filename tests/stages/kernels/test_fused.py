"""The fused kernels (in Triton's CPU interpreter here) compute what the model's eager blocks compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from voxtral_run.stages.kernels.fused import FusedBlocks, fused_kernels_available
from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.layers import Block, RotaryEmbedding, fuse_projections, position_inputs

DECODER_LIKE = TransformerParams(
    dim=64, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=1e-5,
    sliding_window=12, use_biases=False,
)  # fmt: skip
ENCODER_LIKE = dataclasses.replace(DECODER_LIKE, n_kv_heads=4, use_biases=True)


def eager_blocks(blocks: nn.ModuleList, rope: RotaryEmbedding, x, positions, cache, ffn_scales):
    """What a model's `blocks` method does."""
    rotations, bias = position_inputs(positions, rope, cache, x.dtype)
    for index, block in enumerate(blocks):
        x = block(x, rotations, bias, cache, index, None if ffn_scales is None else ffn_scales[index])
    return x


@pytest.mark.parametrize(
    ("params", "rows", "scaled"), [(DECODER_LIKE, 1, True), (ENCODER_LIKE, 4, False)], ids=["decoder", "encoder"]
)
def test_fused_blocks_step_like_the_eager_blocks(params, rows, scaled) -> None:
    """A decoder-like pair of blocks (one row, no biases, FFN scales: the one-row kernel) and an encoder-like
    pair (4 rows, biases: the tile kernel) stepped over a ring that wraps (whose slots the q/k/v kernel fills):
    the fused blocks give the eager blocks' output at every step, and leave the same cache."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(params) for _ in range(2))
    fuse_projections(blocks)
    assert fused_kernels_available(torch.device("cpu"))
    rope = RotaryEmbedding(params.head_dim, params.rope_theta)
    fused = FusedBlocks(blocks, rope)
    ffn_scales = [1 + 0.1 * torch.randn(params.dim) for _ in blocks] if scaled else None
    shape = (params.sliding_window, rows, len(blocks), params.n_kv_heads, params.head_dim)
    caches = [KVCache(*shape, dtype=torch.float32, device="cpu") for _ in "ab"]
    with torch.inference_mode():
        for step in range(80 // rows):
            x = torch.randn(1, rows, params.dim)
            positions = torch.arange(step * rows, (step + 1) * rows)[None]
            for cache in caches:
                cache.prepare((step + 1) * rows)
            eager = eager_blocks(blocks, rope, x, positions, caches[0], ffn_scales)
            torch.testing.assert_close(fused(x, positions, caches[1], ffn_scales), eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(caches[1].keys, caches[0].keys, rtol=1e-5, atol=1e-5)
            assert torch.equal(caches[1].positions, caches[0].positions)
    assert (step + 1) * rows > caches[0].capacity  # the ring wrapped
