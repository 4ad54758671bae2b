"""A step's inputs that depend only on its positions, in one Triton kernel for a batch of rows: the positions
entered into each row's ring, the pool slots the new keys go to, the pages attention reads, the RoPE rotations
and the attention bias.

As torch operations these are about twenty small kernels on every step's path; here they are one launch, with
the same values: float32 angles, their cosine and sine (CUDA's own, as torch's) rounded to the activation
dtype, and a bias of 0 or -inf from integer comparisons.
"""

from __future__ import annotations

import contextlib

import torch

from voxtral_run.stages.kernels.step_attention import step_attention_available
from voxtral_run.stages.model.cache import PAGE_SLOTS, KVCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then torch computes these
    triton = None

BLOCK_KEYS = 1024  # keys of a bias row per iteration


def position_inputs_available(device: torch.device, rotation_pairs: int) -> bool:
    """Whether the kernel can run on tensors of `device` (the attention kernels' condition) for heads of
    `rotation_pairs` rotation planes (a power of two: Triton's ranges are)."""
    return step_attention_available(device) and rotation_pairs & (rotation_pairs - 1) == 0


def fused_position_inputs(
    positions: torch.Tensor, inv_freq: torch.Tensor, cache: KVCache, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `layers.position_inputs` computes for positions [B, T] (int64) of the cache's rows, and what the
    cache's `begin` records (its slots and pages): rotations [2, B, T, len(inv_freq)] and the additive bias
    [B, T, span] (0 where 0 <= position - key position < window, else -inf), both in `dtype`."""
    pool = cache.pool
    batch, length = positions.shape
    half = inv_freq.shape[0]
    pages = cache.span // PAGE_SLOTS
    cache.slots = torch.empty_like(positions)
    cache.pages = torch.empty(batch, pages, dtype=torch.long, device=positions.device)
    rotations = torch.empty(2, batch, length, half, dtype=dtype, device=positions.device)
    bias = torch.empty(batch, length, cache.span, dtype=dtype, device=positions.device)
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(positions.device) if positions.is_cuda else contextlib.nullcontext():
        _position_inputs[(batch,)](
            positions.contiguous(), cache.rows, inv_freq.contiguous(), pool.positions, pool.table, cache.slots,
            cache.pages, rotations, bias, pool.positions.stride(0), pool.table.stride(0), length, cache.span,
            pool.capacity, pool.window, HALF=half, BLOCK=BLOCK_KEYS, PAGE=PAGE_SLOTS, num_warps=4,
        )  # fmt: skip
    return rotations, bias


if triton is not None:
    # Neither the number of positions nor the span is compiled in: one variant serves every step and block of a
    # stream, so the warm-up compiles it and no step of a stream waits for a compile (the span grows as a stream
    # goes on).
    @triton.jit(do_not_specialize=["n_positions", "span"])
    def _position_inputs(
        positions_ptr, rows_ptr, inv_freq_ptr, ring_ptr, table_ptr, slots_ptr, pages_ptr, rot_ptr, bias_ptr,
        ring_stride, table_stride, n_positions, span, capacity, window,
        HALF: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr,
    ):  # fmt: skip
        """One row of the batch: its positions into its ring and their pool slots, its pages, then its
        rotations and bias."""
        b, n_batch = tl.program_id(0), tl.num_programs(0)
        row = tl.load(rows_ptr + b)
        ring = ring_ptr + row * ring_stride
        table = table_ptr + row * table_stride
        for t in range(n_positions):
            position = tl.load(positions_ptr + b * n_positions + t)
            slot = position % capacity
            tl.store(ring + slot, position)
            tl.store(slots_ptr + b * n_positions + t, tl.load(table + slot // PAGE) * PAGE + slot % PAGE)
        n_pages = span // PAGE
        for start in range(0, n_pages, BLOCK):
            pages = start + tl.arange(0, BLOCK)
            inside = pages < n_pages
            tl.store(pages_ptr + b * n_pages + pages, tl.load(table + pages, mask=inside), mask=inside)
        # The bias below reads the ring, this step's slots included: the whole program's stores come first.
        tl.debug_barrier()
        freqs = tl.arange(0, HALF)
        inv_freq = tl.load(inv_freq_ptr + freqs).to(tl.float32)
        dtype = rot_ptr.dtype.element_ty
        for t in range(n_positions):
            at = b * n_positions + t
            position = tl.load(positions_ptr + at)
            angles = position.to(tl.float32) * inv_freq
            tl.store(rot_ptr + at * HALF + freqs, tl.cos(angles).to(dtype))
            tl.store(rot_ptr + (n_batch * n_positions + at) * HALF + freqs, tl.sin(angles).to(dtype))
            for start in range(0, span, BLOCK):
                keys = start + tl.arange(0, BLOCK)
                inside = keys < span
                distance = position - tl.load(ring + keys, mask=inside, other=0)
                visible = (distance >= 0) & (distance < window)
                values = tl.where(visible, 0.0, float("-inf")).to(bias_ptr.dtype.element_ty)
                tl.store(bias_ptr + at * span + keys, values, mask=inside)
