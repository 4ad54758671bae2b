"""A model's step as fused kernels, reading the model's own weights: what its eager forward computes, for one
row of the batch, in five kernels a layer (norm + q/k/v + RoPE + cache writes; attention; output product +
residual; norm + w1/w3 + SwiGLU; w2 + residual), each launched to overlap its neighbours (see `overlap`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.kernels.matvec import Heads, Norm, matvec, matvec_available
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP, Overlap
from voxtral_run.stages.kernels.position_inputs import fused_position_inputs, position_inputs_available
from voxtral_run.stages.kernels.rows_matmul import rows_matmul, rows_matmul_available
from voxtral_run.stages.kernels.step_attention import MAX_ROWS, step_attention, step_attention_available
from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.decoder import TextDecoder
from voxtral_run.stages.model.layers import Block, RotaryEmbedding, position_inputs

# Queries [heads, T, head_dim], keys and values [T, kv_heads, head_dim]: one row's attention operands.
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fused_kernels_available(device: torch.device) -> bool:
    """Whether the fused kernels run on `device`: a CUDA GPU with Triton, or Triton's CPU interpreter."""
    return matvec_available(device) and rows_matmul_available(device)


def fused_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    heads: Heads | None = None,
    prefetch: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """A step's product with its fused work: `matvec` for one row without a bias (the decoder's), the tensor-core
    `rows_matmul` otherwise (the encoder's 4 rows)."""
    product = matvec if x.shape[0] == 1 and bias is None else functools.partial(rows_matmul, bias=bias)
    return product(
        x, weight, norm=norm, swiglu=swiglu, residual=residual, heads=heads, prefetch=prefetch, overlap=overlap
    )


def sdpa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The model's attention for one row: queries [heads, T, head_dim] against keys and values [S, kv_heads,
    head_dim] with bias [T, S] -> [heads, T, head_dim], by torch's SDPA."""
    return F.scaled_dot_product_attention(
        q[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=bias[None, None],
        enable_gqa=q.shape[0] != keys.shape[1],
    )[0]  # fmt: skip


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, overlap: Overlap
) -> torch.Tensor:
    """`sdpa_attention` as the split-key Triton kernel for a step's few query rows; SDPA itself for more."""
    if q.shape[0] // keys.shape[1] * q.shape[1] <= MAX_ROWS and step_attention_available(q.device):
        return step_attention(q, keys, values, bias, overlap)
    return sdpa_attention(q, keys, values, bias)


def attention_inputs(
    block: Block, x: torch.Tensor, rotations: torch.Tensor, slot_buffers: tuple, overlap: Overlap
) -> QKV:
    """The block's norm, q/k/v product and bias, RoPE and cache writes as one kernel, for x [T, dim]; it starts
    the output projection's weight into L2."""
    norm, attention = block.attention_norm, block.attention
    heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    qkv = fused_product(
        x,
        attention.wqkv.weight,
        bias=attention.wqkv.bias,
        norm=Norm(norm.weight, norm.eps),
        heads=Heads(rotations, heads * head_dim, kv_heads * head_dim, head_dim, slot_buffers),
        prefetch=attention.wo.weight,
        overlap=overlap,
    )
    qk, v = qkv.split(((heads + kv_heads) * head_dim, kv_heads * head_dim), dim=-1)
    q, k = qk.view(-1, heads + kv_heads, head_dim).split((heads, kv_heads), dim=1)
    return q.transpose(0, 1), k, v.view(-1, kv_heads, head_dim)


def attention_output_and_ffn(
    block: Block,
    x: torch.Tensor,
    attended: torch.Tensor,
    ffn_scale: torch.Tensor | None,
    following: torch.Tensor | None,
    overlap: Overlap,
) -> torch.Tensor:
    """The block's half after attention as three kernels: the output product with its bias and the residual add,
    w1 and w3 with the FFN norm, its scale and SwiGLU, and w2 with its bias and the residual add. Each starts the
    next product's weight into L2; the last, `following` (the next block's q/k/v weight)."""
    wo, ffn = block.attention.wo, block.feed_forward
    x = fused_product(
        attended.transpose(0, 1).flatten(1), wo.weight, bias=wo.bias, residual=x, prefetch=ffn.w13.weight,
        overlap=overlap,
    )  # fmt: skip
    norm = Norm(block.ffn_norm.weight, block.ffn_norm.eps, ffn_scale)
    hidden = fused_product(x, ffn.w13.weight, norm=norm, swiglu=True, prefetch=ffn.w2.weight, overlap=overlap)
    return fused_product(hidden, ffn.w2.weight, bias=ffn.w2.bias, residual=x, prefetch=following, overlap=overlap)


