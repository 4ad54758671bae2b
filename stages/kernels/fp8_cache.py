"""A step's new keys and values into an 8-bit KV pool as one Triton kernel: each KV head's vector quantized as
`fp8.quantize` does and stored with its scale in its slot (on an H100 not bit for bit everywhere: `bench_fp8`
reports whether the bits agree).

The product kernels write a 16-bit cache from their epilogue, but a program of `matvec` holds one to four of a
head's output columns, and a vector's scale needs all of them; so in FP8 the q/k/v product leaves the cache
alone and this one launch a layer writes it. Off a GPU the same values come from `fp8.store_quantized`: Triton's CPU
interpreter rounds to e4m3 wrongly where the rounding carries into the exponent (125.8 becomes 64, not 128).
"""

from __future__ import annotations

import contextlib

import torch

from voxtral_run.stages.model.fp8 import E4M3_MAX, store_quantized

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then the model's own cache writes serve
    triton = None


def store_fp8(
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_buffers: tuple[torch.Tensor, torch.Tensor],
    scale_buffers: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
) -> None:
    """New keys and values [R, kv_heads, head_dim] (any row and head strides) into the pool slots `slots` [R] of
    a layer's e4m3 `slot_buffers` [slots, kv_heads, head_dim] and float32 `scale_buffers` [slots, kv_heads]."""
    rows, kv_heads, head_dim = keys.shape
    stored_keys, stored_values = slot_buffers
    key_scales, value_scales = scale_buffers
    if not keys.is_cuda:
        for new, stored, scales in zip((keys, values), slot_buffers, scale_buffers, strict=True):
            store_quantized(new, stored, scales, slots)
        return
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(keys.device) if keys.is_cuda else contextlib.nullcontext():
        _store_fp8[(rows, kv_heads)](
            keys, values, stored_keys, stored_values, key_scales, value_scales, slots.contiguous(),
            *keys.stride()[:2], *values.stride()[:2], E4M3_MAX=E4M3_MAX, HEAD_DIM=head_dim,
        )  # fmt: skip


if triton is not None:

    @triton.jit
    def _quantize_into(x_ptr, values_ptr, scales_ptr, at, E4M3_MAX: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The vector at x_ptr as e4m3 values at vector `at` of values_ptr and its scale at scales_ptr + at:
        correctly rounded divisions, as torch divides."""
        dims = tl.arange(0, HEAD_DIM)
        x = tl.load(x_ptr + dims).to(tl.float32)
        scale = tl.math.div_rn(tl.max(tl.abs(x), 0), E4M3_MAX)
        quantized = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0))
        tl.store(values_ptr + at * HEAD_DIM + dims, quantized.to(values_ptr.dtype.element_ty))
        tl.store(scales_ptr + at, scale)

    @triton.jit
    def _store_fp8(
        k_ptr, v_ptr, keys_ptr, values_ptr, key_scales_ptr, value_scales_ptr, slots_ptr,
        k_row_stride, k_head_stride, v_row_stride, v_head_stride,
        E4M3_MAX: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """One row's KV head: its key and its value."""
        row, head = tl.program_id(0), tl.program_id(1)
        at = tl.load(slots_ptr + row) * tl.num_programs(1) + head
        k_at = k_ptr + row * k_row_stride + head * k_head_stride
        _quantize_into(k_at, keys_ptr, key_scales_ptr, at, E4M3_MAX, HEAD_DIM)
        v_at = v_ptr + row * v_row_stride + head * v_head_stride
        _quantize_into(v_at, values_ptr, value_scales_ptr, at, E4M3_MAX, HEAD_DIM)
