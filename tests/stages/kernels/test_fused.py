"""The fused kernels (in Triton's CPU interpreter here) compute what the model's eager blocks compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from voxtral_run.stages.kernels.fused import FusedBlocks, fused_kernels_available
from voxtral_run.stages.model.cache import single_stream_cache
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.decoder import FP8_LINEARS
from voxtral_run.stages.model.fp8 import FP8, dequantize, quantize_linears
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


# Where each stream of a batch starts, at its own position (whole steps of 4, as the encoder's are): a few steps
# before its ring of 64 slots wraps.
STARTS = (44, 52, 48)


def step_both(blocks, rope, params, streams: int, rows: int, steps: int, kv_dtype: torch.dtype, ffn_scales) -> list:
    """`steps` steps of `rows` positions for `streams` streams (from STARTS) through the eager blocks and the
    fused ones, each over its own cache of `kv_dtype`, with the same output at every step: their pools."""
    fused = FusedBlocks(blocks, rope)
    shape = (params.sliding_window, rows, len(blocks), params.n_kv_heads, params.head_dim)
    caches = [single_stream_cache(*shape, rows=streams, dtype=kv_dtype, device="cpu") for _ in "ab"]
    starts = torch.tensor(STARTS[:streams])[:, None]
    with torch.inference_mode():
        for step in range(steps):
            x = torch.randn(streams, rows, params.dim)
            positions = starts + torch.arange(step * rows, (step + 1) * rows)
            for cache in caches:
                cache.prepare((positions[:, -1] + 1).tolist())
            eager = eager_blocks(blocks, rope, x, positions, caches[0], ffn_scales)
            torch.testing.assert_close(fused(x, positions, caches[1], ffn_scales), eager, rtol=1e-5, atol=1e-5)
    return [cache.pool for cache in caches]


@pytest.mark.parametrize(
    ("params", "streams", "rows", "scaled"),
    [(DECODER_LIKE, 1, 1, True), (ENCODER_LIKE, 1, 4, False), (DECODER_LIKE, 3, 1, True), (ENCODER_LIKE, 3, 4, False)],
    ids=["decoder", "encoder", "decoder-batch", "encoder-batch"],
)
def test_fused_blocks_step_like_the_eager_blocks(params, streams, rows, scaled) -> None:
    """Decoder-like blocks (one position, no biases, FFN scales) and encoder-like ones (4 positions, biases)
    stepped over rings that wrap, for one stream (the fused kernels) and a batch of streams at different
    positions (products through torch, attention through each row's pages): the fused blocks give the eager
    blocks' output at every step, and leave the same keys and values in the pool."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(params) for _ in range(2))
    fuse_projections(blocks)
    assert fused_kernels_available(torch.device("cpu"))
    rope = RotaryEmbedding(params.head_dim, params.rope_theta)
    ffn_scales = [1 + 0.1 * torch.randn(streams, 1, params.dim) for _ in blocks] if scaled else None
    positions = 36  # a window (12) filled before each ring wraps, and again after
    pools = step_both(blocks, rope, params, streams, rows, positions // rows, torch.float32, ffn_scales)
    torch.testing.assert_close(pools[1].keys, pools[0].keys, rtol=1e-5, atol=1e-5)
    assert torch.equal(pools[1].positions, pools[0].positions)
    assert min(STARTS[:streams]) + positions > pools[0].capacity + params.sliding_window  # every ring wrapped


@pytest.mark.parametrize(
    ("params", "streams", "rows", "fp8_weights"),
    [(DECODER_LIKE, 1, 1, True), (DECODER_LIKE, 3, 1, True), (ENCODER_LIKE, 1, 4, False)],
    ids=["decoder", "decoder-batch", "encoder"],
)
def test_fused_blocks_over_an_8_bit_cache_step_like_the_eager_blocks(params, streams, rows, fp8_weights) -> None:
    """An e4m3 KV pool (and, the decoder's, e4m3 linear weights): the fused blocks' writes, attention and
    products compute what the eager blocks compute over the same stored values."""
    torch.manual_seed(1)
    blocks = nn.ModuleList(Block(params) for _ in range(2))
    fuse_projections(blocks)
    if fp8_weights:
        quantize_linears(blocks, FP8_LINEARS)
    rope = RotaryEmbedding(params.head_dim, params.rope_theta)
    pools = step_both(blocks, rope, params, streams, rows, 8 // rows, FP8, None)
    # The stored keys' inputs differ by float32 rounding, so an e4m3 value may land one step (2^-3 of it, or 2^-9
    # of the scale below the normal range) away.
    torch.testing.assert_close(pools[1].scales[0], pools[0].scales[0], rtol=1e-5, atol=0)
    fused_keys, eager_keys = (dequantize(pool.keys, pool.scales[0], torch.float32) for pool in pools)
    step = 2.0**-3 * torch.maximum(fused_keys.abs(), eager_keys.abs()) + 2.0**-9 * pools[0].scales[0][..., None]
    assert ((fused_keys - eager_keys).abs() <= step * (1 + 1e-5)).all()
