"""Attention of a step's few queries over a KV cache as one Triton kernel, split over the keys.

A streaming step has 4 query rows per KV head (the encoder's 4 frames, or the decoder's 4 query heads of a
group at one position), too few for a library attention kernel to fill the GPU: cuDNN's takes many times as
long as reading the cached keys (figures in docs/PERFORMANCE.md). Here every (KV head, slice of keys) pair is
a program that leaves a partial softmax, and the last of a head's programs to finish merges its slices.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from voxtral_run.stages.kernels.overlap import (
    DEFAULT_OVERLAP,
    PREFETCH_ALIGNMENT,
    Overlap,
    launch_options,
    overlap_supported,
    uses_pdl,
)
from voxtral_run.stages.model.cache import EMPTY_PAGE

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # CPU-only torch builds come without Triton; then only SDPA serves attention
    triton = None

if triton is not None:  # Triton's jit helpers exist only where Triton does
    from voxtral_run.stages.kernels.overlap import prefetch_share_to_l2, wait_for_inputs

BLOCK_KEYS = 64  # keys per inner tile
# Over e4m3 caches a tile is taken in halves: a whole one's keys and values, converted, spill registers.
FP8_SUB_KEYS = BLOCK_KEYS // 2
TARGET_PROGRAMS = 512  # about four programs per multiprocessor of the GPUs targeted (132): a small batch's slices
# are short, read with more requests in flight (256 took 10 to 30% longer below 32 rows; docs/PERFORMANCE.md)
# Longer slices leave a large batch a few long programs each, in uneven waves: 5 slices of a full decoder window
# (8192 keys) were the fastest measured for 110 rows (docs/PERFORMANCE.md).
MAX_SLICE_TILES = 26
NUM_WARPS = 2  # with the merge below, the better of 2 and 4 in both models' steps (`tools.bench_gpu`)
MAX_ROWS = 16  # query rows per KV head this path takes; tl.dot needs at least 16 rows, so fewer are padded
MERGE_SLICES = 16  # slices of a head merged per load: all of a step's but those of a long decoder cache
LOG2_E = math.log2(math.e)


def step_attention_available(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: a CUDA device, or Triton's CPU interpreter."""
    return triton is not None and (device.type == "cuda" or _INTERPRETED)


