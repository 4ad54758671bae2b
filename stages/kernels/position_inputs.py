"""A step's inputs that depend only on its positions, in one Triton kernel: the positions entered into a static
cache's ring of slots, the RoPE rotations and the attention bias.

As torch operations these are about fifteen small kernels on every step's path; here they are one launch
(which shortens both steps; figures in docs/PERFORMANCE.md), with the same values: float32
angles, their cosine and sine (CUDA's own, as torch's) rounded to the activation dtype, and a bias of 0 or -inf
from integer comparisons.
"""

from __future__ import annotations

import contextlib

import torch

from voxtral_run.stages.kernels.step_attention import step_attention_available

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
    positions: torch.Tensor, inv_freq: torch.Tensor, ring: torch.Tensor, span: int, window: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """positions [T] (int64) -> their slots in `ring` [capacity] (positions % capacity, which are written
    there), rotations [2, T, len(inv_freq)] and the additive bias [T, span] of keys at `ring[:span]` (0 where
    0 <= position - key position < window, else -inf), both in `dtype`."""
    rows = positions.shape[0]
    half = inv_freq.shape[0]
    slots = torch.empty_like(positions)
    rotations = torch.empty(2, rows, half, dtype=dtype, device=positions.device)
    bias = torch.empty(rows, span, dtype=dtype, device=positions.device)
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(positions.device) if positions.is_cuda else contextlib.nullcontext():
        _position_inputs[(1,)](
            positions.contiguous(), inv_freq.contiguous(), ring, slots, rotations, bias, rows, span, ring.shape[0],
            window, HALF=half, BLOCK=BLOCK_KEYS, num_warps=4,
        )  # fmt: skip
    return slots, rotations, bias


if triton is not None:
    # Neither the number of positions nor the span is compiled in: one variant serves every step and block of a
    # stream, so the warm-up compiles it and no step of a stream waits for a compile (the span grows as a stream
    # goes on).
    @triton.jit(do_not_specialize=["n_rows", "span"])
    def _position_inputs(
        positions_ptr, inv_freq_ptr, ring_ptr, slots_ptr, rot_ptr, bias_ptr, n_rows, span, capacity, window,
        HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        for row in range(n_rows):
            position = tl.load(positions_ptr + row)
            slot = position % capacity
            tl.store(slots_ptr + row, slot)
            tl.store(ring_ptr + slot, position)
        # The bias below reads the ring, this step's slots included: the whole program's stores come first.
        tl.debug_barrier()
        freqs = tl.arange(0, HALF)
        inv_freq = tl.load(inv_freq_ptr + freqs).to(tl.float32)
        dtype = rot_ptr.dtype.element_ty
        for row in range(n_rows):
            position = tl.load(positions_ptr + row)
            angles = position.to(tl.float32) * inv_freq
            tl.store(rot_ptr + row * HALF + freqs, tl.cos(angles).to(dtype))
            tl.store(rot_ptr + (n_rows + row) * HALF + freqs, tl.sin(angles).to(dtype))
            for start in range(0, span, BLOCK):
                keys = start + tl.arange(0, BLOCK)
                inside = keys < span
                distance = position - tl.load(ring_ptr + keys, mask=inside, other=0)
                visible = (distance >= 0) & (distance < window)
                values = tl.where(visible, 0.0, float("-inf")).to(bias_ptr.dtype.element_ty)
                tl.store(bias_ptr + row * span + keys, values, mask=inside)
