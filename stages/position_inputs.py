"""A step's inputs that depend only on its positions, in one Triton kernel: the positions entered into a static
cache's ring of slots, the RoPE rotations and the attention bias.

As torch operations these are about fifteen kernels of a few microseconds each on every step's path (the
encoder's 80 ms step spent some 50 us in them on an H200); here they are one launch, with the same values:
float32 angles, their cosine and sine (CUDA's own, as torch's) rounded to the activation dtype, and a bias
of 0 or -inf from integer comparisons.
"""

from __future__ import annotations

import contextlib

import torch

from stages.step_attention import step_attention_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then torch computes these
    triton = None

BIAS_ELEMENTS = 4096  # rows x keys of the bias a program holds at once


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
    padded_rows = triton.next_power_of_2(rows)
    block = min(triton.next_power_of_2(span), max(16, BIAS_ELEMENTS // padded_rows))
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(positions.device) if positions.is_cuda else contextlib.nullcontext():
        _position_inputs[(1,)](
            positions.contiguous(), inv_freq.contiguous(), ring, slots, rotations, bias, span, ring.shape[0], window,
            ROWS=rows, PADDED_ROWS=padded_rows, HALF=half, BLOCK=block, num_warps=4,
        )  # fmt: skip
    return slots, rotations, bias


if triton is not None:

    @triton.jit(do_not_specialize=["span"])
    def _position_inputs(
        positions_ptr, inv_freq_ptr, ring_ptr, slots_ptr, rot_ptr, bias_ptr, span, capacity, window,
        ROWS: tl.constexpr, PADDED_ROWS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        rows = tl.arange(0, PADDED_ROWS)
        live = rows < ROWS
        positions = tl.load(positions_ptr + rows, mask=live, other=0)
        slots = positions % capacity
        tl.store(slots_ptr + rows, slots, mask=live)
        tl.store(ring_ptr + slots, positions, mask=live)
        freqs = tl.arange(0, HALF)
        angles = positions.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + freqs).to(tl.float32)[None, :]
        at = rows[:, None] * HALF + freqs[None, :]
        dtype = rot_ptr.dtype.element_ty
        tl.store(rot_ptr + at, tl.cos(angles).to(dtype), mask=live[:, None])
        tl.store(rot_ptr + ROWS * HALF + at, tl.sin(angles).to(dtype), mask=live[:, None])
        for start in range(0, span, BLOCK):
            keys = start + tl.arange(0, BLOCK)
            inside = keys < span
            # The ring's slots for this step's own positions were written above by other threads of this
            # program, so those keys take their positions from the registers rather than from memory.
            key_positions = tl.load(ring_ptr + keys, mask=inside, other=0)
            own = (keys[None, :] == slots[:, None]) & live[:, None]
            own_positions = tl.max(tl.where(own, positions[:, None], -1), 0)
            key_positions = tl.where(own_positions >= 0, own_positions, key_positions)
            distance = positions[:, None] - key_positions[None, :]
            visible = (distance >= 0) & (distance < window)
            values = tl.where(visible, 0.0, float("-inf")).to(bias_ptr.dtype.element_ty)
            tl.store(bias_ptr + rows[:, None] * span + keys[None, :], values, mask=live[:, None] & inside[None, :])