class FusedBlocks:
    """A stack of transformer blocks' forward as the fused kernels, for one row of the batch: the same call and
    result as the model's `blocks` (an encoder's, or a decoder's with its FFN scales)."""

    def __init__(self, blocks: nn.ModuleList, rope: RotaryEmbedding, overlap: Overlap = DEFAULT_OVERLAP) -> None:
        self.blocks = blocks
        self.rope = rope
        self.overlap = overlap
        self.following = [after.attention.wqkv.weight for after in blocks[1:]] + [None]

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, ffn_scales: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x [1, T, dim] at positions [1, T] -> [1, T, dim]; the new keys and values enter the cache."""
        if x.shape[0] != 1:
            raise ValueError(f"fused blocks: one row of the batch, got {x.shape[0]}")
        rotations, bias = self._position_inputs(positions, cache, x.dtype)
        rows, slots, span = x[0], cache.slots[0], cache.span
        for index, block in enumerate(self.blocks):
            keys, values = cache.keys[index, 0], cache.values[index, 0]
            q, _, _ = attention_inputs(block, rows, rotations, (keys, values, slots), self.overlap)
            attended = attend(q, keys[:span], values[:span], bias, self.overlap)
            scale = None if ffn_scales is None else ffn_scales[index]
            rows = attention_output_and_ffn(block, rows, attended, scale, self.following[index], self.overlap)
        return rows[None]

    def _position_inputs(
        self, positions: torch.Tensor, cache: KVCache, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations [2, T, head_dim / 2] and bias [T, span] of the row's positions, which enter the cache: one
        kernel where it runs, else the model's own operations."""
        if position_inputs_available(positions.device, self.rope.inv_freq.shape[0]):
            slots, rotations, bias = fused_position_inputs(
                positions[0], self.rope.inv_freq, cache.positions[0], cache.span, cache.window, dtype
            )
            cache.slots = slots[None]
            return rotations, bias
        rotations, bias = position_inputs(positions, self.rope, cache, dtype)
        return rotations[:, 0], bias[0]

    def warm_spans(self, cache: KVCache, rows: int) -> None:
        """Run attention on `rows` zero queries once at every span `cache` can read, at start-up: a kernel's first
        run at a new span prepares per shape, which no stream's step should wait for."""
        keys, values = cache.keys[0, 0], cache.values[0, 0]
        queries = keys.new_zeros(self.blocks[0].attention.n_heads, rows, keys.shape[-1])
        for span in cache.spans():
            attend(queries, keys[:span], values[:span], keys.new_zeros(rows, span), self.overlap)


def fused_adapt(decoder: TextDecoder, frames: torch.Tensor, overlap: Overlap = DEFAULT_OVERLAP) -> torch.Tensor:
    """The decoder's `adapt` for one position's frames [1, 4, enc_dim] as two `matvec` kernels (the first with
    its GELU) -> [1, 1, dim]."""
    first, _, second = decoder.adapter
    grouped = frames.reshape(1, decoder.params.adapter_input_dim)
    hidden = matvec(grouped, first.weight, gelu=True, prefetch=second.weight, overlap=overlap)
    return matvec(hidden, second.weight, overlap=overlap)[None]


def fused_next_token(decoder: TextDecoder, hidden: torch.Tensor, overlap: Overlap = DEFAULT_OVERLAP) -> torch.Tensor:
    """The decoder's `next_token` for hidden states [1, T, dim]: the final norm and the LM head as one `matvec`
    kernel, then the argmax -> [1]."""
    norm = Norm(decoder.norm.weight, decoder.norm.eps)
    return matvec(hidden[:, -1], decoder.tok_embeddings.weight, norm=norm, overlap=overlap).argmax(-1)
