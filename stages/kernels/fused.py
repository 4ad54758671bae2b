"""A model's step as fused kernels, reading the model's own weights: what its eager forward computes, for one
row of the batch, in five kernels a layer (norm + q/k/v + RoPE + cache writes; attention; output product +
residual; norm + w1/w3 + SwiGLU; w2 + residual), each launched to overlap its neighbours (see `overlap`)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.kernels.fp8_cache import store_fp8
from voxtral_run.stages.kernels.matvec import Heads, Norm, matvec, matvec_available
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP, Overlap
from voxtral_run.stages.kernels.position_inputs import fused_position_inputs, position_inputs_available
from voxtral_run.stages.kernels.rows_elementwise import norm_rows, rope_rows, swiglu_rows
from voxtral_run.stages.kernels.rows_matmul import rows_matmul, rows_matmul_available
from voxtral_run.stages.kernels.step_attention import MAX_ROWS, step_attention, step_attention_available
from voxtral_run.stages.model.cache import PAGE_SLOTS, KVCache
from voxtral_run.stages.model.decoder import TextDecoder
from voxtral_run.stages.model.fp8 import Fp8Linear, dequantize
from voxtral_run.stages.model.layers import Block, RotaryEmbedding, position_inputs

# Queries [heads, T, head_dim], keys and values [T, kv_heads, head_dim]: one row's attention operands.
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fused_kernels_available(device: torch.device) -> bool:
    """Whether the fused kernels run on `device`: a CUDA GPU with Triton, or Triton's CPU interpreter."""
    return matvec_available(device) and rows_matmul_available(device)


def channel_scales(linear: nn.Module) -> torch.Tensor | None:
    """The per-output-channel scales of an 8-bit linear layer's weight; None for a 16- or 32-bit one."""
    return linear.weight_scale if isinstance(linear, Fp8Linear) else None


