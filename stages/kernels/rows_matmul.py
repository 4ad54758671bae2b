"""The encoder step's few-row matrix products as one Triton kernel on tensor cores, with the work around them
fused in: the RMSNorm before, and the bias, SwiGLU or the residual add after.

An 80 ms encoder step multiplies 4 rows by every weight, so a product is still a weight read, of 3 to 26 MB.
cuBLAS reads these well below the copy bandwidth, and the norms, activation and residual adds are kernels
of their own. Here the rows are padded to a 16-row tensor-core tile, every program owns a block of output
columns, and the reduction is split over several programs per block, the last of which adds the partial sums
in a fixed order and finishes the columns.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from voxtral_run.stages.kernels.matvec import Heads, Norm, heads_arguments
from voxtral_run.stages.kernels.overlap import (
    DEFAULT_OVERLAP,
    Overlap,
    launch_options,
    prefetch_share,
    uses_pdl,
)
from voxtral_run.stages.kernels.step_attention import (
    MAX_TICKETS,
    dot_operand_types,
    split_tickets,
    step_attention_available,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then the products stay with torch
    triton = None

if triton is not None:  # Triton's jit helpers exist only where Triton does
    from voxtral_run.stages.kernels.matvec import heads_epilogue
    from voxtral_run.stages.kernels.overlap import prefetch_to_l2, wait_for_inputs

TILE_ROWS = 16  # rows of a tensor-core product; fewer rows are padded with zeros
BLOCK_N = 64  # output columns per program
MAX_BLOCK_K = 512  # weight columns of a program's one tile
SWIGLU_BLOCK_K = 256  # weight columns per tile of SwiGLU's loop


class RowsConfig(NamedTuple):
    """A launch of the kernel: output columns per program, weight columns per tile, programs per column block
    (each reduces its share of the tiles), pipelined tile loads, warps."""

    block_n: int
    block_k: int
    split_k: int
    num_stages: int
    num_warps: int


def rows_matmul_available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device` (the attention kernels' condition)."""
    return step_attention_available(device)