def key_splits(keys: int, heads: int) -> tuple[int, int]:
    """(slices, keys per slice) for `keys` keys of `heads` KV heads (of all rows): enough programs to fill the
    GPU, slices whole tiles long and at most MAX_SLICE_TILES."""
    tiles = -(-keys // BLOCK_KEYS)
    wanted = max(1, min(tiles, -(-TARGET_PROGRAMS // heads)), -(-tiles // MAX_SLICE_TILES))
    per_split = -(-tiles // wanted) * BLOCK_KEYS
    return -(-keys // per_split), per_split


MAX_TICKETS = 32768  # counters a split launch may use (per column block, or per batch row's KV head)


@functools.cache
def split_tickets(device: torch.device) -> torch.Tensor:
    """Counters of how many of a group's programs (a column block's splits of a product, or a KV head's slices
    of the keys) have left their partial results: zero between launches (a group's last program resets its
    counter), so one zeroed set on each device serves every launch and graph replay of the split kernels, which
    run one after another on the device's one stream."""
    return torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)


def step_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    overlap: Overlap = DEFAULT_OVERLAP,
    pages: torch.Tensor | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """What `Attention.attend` computes, for queries [heads, T, head_dim] with heads // kv_heads * T <= 16:
    keys and values [S, kv_heads, head_dim], additive `bias` [T, S]. -> [heads, T, head_dim]. Under `overlap`
    the kernels launch as programmatic dependents, and the first prefetches its keys and values into L2 before
    it waits for the queries (see `kernel_overlap`).

    Batched over a KV pool's pages when `pages` [B, S / BLOCK_KEYS] is given: queries [B, heads, T, head_dim],
    keys and values the pool's slots [pages * BLOCK_KEYS, kv_heads, head_dim], bias [B, T, S] -> [B, heads, T,
    head_dim]; row b's key j is slot pages[b, j // BLOCK_KEYS] * BLOCK_KEYS + j % BLOCK_KEYS.

    With `scales`, keys and values are e4m3 and each slot's KV head has a float32 scale in the key and value
    scales [S (or slots), kv_heads] (see `fp8.quantize`): the scores are scaled by the keys' and the softmax
    weights by the values', the e4m3 tiles themselves being exact in the products' operand type."""
    batched = pages is not None
    if not batched:
        q, bias = q[None], bias[None]
    # The kernels index rows by stride and read each head's vector as one contiguous run.
    q, keys, values, bias = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, keys, values, bias))
    batch, heads, length, head_dim = q.shape
    n_keys = bias.shape[-1]
    kv_heads = keys.shape[1]
    if batch * kv_heads > MAX_TICKETS:
        raise ValueError(f"step attention: {batch} rows of {kv_heads} KV heads exceed {MAX_TICKETS} counters")
    group = heads // kv_heads
    rows = group * length
    splits, per_split = key_splits(n_keys, batch * kv_heads)
    partial = torch.empty(batch, kv_heads, splits, rows, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch, kv_heads, splits, 2, rows, dtype=torch.float32, device=q.device)
    # Written position-major, so the output projection's [T, heads * head_dim] view needs no copy.
    out = torch.empty(batch, length, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch(q, keys, values, bias, pages, scales, partial, stats, out, n_keys, splits, per_split, overlap)
    return out if batched else out[0]


def _launch(
    q, keys, values, bias, pages, scales, partial, stats, out, n_keys: int, splits: int, per_split: int,
    overlap: Overlap,
) -> None:  # fmt: skip
    """The kernel, on the current device."""
    batch, heads, length, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    strides = (
        *q.stride()[:3], *keys.stride()[:2], *values.stride()[:2], *bias.stride()[:2], *out.stride()[:3],
        0 if pages is None else pages.stride(0),
    )  # fmt: skip
    pdl = uses_pdl(overlap, q.device)
    # A slice of keys (or values) of every head is one contiguous run when the cache is contiguous, and a page's
    # when it is a pool's. A batch of many rows reads at the memory's pace anyway: only one row prefetches.
    prefetch = (pages is None or batch == 1) and overlap.prefetch_bytes > 0 and overlap_supported(q.device) and all(
        t.is_contiguous() and t.data_ptr() % PREFETCH_ALIGNMENT == 0 for t in (keys, values)
    )  # fmt: skip
    key_scales, value_scales = (keys, keys) if scales is None else (s.contiguous() for s in scales)
    _split_attention[(kv_heads, splits, batch)](
        q, keys, values, bias, keys if pages is None else pages, key_scales, value_scales, partial, stats, out,
        split_tickets(q.device),
        *strides, n_keys, per_split, 1 / math.sqrt(head_dim), **dot_operand_types(q),
        FP8_DOT=tl.float16 if q.is_cuda else tl.float32, LOG2_E=LOG2_E,
        ROWS=MAX_ROWS, BLOCK=BLOCK_KEYS, PREFETCH=prefetch, PDL=pdl, PAGED=pages is not None, LENGTH=length,
        GROUP=group, HEAD_DIM=head_dim, MERGE_SLICES=MERGE_SLICES, MERGE_ROWS=triton.next_power_of_2(group * length),
        EMPTY_PAGE=EMPTY_PAGE, FP8=scales is not None, SUB=BLOCK_KEYS if scales is None else FP8_SUB_KEYS,
        num_warps=NUM_WARPS, **launch_options(pdl),
    )  # fmt: skip


def dot_operand_types(x: torch.Tensor) -> dict:
    """Operand type and precision of tile products over `x`'s dtype: bf16 and fp16 on tensor cores (their
    products are exact in the float32 accumulator); float32 exactly otherwise (and in Triton's CPU
    interpreter, whose products know no bf16)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return {"DOT": tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16, "PRECISION": "tf32"}
    return {"DOT": tl.float32, "PRECISION": "ieee"}


if triton is not None:

    @triton.jit
    def _attend_keys(
        q, acc, best, total, first, first_slot, end, k_ptr, v_ptr, bias_ptr, k_scale_ptr, v_scale_ptr, kv_head,
        k_head_stride, k_key_stride, v_head_stride, v_key_stride, bias_stride, pos, live, dims, scale,
        DOT: tl.constexpr, PRECISION: tl.constexpr, FP8_DOT: tl.constexpr, LOG2_E: tl.constexpr, SUB: tl.constexpr,
        FP8: tl.constexpr,
    ):  # fmt: skip
        """The online softmax's running (acc, best, total) after SUB more keys (from key `first`, in consecutive
        slots from `first_slot`); keys from `end` on are masked."""
        key = first + tl.arange(0, SUB)
        inside = key < end
        slot = first_slot + tl.arange(0, SUB)
        k = tl.load(k_ptr + kv_head * k_head_stride + slot[:, None] * k_key_stride + dims[None, :],
                    mask=inside[:, None], other=0.0).to(FP8_DOT if FP8 else DOT)  # fmt: skip
        v = tl.load(v_ptr + kv_head * v_head_stride + slot[:, None] * v_key_stride + dims[None, :],
                    mask=inside[:, None], other=0.0).to(FP8_DOT if FP8 else DOT)  # fmt: skip
        bias = tl.load(bias_ptr + pos[:, None] * bias_stride + key[None, :],
                       mask=live[:, None] & inside[None, :], other=float("-inf")).to(tl.float32)  # fmt: skip
        products = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        kv_heads = tl.num_programs(0)
        if FP8:  # a key's scale multiplies its scores, a value's its softmax weights
            k_scale = tl.load(k_scale_ptr + slot * kv_heads + kv_head, mask=inside, other=0.0)
            products = products * k_scale[None, :]
        scores = (products * scale + bias) * LOG2_E
        new_best = tl.maximum(best, tl.max(scores, 1))
        weights = tl.exp2(scores - new_best[:, None])
        decay = tl.exp2(best - new_best)
        total = total * decay + tl.sum(weights, 1)
        if FP8:
            v_scale = tl.load(v_scale_ptr + slot * kv_heads + kv_head, mask=inside, other=0.0)
            top = tl.max(v_scale, 0)
            relative = v_scale / tl.where(top > 0, top, 1.0)
            tile = tl.dot((weights * relative[None, :]).to(FP8_DOT), v, input_precision=PRECISION) * top
        else:
            tile = tl.dot(weights.to(DOT), v, input_precision=PRECISION)
        return acc * decay[:, None] + tile, new_best, total

    # Runtime sizes that vary with the span are not specialised on (Triton would compile a variant for
    # values divisible by 16 and for 1), so every span runs the kernel compiled for the first.
    @triton.jit(do_not_specialize=["n_keys", "per_split"])
    def _split_attention(
        q_ptr, k_ptr, v_ptr, bias_ptr, pages_ptr, k_scale_ptr, v_scale_ptr, partial_ptr, stats_ptr, out_ptr,
        ticket_ptr,
        q_batch_stride, q_head_stride, q_pos_stride, k_key_stride, k_head_stride, v_key_stride, v_head_stride,
        bias_batch_stride, bias_stride, out_batch_stride, out_head_stride, out_pos_stride, pages_stride,
        n_keys, per_split, scale,
        DOT: tl.constexpr, PRECISION: tl.constexpr, FP8_DOT: tl.constexpr, LOG2_E: tl.constexpr, ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        PREFETCH: tl.constexpr, PDL: tl.constexpr, PAGED: tl.constexpr, LENGTH: tl.constexpr, GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr, MERGE_SLICES: tl.constexpr, MERGE_ROWS: tl.constexpr, EMPTY_PAGE: tl.constexpr,
        FP8: tl.constexpr, SUB: tl.constexpr,
    ):  # fmt: skip
        """One batch row's KV head's query rows (row = group member * LENGTH + position) over one slice of the
        keys (through the row's page table when PAGED): the unnormalised output, the running maximum and the
        sum of exponentials, in base 2. The head's last program to finish merges its slices into the output."""
        kv_head, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        batch_row = tl.program_id(2)
        q_ptr += batch_row * q_batch_stride
        bias_ptr += batch_row * bias_batch_stride
        out_ptr += batch_row * out_batch_stride
        pages_ptr += batch_row * pages_stride
        head_at = batch_row * tl.num_programs(0) + kv_head  # this row's head among all the launch's
        start = split * per_split
        end = tl.minimum(start + per_split, n_keys)
        if PREFETCH:  # the slice's keys and values of every head, a share per head's program
            if PAGED:  # page by page, those the row has reached
                run = BLOCK * k_key_stride * (k_ptr.dtype.element_ty.primitive_bitwidth // 8)
                for first in range(start, end, BLOCK):
                    page = tl.load(pages_ptr + first // BLOCK)
                    if page != EMPTY_PAGE:
                        prefetch_share_to_l2(k_ptr + page * BLOCK * k_key_stride, run, kv_head, tl.num_programs(0))
                        prefetch_share_to_l2(v_ptr + page * BLOCK * v_key_stride, run, kv_head, tl.num_programs(0))
            else:
                run = (end - start) * k_key_stride * (k_ptr.dtype.element_ty.primitive_bitwidth // 8)
                prefetch_share_to_l2(k_ptr + start * k_key_stride, run, kv_head, tl.num_programs(0))
                prefetch_share_to_l2(v_ptr + start * v_key_stride, run, kv_head, tl.num_programs(0))
        wait_for_inputs(PDL)
        rows = tl.arange(0, ROWS)
        live = rows < GROUP * LENGTH
        head, pos = kv_head * GROUP + rows // LENGTH, rows % LENGTH
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + head[:, None] * q_head_stride + pos[:, None] * q_pos_stride + dims[None, :],
                    mask=live[:, None], other=0.0)  # fmt: skip
        if FP8:
            # e4m3 tiles become fp16 in one instruction a pair (bf16 takes four), so the products run in fp16:
            # the queries with the softmax scale folded in (small, and more precise than bf16), the softmax
            # weights relative to the tile's largest value scale (within [0, 1]).
            q = (q.to(tl.float32) * scale).to(FP8_DOT)
            scale = 1.0
        else:
            q = q.to(DOT)
        # A finite floor: a slice wholly outside the window then yields weight 0 rather than NaN.
        best = tl.full([ROWS], -1e30, tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for first in range(start, end, BLOCK):
            if PAGED:  # a tile is one page: its slots follow the row's page table
                page = tl.load(pages_ptr + first // BLOCK)
                # A page the row has not reached holds no key (all masked): skipping it changes nothing.
                occupied = page != EMPTY_PAGE
                first_slot = page * BLOCK
            else:
                occupied = True
                first_slot = first
            if occupied:
                for part in range(0, BLOCK, SUB):  # a loop, not unrolled: one part's tiles in registers at a time
                    acc, best, total = _attend_keys(
                        q, acc, best, total, first + part, first_slot + part, end, k_ptr, v_ptr, bias_ptr, k_scale_ptr,
                        v_scale_ptr, kv_head, k_head_stride, k_key_stride, v_head_stride, v_key_stride, bias_stride,
                        pos, live, dims, scale, DOT, PRECISION, FP8_DOT, LOG2_E, SUB, FP8,
                    )  # fmt: skip
        group_rows: tl.constexpr = GROUP * LENGTH
        at = (head_at * splits + split) * group_rows
        tl.store(partial_ptr + (at + rows[:, None]) * HEAD_DIM + dims[None, :], acc, mask=live[:, None])
        tl.store(stats_ptr + at * 2 + rows, best, mask=live)
        tl.store(stats_ptr + at * 2 + group_rows + rows, total, mask=live)
        tl.debug_barrier()
        arrived = tl.atomic_add(ticket_ptr + head_at, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            # The slices' outputs weighted by their share of the softmax, added in a fixed order whichever
            # program arrives last. MERGE_SLICES slices' figures are loaded at once (.cg: from L2, where the other
            # programs' stores are), one round trip per chunk of slices rather than two per slice; the running
            # maximum rescales what earlier chunks added (by exactly 0 before the first).
            merge_rows = tl.arange(0, MERGE_ROWS)
            merge_live = merge_rows < group_rows
            top = tl.full([MERGE_ROWS], -1e30, tl.float32)
            merged = tl.zeros([MERGE_ROWS, HEAD_DIM], tl.float32)
            weight_sum = tl.zeros([MERGE_ROWS], tl.float32)
            for chunk in range(0, splits, MERGE_SLICES):
                slices = chunk + tl.arange(0, MERGE_SLICES)
                present = (slices < splits)[:, None] & merge_live[None, :]
                slice_at = (head_at * splits + slices)[:, None] * group_rows
                slice_best = tl.load(stats_ptr + slice_at * 2 + merge_rows[None, :], mask=present, other=-1e30,
                                     cache_modifier=".cg")  # fmt: skip
                slice_total = tl.load(stats_ptr + slice_at * 2 + group_rows + merge_rows[None, :], mask=present,
                                      other=0.0, cache_modifier=".cg")  # fmt: skip
                slice_out = tl.load(
                    partial_ptr + ((slice_at + merge_rows[None, :]) * HEAD_DIM)[:, :, None] + dims[None, None, :],
                    mask=present[:, :, None], other=0.0, cache_modifier=".cg",
                )  # fmt: skip
                new_top = tl.maximum(top, tl.max(slice_best, 0))
                rescale = tl.exp2(top - new_top)
                weight = tl.exp2(slice_best - new_top[None, :])
                merged = merged * rescale[:, None] + tl.sum(weight[:, :, None] * slice_out, 0)
                weight_sum = weight_sum * rescale + tl.sum(weight * slice_total, 0)
                top = new_top
            tl.atomic_xchg(ticket_ptr + head_at, 0, sem="relaxed", scope="gpu")
            merged = merged / tl.where(merge_live, weight_sum, 1.0)[:, None]
            merge_head, merge_pos = kv_head * GROUP + merge_rows // LENGTH, merge_rows % LENGTH
            out_at = merge_head[:, None] * out_head_stride + merge_pos[:, None] * out_pos_stride + dims[None, :]
            tl.store(out_ptr + out_at, merged.to(out_ptr.dtype.element_ty), mask=merge_live[:, None])


# Set by TRITON_INTERPRET=1 when the kernels were defined: then they also run on CPU tensors.
_INTERPRETED = triton is not None and isinstance(_split_attention, InterpretedFunction)
