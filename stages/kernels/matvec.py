"""The decoder step's one-row matrix products as one Triton kernel that reads the weight once, with the work
around them fused in: the RMSNorm (times the FFN scale) before, and SwiGLU, GELU or the residual add after.

A one-position step multiplies one row by every weight, so a product is a weight read. cuBLAS reads the
decoder's wo well below the copy bandwidth (its tiles leave most multiprocessors idle) and adds split-K
reductions, and the norms, activation and residual adds are kernels of their own between the products. Here
every program owns a few whole output columns, so no reduction crosses programs and the fusions are local.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from voxtral_run.stages.kernels.overlap import (
    DEFAULT_OVERLAP,
    Overlap,
    launch_options,
    prefetch_share,
    uses_pdl,
)
from voxtral_run.stages.kernels.step_attention import step_attention_available
from voxtral_run.stages.model.fp8 import FP8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then the products stay with torch
    triton = None

if triton is not None:  # Triton's jit helpers exist only where Triton does
    from voxtral_run.stages.kernels.overlap import prefetch_to_l2, wait_for_inputs

BLOCK_K = 512  # weight columns per tile: 1 KiB of each bf16 row per load
NORMED_BLOCK_K = 1024
FP8_BLOCK_K, FP8_NORMED_BLOCK_K = 4096, 512


class Norm(NamedTuple):
    """RMSNorm applied to the input row before the product: its weight, epsilon and an optional scale."""

    weight: torch.Tensor
    eps: float
    scale: torch.Tensor | None = None


class Heads(NamedTuple):
    """How a q/k/v product's columns leave its kernel: RoPE on the query and key columns at the step's
    `rotations` [2, rows, head_dim / 2] (cos, sin), and, given a KV cache ring's slot buffers, the keys and
    values also written into their slots."""

    rotations: torch.Tensor
    q_dim: int
    kv_dim: int
    head_dim: int
    slot_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def heads_arguments(heads: Heads | None, rows: int, absent: torch.Tensor) -> dict:
    """A product kernel's arguments for `heads` (see `Heads`); `absent` stands in for unused tensors."""
    if heads is None:
        return {"rot_ptr": absent, "keys_ptr": absent, "values_ptr": absent, "slots_ptr": absent,
                "ROPE": False, "CACHE": False, "Q_DIM": 0, "KV_DIM": 0, "HEAD_DIM": 2}  # fmt: skip
    if heads.rotations.shape != (2, rows, heads.head_dim // 2):
        raise ValueError(f"rotations of shape {list(heads.rotations.shape)} do not fit {rows} rows")
    keys, values, slots = heads.slot_buffers or (absent, absent, absent)
    return {
        "rot_ptr": heads.rotations.contiguous(), "keys_ptr": keys, "values_ptr": values, "slots_ptr": slots,
        "ROPE": True, "CACHE": heads.slot_buffers is not None, "Q_DIM": heads.q_dim, "KV_DIM": heads.kv_dim,
        "HEAD_DIM": heads.head_dim,
    }  # fmt: skip


class MatvecConfig(NamedTuple):
    """A launch of the kernel: output columns per program, weight columns per tile, warps."""

    block_n: int
    block_k: int
    num_warps: int


def matvec_available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device` (the attention kernels' condition)."""
    return step_attention_available(device)


def matvec_config(n: int, k: int, device: torch.device, normed: bool, swiglu: bool, fp8: bool = False) -> MatvecConfig:
    """The launch for an [n, k] product, the fastest of `tools.bench_products --sweep` (figures in
    docs/PERFORMANCE.md): one output column per program (thousands of programs keep the most reads in flight),
    or four when every program first reads the input for the norm, which more columns amortise; SwiGLU's two
    columns a program over the whole row as one tile, padded to a power of two and all of it loaded before the
    program waits for its predecessor. Other tiles are powers of two that divide k, so no load needs a mask.
    Triton's CPU interpreter runs programs one by one in Python, so there a program takes up to 128 columns (a
    tiny vocabulary's LM head is then a few programs, not hundreds). An 8-bit weight (`--weights fp8 --sweep`):
    eight columns a program with four warps, tiles of 512 columns when normed and up to 4096 otherwise; SwiGLU's
    four columns over the whole row."""
    if fp8:
        widest, columns, warps = (FP8_NORMED_BLOCK_K if normed else FP8_BLOCK_K), 8, 4
    else:
        widest, columns, warps = (NORMED_BLOCK_K if normed else BLOCK_K), 4 if normed else 1, 4 if normed else 8
    tile = min(widest, k & -k)
    if device.type != "cuda":
        return MatvecConfig(min(1 << (n - 1).bit_length(), 128), tile, warps)
    if swiglu:
        return MatvecConfig(4 if fp8 else 2, 1 << (k - 1).bit_length(), 4)
    return MatvecConfig(columns, tile, warps)


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm: Norm | None = None,
    swiglu: bool = False,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    heads: Heads | None = None,
    prefetch: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
    config: MatvecConfig | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [1, K] times weight [N, K]^T, rounded where eager rounds: `residual + F.linear(h, weight)` with
    h = x or `norm`'s `rms_norm(x) * scale`; with `swiglu`, the weight is [w1; w3] and the result
    `silu(gate) * up` [1, N / 2]; with `gelu`, `F.gelu` of the product; with `heads`, RoPE and the cache writes
    of a q/k/v product. `prefetch` is the next product's weight, started into L2 under `overlap` (see
    `kernel_overlap`). `config` overrides `matvec_config` (benchmarks). An e4m3 weight comes with its scales
    [N] (`weight_scale`, as `Fp8Linear` keeps them): each column's float32 sum times its scale, then rounded."""
    if x.shape[0] != 1 or not weight.is_contiguous():
        raise ValueError(f"matvec: takes one row and a contiguous weight, got an input of shape {list(x.shape)}")
    if (weight.dtype == FP8) != (weight_scale is not None):
        raise ValueError("matvec: an e4m3 weight, and only one, comes with its scales")
    k = x.shape[1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    config = config or matvec_config(n, k, x.device, norm is not None, swiglu, weight_scale is not None)
    if (
        config.block_n & (config.block_n - 1)
        or (k % config.block_k and config.block_k < k)
        or (config.block_k & (config.block_k - 1))
        or (heads is not None and n % config.block_n)  # the heads' epilogue takes whole blocks
    ):
        raise ValueError(f"matvec: launch {config} does not fit a [{n}, {k}] product")
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    absent = out  # stands in for the optional tensors a launch does not use; the kernel never reads it
    programs = -(-n // config.block_n)
    share = prefetch_share(prefetch, overlap, programs)
    pdl = uses_pdl(overlap, x.device)
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _matvec[(programs,)](
            x, weight,
            absent if norm is None else norm.weight,
            absent if norm is None or norm.scale is None else norm.scale.reshape(-1),
            absent if residual is None else residual.contiguous(),
            absent if weight_scale is None else weight_scale,
            out,
            absent if share is None else share.tensor, 0 if share is None else share.total,
            0 if share is None else share.chunk,
            norm.eps if norm is not None else 0.0,
            N=n, K=k, NORM=norm is not None, SCALE=norm is not None and norm.scale is not None,
            SWIGLU=swiglu, GELU=gelu, RESIDUAL=residual is not None, W_SCALE=weight_scale is not None,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, PREFETCH=share is not None, EARLY=overlap.early_weights, PDL=pdl,
            **heads_arguments(heads, 1, absent),
            num_warps=config.num_warps, **launch_options(pdl),
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _padded_load(ptr, offsets, ks, K: tl.constexpr, BLOCK_K: tl.constexpr, READ_ONCE: tl.constexpr):
        """ptr + offsets at positions ks along a row of K, to be evicted first if READ_ONCE; a tile wider than
        the row (the whole row, padded to a power of two) reads zeros past its end."""
        if BLOCK_K > K:
            if READ_ONCE:
                return tl.load(ptr + offsets, mask=ks < K, other=0.0, eviction_policy="evict_first")
            return tl.load(ptr + offsets, mask=ks < K, other=0.0)
        if READ_ONCE:
            return tl.load(ptr + offsets, eviction_policy="evict_first")
        return tl.load(ptr + offsets)

    @triton.jit
    def _normed_tile(x_ptr, norm_ptr, scale_ptr, k0, inv_rms, NORM, SCALE, K: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile k0 of the input row as float32, normed with rms_norm's roundings: normalised then rounded,
        times the weight, times the scale."""
        ks = k0 + tl.arange(0, BLOCK_K)
        h = _padded_load(x_ptr, ks, ks, K, BLOCK_K, False)
        if NORM:
            dtype = h.dtype
            h = (h.to(tl.float32) * inv_rms).to(dtype)
            h = (h.to(tl.float32) * _padded_load(norm_ptr, ks, ks, K, BLOCK_K, False).to(tl.float32)).to(dtype)
            if SCALE:
                h = (h.to(tl.float32) * _padded_load(scale_ptr, ks, ks, K, BLOCK_K, False).to(tl.float32)).to(dtype)
        return h.to(tl.float32)

    @triton.jit
    def _matvec(
        x_ptr, w_ptr, norm_ptr, scale_ptr, residual_ptr, w_scale_ptr, out_ptr, prefetch_ptr, prefetch_total,
        prefetch_chunk, eps, rot_ptr, keys_ptr, values_ptr, slots_ptr,
        N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, SCALE: tl.constexpr, SWIGLU: tl.constexpr,
        GELU: tl.constexpr, RESIDUAL: tl.constexpr, W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr, ROPE: tl.constexpr,
        CACHE: tl.constexpr, Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        dtype = out_ptr.dtype.element_ty
        prefetch_to_l2(prefetch_ptr, prefetch_total, prefetch_chunk, tl.program_id(0), PREFETCH)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_cols = cols
        if N % BLOCK_N:  # the last block reaches past the output: its extra columns read the last row again
            w_cols = tl.minimum(cols, N - 1)
        ks = tl.arange(0, BLOCK_K)
        # The weight is read once, so it should not displace the inputs other programs still read. It is also
        # constant, so its first tile is on its way while the predecessor finishes.
        if not EARLY:
            wait_for_inputs(PDL)
        rows_at = w_cols[:, None] * K + ks[None, :]
        w_first = _padded_load(w_ptr, rows_at, ks[None, :], K, BLOCK_K, True)
        w_first_up = w_first
        if SWIGLU:
            w_first_up = _padded_load(w_ptr + N * K, rows_at, ks[None, :], K, BLOCK_K, True)
        if EARLY:
            wait_for_inputs(PDL)
        inv_rms = 0.0
        if NORM:
            # Every program reads the K inputs twice (from L2: a few KiB) rather than a kernel computing the norm.
            squares = tl.zeros([BLOCK_K], tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):
                xk = _padded_load(x_ptr, k0 + ks, k0 + ks, K, BLOCK_K, False).to(tl.float32)
                squares += xk * xk
            inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        h = _normed_tile(x_ptr, norm_ptr, scale_ptr, 0, inv_rms, NORM, SCALE, K, BLOCK_K)[None, :]
        acc = h * w_first.to(tl.float32)
        acc_up = h * w_first_up.to(tl.float32)
        # Unrolled, so every tile's load can be issued before the first is used (and, normed, before the norm).
        for k0 in tl.static_range(BLOCK_K, K, BLOCK_K):
            h = _normed_tile(x_ptr, norm_ptr, scale_ptr, k0, inv_rms, NORM, SCALE, K, BLOCK_K)[None, :]
            offsets = w_cols[:, None] * K + k0 + ks[None, :]
            acc += h * tl.load(w_ptr + offsets, eviction_policy="evict_first").to(tl.float32)
            if SWIGLU:
                acc_up += h * tl.load(w_ptr + N * K + offsets, eviction_policy="evict_first").to(tl.float32)
        y = tl.sum(acc, 1)
        up = tl.sum(acc_up, 1)
        if W_SCALE:  # an 8-bit weight's columns: their sums times their scales, before the one rounding
            y = y * tl.load(w_scale_ptr + w_cols)
            if SWIGLU:
                up = up * tl.load(w_scale_ptr + N + w_cols)
        y = y.to(dtype)
        if SWIGLU:
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            y = (silu.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
        if GELU:
            # torch's erf GELU in float32 on the rounded product, in its order of operations.
            g = y.to(tl.float32)
            y = (g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(dtype)
        if RESIDUAL:
            y = (tl.load(residual_ptr + w_cols).to(tl.float32) + y.to(tl.float32)).to(dtype)
        if ROPE:
            one = tl.arange(0, 1)
            y = heads_epilogue(
                y[None, :], one, cols, one[:, None] < 1, rot_ptr, keys_ptr, values_ptr,
                slots_ptr, 1, Q_DIM, KV_DIM, HEAD_DIM, CACHE, 1, BLOCK_N,
            ).reshape(BLOCK_N)  # fmt: skip
        tl.store(out_ptr + cols, y, mask=cols < N)

    @triton.jit
    def heads_epilogue(
        y, rows, cols, live, rot_ptr, keys_ptr, values_ptr, slots_ptr,
        ROWS, Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE: tl.constexpr,
        TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """A q/k/v product's rounded output tile y [TILE, BLOCK_N] (`rows` of the step, `cols` of the product)
        with RoPE on its query and key columns, rounded as `RotaryEmbedding.apply` rounds; keys and values also
        stored into their cache slots when CACHE. ROWS, the step's rows, may be a runtime value."""
        dtype = y.dtype
        even, odd = tl.split(y.reshape(TILE, BLOCK_N // 2, 2))
        first, _ = tl.split(cols.reshape(BLOCK_N // 2, 2))  # each pair's first column
        rotated = (first < Q_DIM + KV_DIM)[None, :]
        at = rows[:, None] * (HEAD_DIM // 2) + (first % HEAD_DIM // 2)[None, :]
        cos = tl.load(rot_ptr + at, mask=live & rotated, other=0.0).to(tl.float32)
        sin = tl.load(rot_ptr + ROWS * (HEAD_DIM // 2) + at, mask=live & rotated, other=0.0).to(tl.float32)
        e, o = even.to(tl.float32), odd.to(tl.float32)
        new_even = ((e * cos).to(dtype).to(tl.float32) - (o * sin).to(dtype).to(tl.float32)).to(dtype)
        new_odd = ((o * cos).to(dtype).to(tl.float32) + (e * sin).to(dtype).to(tl.float32)).to(dtype)
        y = tl.join(tl.where(rotated, new_even, even), tl.where(rotated, new_odd, odd)).reshape(TILE, BLOCK_N)
        if CACHE:
            slot = tl.load(slots_ptr + rows, mask=rows < ROWS, other=0)[:, None]
            column = cols[None, :] - Q_DIM
            is_key = (column >= 0) & (column < KV_DIM)
            tl.store(keys_ptr + slot * KV_DIM + column, y, mask=live & is_key)
            tl.store(values_ptr + slot * KV_DIM + column - KV_DIM, y, mask=live & (column >= KV_DIM))
        return y
