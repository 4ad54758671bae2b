"""The KV cache's rings: attention over them equals attention over every key ever written, across wraps."""

from __future__ import annotations

import torch

from voxtral_run.stages.model.cache import MIN_SPAN, single_stream_cache, span_for
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.layers import Block, RotaryEmbedding, fuse_projections, position_inputs

PARAMS = TransformerParams(
    dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=1e-5,
    sliding_window=10, use_biases=True,
)  # fmt: skip


class EveryKey:
    """The oracle: keeps every key and value ever written, so attention sees the whole history (the bias then
    drops what lies outside the window)."""

    def __init__(self, window: int, rows: int) -> None:
        self.window = window
        self.keys = self.values = None
        self.positions = torch.zeros(rows, 0, dtype=torch.long)

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        self.positions = torch.cat((self.positions, positions), dim=1)
        return self.positions

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = keys if self.keys is None else torch.cat((self.keys, keys), dim=1)
        self.values = values if self.values is None else torch.cat((self.values, values), dim=1)
        return self.keys, self.values


def test_ring_attention_equals_attention_over_every_key_across_wraps() -> None:
    """Forwards of 1..5 positions for a batch of 2 rows through a block, many times around a ring of
    window - 1 + 5 slots (aligned up)."""
    torch.manual_seed(0)
    layer = Block(PARAMS)
    fuse_projections(layer)
    rope = RotaryEmbedding(PARAMS.head_dim, PARAMS.rope_theta)
    window = PARAMS.sliding_window
    oracle = EveryKey(window, rows=2)
    ring = single_stream_cache(
        window, 5, 1, PARAMS.n_kv_heads, PARAMS.head_dim, rows=2, dtype=torch.float32, device="cpu"
    )
    position = 0
    with torch.inference_mode():
        for block in [1, 5, 3, 2, 5, 4, 1, 1, 5, 5, 5, 2, 3] * 12:
            x = torch.randn(2, block, PARAMS.dim)
            positions = torch.arange(position, position + block).expand(2, -1)
            ring.prepare(position + block)
            outputs = []
            for cache in (oracle, ring):
                rotations, bias = position_inputs(positions, rope, cache, x.dtype)
                outputs.append(layer(x, rotations, bias, cache, 0))
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
            position += block
    assert position > 2 * ring.capacity  # the ring wrapped more than once


def test_span_reads_the_filled_prefix_rounded_up_until_the_ring_wraps() -> None:
    assert span_for(1, 8255) == MIN_SPAN
    assert span_for(MIN_SPAN + 1, 8255) == 2 * MIN_SPAN
    assert span_for(5000, 8255) == 8192
    assert span_for(8200, 8255) == 8255
    assert span_for(10**6, 8255) == 8255
    assert span_for(3, 20) == 20