def fused_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    weight_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    heads: Heads | None = None,
    prefetch: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """A step's product with its fused work: `matvec` for one row without a bias (the decoder's, whose weight may
    be 8-bit with its `weight_scale`), the tensor-core `rows_matmul` otherwise (the encoder's 4 rows)."""
    if x.shape[0] == 1 and bias is None:
        product = functools.partial(matvec, weight_scale=weight_scale)
    elif weight_scale is None:
        product = functools.partial(rows_matmul, bias=bias)
    else:
        raise ValueError("fused_product: 8-bit weights take one row without a bias")
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
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, pages: torch.Tensor,
    overlap: Overlap, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of queries [B, heads, T, head_dim] over the KV pool's slots `keys`, `values` [slots, kv_heads,
    head_dim] (e4m3 with `scales` [slots, kv_heads] in an FP8 pool) through each row's `pages` [B, span /
    PAGE_SLOTS], with bias [B, T, span] -> [B, heads, T, head_dim]: the split-key Triton kernel for a step's few
    query rows; else the pages gathered (and dequantized) for SDPA."""
    if q.shape[1] // keys.shape[1] * q.shape[2] <= MAX_ROWS and step_attention_available(q.device):
        return step_attention(q, keys, values, bias, overlap, pages=pages, scales=scales)
    batch = (pages.shape[0], bias.shape[-1], *keys.shape[1:])
    gathered = [t.unflatten(0, (-1, PAGE_SLOTS))[pages] for t in (keys, values)]
    if scales is not None:
        paged_scales = [s.unflatten(0, (-1, PAGE_SLOTS))[pages] for s in scales]
        gathered = [dequantize(t, s, q.dtype) for t, s in zip(gathered, paged_scales, strict=True)]
    gathered = [t.view(batch) for t in gathered]
    return torch.stack([sdpa_attention(q[b], gathered[0][b], gathered[1][b], bias[b]) for b in range(q.shape[0])])


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
        weight_scale=channel_scales(attention.wqkv),
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
        attended.transpose(0, 1).flatten(1), wo.weight, weight_scale=channel_scales(wo), bias=wo.bias, residual=x,
        prefetch=ffn.w13.weight, overlap=overlap,
    )  # fmt: skip
    norm = Norm(block.ffn_norm.weight, block.ffn_norm.eps, ffn_scale)
    hidden = fused_product(
        x, ffn.w13.weight, weight_scale=channel_scales(ffn.w13), norm=norm, swiglu=True, prefetch=ffn.w2.weight,
        overlap=overlap,
    )  # fmt: skip
    return fused_product(
        hidden, ffn.w2.weight, weight_scale=channel_scales(ffn.w2), bias=ffn.w2.bias, residual=x, prefetch=following,
        overlap=overlap,
    )  # fmt: skip


class FusedBlocks:
    """A stack of transformer blocks' forward with the step's kernels: the same call and result as the model's
    `blocks` (an encoder's, or a decoder's with its FFN scales). One row of the batch runs as the fused
    kernels; more rows run their products through cuBLAS (each weight read once for all rows), with the work
    between them as one kernel each. Attention reads each row's own pages of the KV pool either way."""

    def __init__(self, blocks: nn.ModuleList, rope: RotaryEmbedding, overlap: Overlap = DEFAULT_OVERLAP) -> None:
        self.blocks = blocks
        self.rope = rope
        self.overlap = overlap
        self.following = [after.attention.wqkv.weight for after in blocks[1:]] + [None]

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, ffn_scales: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x [B, T, dim] at positions [B, T] -> [B, T, dim]; the new keys and values enter the cache."""
        if position_inputs_available(positions.device, self.rope.inv_freq.shape[0]):
            rotations, bias = fused_position_inputs(positions, self.rope.inv_freq, cache, x.dtype)
        else:
            rotations, bias = position_inputs(positions, self.rope, cache, x.dtype)
        scales = [None] * len(self.blocks) if ffn_scales is None else ffn_scales
        if x.shape[0] == 1:
            return self._one_row(x, rotations, bias, cache, scales)
        for index, (block, scale) in enumerate(zip(self.blocks, scales, strict=True)):
            x = self._block(block, index, x, rotations, bias, cache, scale)
        return x

    def _one_row(
        self, x: torch.Tensor, rotations: torch.Tensor, bias: torch.Tensor, cache: KVCache, scales: list
    ) -> torch.Tensor:
        """One row as the fused kernels: five a layer."""
        rows, slots = x[0], cache.slots[0]
        for index, (block, scale) in enumerate(zip(self.blocks, scales, strict=True)):
            keys, values = cache.layer_slots(index)
            kv_scales = cache.layer_scales(index)
            # A 16-bit cache is written by the q/k/v kernel itself; an 8-bit one by a kernel of its own.
            slot_buffers = (keys, values, slots) if kv_scales is None else None
            q, k, v = attention_inputs(block, rows, rotations[:, 0], slot_buffers, self.overlap)
            if kv_scales is not None:
                store_fp8(k, v, (keys, values), kv_scales, slots)
            attended = attend(q[None], keys, values, bias, cache.pages, self.overlap, kv_scales)[0]
            scale = None if scale is None else scale.reshape(-1)
            rows = attention_output_and_ffn(block, rows, attended, scale, self.following[index], self.overlap)
        return rows[None]

    def _block(
        self, block: Block, index: int, x: torch.Tensor, rotations: torch.Tensor, bias: torch.Tensor,
        cache: KVCache, scale: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """A block over many rows: the model's products (cuBLAS) with the norms, RoPE and cache writes and SwiGLU
        between them as one kernel each, around the paged attention kernel."""
        attention, ffn = block.attention, block.feed_forward
        batch, length = x.shape[:2]
        heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
        keys, values = cache.layer_slots(index)
        kv_scales = cache.layer_scales(index)
        slots = cache.slots.flatten()
        qkv = attention.wqkv(norm_rows(x, Norm(block.attention_norm.weight, block.attention_norm.eps))).flatten(0, 1)
        # A 16-bit cache is written by the RoPE kernel itself; an 8-bit one by a kernel of its own.
        slot_buffers = (keys, values, slots) if kv_scales is None else None
        qk = rope_rows(qkv, Heads(rotations.flatten(1, 2), q_dim, kv_dim, head_dim, slot_buffers))
        if kv_scales is not None:
            k = qk[:, q_dim:].unflatten(1, (kv_heads, head_dim))
            v = qkv[:, q_dim + kv_dim :].unflatten(1, (kv_heads, head_dim))
            store_fp8(k, v, (keys, values), kv_scales, slots)
        q = qk[:, :q_dim].unflatten(0, (batch, length)).unflatten(2, (heads, head_dim))
        attended = attend(q.transpose(1, 2), keys, values, bias, cache.pages, self.overlap, kv_scales)
        x = x + attention.wo(attended.transpose(1, 2).flatten(2))
        hidden = swiglu_rows(ffn.w13(norm_rows(x, Norm(block.ffn_norm.weight, block.ffn_norm.eps, scale))))
        return x + ffn.w2(hidden)


def fused_adapt(decoder: TextDecoder, frames: torch.Tensor, overlap: Overlap = DEFAULT_OVERLAP) -> torch.Tensor:
    """The decoder's `adapt` for one position's frames [1, 4, enc_dim] as two `matvec` kernels (the first with
    its GELU) -> [1, 1, dim]."""
    first, _, second = decoder.adapter
    grouped = frames.reshape(1, decoder.params.adapter_input_dim)
    hidden = matvec(grouped, first.weight, gelu=True, prefetch=second.weight, overlap=overlap)
    return matvec(hidden, second.weight, overlap=overlap)[None]


def fused_next_token(decoder: TextDecoder, hidden: torch.Tensor, overlap: Overlap = DEFAULT_OVERLAP) -> torch.Tensor:
    """The decoder's `next_token` for hidden states [1, T, dim]: the final norm and the LM head (the embeddings, or
    their 8-bit copy) as one `matvec` kernel, then the argmax -> [1]."""
    norm = Norm(decoder.norm.weight, decoder.norm.eps)
    head = decoder.lm_head or decoder.tok_embeddings
    return matvec(hidden[:, -1], head.weight, norm=norm, overlap=overlap, weight_scale=channel_scales(head)).argmax(-1)