def rows_config(n: int, k: int, device: torch.device, swiglu: bool) -> RowsConfig:
    """The launch for an [n, k] product, the fastest of `tools.bench_products --sweep` (figures in
    docs/PERFORMANCE.md): 64 columns per program, and the reduction split until each program's share of the
    weight is one tile of at most MAX_BLOCK_K columns (the widest power of two dividing k), all of it loaded
    before the program waits for its predecessor; SwiGLU, whose two columns finish together, unsplit over
    pipelined 256-wide tiles. Triton's CPU interpreter runs programs one by one in Python, so there they are as
    few as the shape allows."""
    block_k = min(k & -k, MAX_BLOCK_K)
    if device.type != "cuda":
        return RowsConfig(min(n & -n, BLOCK_N), block_k, 1, 1, 4)
    if swiglu:
        return RowsConfig(BLOCK_N, SWIGLU_BLOCK_K, 1, 3, 4)
    return RowsConfig(BLOCK_N, block_k, k // block_k, 2, 4)


def rows_matmul(
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
    config: RowsConfig | None = None,
) -> torch.Tensor:
    """x [R, K] (R <= 16) times weight [N, K]^T, rounded where eager rounds: `residual + F.linear(h, weight,
    bias)` with h = x or `norm`'s `rms_norm(x) * scale`; with `swiglu`, the weight is [w1; w3] (no bias) and the
    result `silu(gate) * up` [R, N / 2]; with `heads`, RoPE and the cache writes of a q/k/v product. `prefetch`
    is the next product's weight, started into L2 under `overlap` (see `kernel_overlap`). `config` overrides
    `rows_config` (benchmarks).

    Split launches share one set of ticket counters per device, so calls on one device must not overlap
    (one CUDA stream per process, as the stages run)."""
    rows, k = x.shape
    if not 0 < rows <= TILE_ROWS or not weight.is_contiguous():
        raise ValueError(
            f"rows_matmul: takes 1 to {TILE_ROWS} rows and a contiguous weight, got an input of shape {list(x.shape)}"
        )
    if swiglu and bias is not None:
        raise ValueError("rows_matmul: SwiGLU takes no bias")
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    config = config or rows_config(n, k, x.device, swiglu)
    split = config.split_k > 1
    if (
        n % config.block_n
        or k % (config.block_k * config.split_k)
        or (swiglu and split)
        or (split and n // config.block_n > MAX_TICKETS)
    ):
        raise ValueError(f"rows_matmul: launch {config} does not fit a [{n}, {k}] product")
    column_blocks = n // config.block_n
    x = x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    absent = out  # stands in for the optional tensors a launch does not use; the kernel never reads it
    partial = absent
    if split:
        partial = torch.empty(config.split_k, rows, n, dtype=torch.float32, device=x.device)
    share = prefetch_share(prefetch, overlap, column_blocks * config.split_k)
    pdl = uses_pdl(overlap, x.device)
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rows_matmul[(column_blocks, config.split_k)](
            x, weight,
            absent if bias is None else bias,
            absent if norm is None else norm.weight,
            absent if norm is None or norm.scale is None else norm.scale.reshape(-1),
            absent if residual is None else residual.contiguous(),
            out, partial, split_tickets(x.device) if split else absent,
            absent if share is None else share.tensor, 0 if share is None else share.total,
            0 if share is None else share.chunk,
            norm.eps if norm is not None else 0.0,
            ROWS=rows, N=n, K=k, BIAS=bias is not None, NORM=norm is not None,
            SCALE=norm is not None and norm.scale is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k, STAGES=config.num_stages,
            PREFETCH=share is not None, EARLY=overlap.early_weights, PDL=pdl,
            **heads_arguments(heads, rows, absent),
            **dot_operand_types(x), TILE=TILE_ROWS, num_warps=config.num_warps, **launch_options(pdl),
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _finish(
        acc, acc_up, rows, cols, bias_ptr, residual_ptr, out_ptr, rot_ptr, keys_ptr, values_ptr, slots_ptr,
        ROWS: tl.constexpr, N: tl.constexpr, BIAS: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
        ROPE: tl.constexpr, CACHE: tl.constexpr, Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
        TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """The columns' float32 sums to the output, rounded as eager rounds: the bias added before the product's
        one rounding, then SwiGLU's, the residual add's or RoPE's own roundings."""
        dtype = out_ptr.dtype.element_ty
        if BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        y = acc.to(dtype)
        if SWIGLU:
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            y = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        live = (rows < ROWS)[:, None]
        at = rows[:, None] * N + cols[None, :]
        if RESIDUAL:
            y = (tl.load(residual_ptr + at, mask=live, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dtype)
        if ROPE:
            y = heads_epilogue(
                y, rows, cols, live, rot_ptr, keys_ptr, values_ptr, slots_ptr,
                ROWS, Q_DIM, KV_DIM, HEAD_DIM, CACHE, TILE, BLOCK_N,
            )  # fmt: skip
        tl.store(out_ptr + at, y, mask=live)

    @triton.jit
    def _weight_tiles(w_ptr, cols, k0, ks, N: tl.constexpr, K: tl.constexpr, SWIGLU: tl.constexpr):
        """The weight tile at k0 for `cols`, transposed to [BLOCK_K, BLOCK_N], and with SWIGLU the up half's
        (else the same tile again); read once, so loaded to be evicted first."""
        offsets = cols[None, :] * K + k0 + ks[:, None]
        w = tl.load(w_ptr + offsets, eviction_policy="evict_first")
        w_up = w
        if SWIGLU:
            w_up = tl.load(w_ptr + N * K + offsets, eviction_policy="evict_first")
        return w, w_up

    @triton.jit
    def _accumulate(
        x_ptr, norm_ptr, scale_ptr, rows, live, ks, k0, inv_rms, w, w_up, acc, acc_up,
        K: tl.constexpr, NORM: tl.constexpr, SCALE: tl.constexpr, SWIGLU: tl.constexpr, DOT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """acc (and acc_up) plus the rows' tile at k0, normed if NORM, times the weight tiles."""
        h = tl.load(x_ptr + rows[:, None] * K + k0 + ks[None, :], mask=live, other=0.0)
        if NORM:  # rms_norm's roundings: normalised then rounded, times the weight, times the scale
            dtype = h.dtype
            h = (h.to(tl.float32) * inv_rms[:, None]).to(dtype)
            h = (h.to(tl.float32) * tl.load(norm_ptr + k0 + ks).to(tl.float32)[None, :]).to(dtype)
            if SCALE:
                h = (h.to(tl.float32) * tl.load(scale_ptr + k0 + ks).to(tl.float32)[None, :]).to(dtype)
        h = h.to(DOT)
        acc = tl.dot(h, w.to(DOT), acc, input_precision=PRECISION)
        if SWIGLU:
            acc_up = tl.dot(h, w_up.to(DOT), acc_up, input_precision=PRECISION)
        return acc, acc_up

    @triton.jit
    def _rows_matmul(
        x_ptr, w_ptr, bias_ptr, norm_ptr, scale_ptr, residual_ptr, out_ptr, partial_ptr, ticket_ptr,
        prefetch_ptr, prefetch_total, prefetch_chunk, eps, rot_ptr, keys_ptr, values_ptr, slots_ptr,
        ROWS: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BIAS: tl.constexpr, NORM: tl.constexpr,
        SCALE: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, PREFETCH: tl.constexpr,
        EARLY: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr, CACHE: tl.constexpr, Q_DIM: tl.constexpr,
        KV_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        column_block, split = tl.program_id(0), tl.program_id(1)
        program = split * tl.num_programs(0) + column_block
        prefetch_to_l2(prefetch_ptr, prefetch_total, prefetch_chunk, program, PREFETCH)
        rows = tl.arange(0, TILE)
        live = (rows < ROWS)[:, None]
        cols = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        per_split: tl.constexpr = K // SPLIT_K
        first = split * per_split
        # The weight is constant, so its first tile is on its way while the predecessor finishes.
        if not EARLY:
            wait_for_inputs(PDL)
        w_first, w_first_up = _weight_tiles(w_ptr, cols, first, ks, N, K, SWIGLU)
        if EARLY:
            wait_for_inputs(PDL)
        inv_rms = tl.zeros([TILE], tl.float32)
        if NORM:
            # Every program reads the rows once more (from L2: a few KiB) rather than a kernel computing the norm.
            squares = tl.zeros([TILE, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + rows[:, None] * K + k0 + ks[None, :], mask=live, other=0.0).to(tl.float32)
                squares += xk * xk
            inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 1) / K + eps)
        acc = tl.zeros([TILE, BLOCK_N], tl.float32)
        acc_up = tl.zeros([TILE, BLOCK_N], tl.float32)
        acc, acc_up = _accumulate(
            x_ptr, norm_ptr, scale_ptr, rows, live, ks, first, inv_rms, w_first, w_first_up, acc, acc_up,
            K, NORM, SCALE, SWIGLU, DOT, PRECISION,
        )  # fmt: skip
        for k0 in tl.range(first + BLOCK_K, first + per_split, BLOCK_K, num_stages=STAGES):
            w, w_up = _weight_tiles(w_ptr, cols, k0, ks, N, K, SWIGLU)
            acc, acc_up = _accumulate(
                x_ptr, norm_ptr, scale_ptr, rows, live, ks, k0, inv_rms, w, w_up, acc, acc_up,
                K, NORM, SCALE, SWIGLU, DOT, PRECISION,
            )  # fmt: skip
        if SPLIT_K == 1:
            _finish(
                acc, acc_up, rows, cols, bias_ptr, residual_ptr, out_ptr, rot_ptr, keys_ptr, values_ptr, slots_ptr,
                ROWS, N, BIAS, SWIGLU, RESIDUAL, ROPE, CACHE, Q_DIM, KV_DIM, HEAD_DIM, TILE, BLOCK_N,
            )  # fmt: skip
        else:
            # Leave this split's sums; the block's last program to arrive adds all of them, in split order, so
            # the result does not depend on which arrives last.
            at = rows[:, None] * N + cols[None, :]
            tl.store(partial_ptr + split * ROWS * N + at, acc, mask=live)
            tl.debug_barrier()
            arrived = tl.atomic_add(ticket_ptr + column_block, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([TILE, BLOCK_N], tl.float32)
                for other in tl.static_range(SPLIT_K):
                    # .cg: read from L2, where the other programs' stores are, never a stale L1 line.
                    total += tl.load(partial_ptr + other * ROWS * N + at, mask=live, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(ticket_ptr + column_block, 0, sem="relaxed", scope="gpu")
                _finish(
                    total, acc_up, rows, cols, bias_ptr, residual_ptr, out_ptr, rot_ptr, keys_ptr, values_ptr,
                    slots_ptr, ROWS, N, BIAS, SWIGLU, RESIDUAL, ROPE, CACHE, Q_DIM, KV_DIM, HEAD_DIM, TILE, BLOCK_N,
                )  # fmt: skip
