"""The decoder step's one-row matrix products as one Triton kernel that reads the weight once, with the work
around them fused in: the RMSNorm (times the FFN scale) before, and SwiGLU or the residual add after.

A one-position step multiplies one row by every weight, so a product is a weight read. cuBLAS reads the
decoder's wo at about half the copy bandwidth (its tiles leave most multiprocessors idle) and adds split-K
reductions, and the norms, activation and residual adds are kernels of their own between the products. Here
every program owns a few whole output columns, so no reduction crosses programs and the fusions are local.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from stages.step_attention import step_attention_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then the products stay with torch
    triton = None

BLOCK_K = 512  # weight columns per tile: 1 KiB of each bf16 row per load
NORMED_BLOCK_K = 1024


class Norm(NamedTuple):
    """RMSNorm applied to the input row before the product: its weight, epsilon and an optional scale."""

    weight: torch.Tensor
    eps: float
    scale: torch.Tensor | None = None


class MatvecConfig(NamedTuple):
    """A launch of the kernel: output columns per program, weight columns per tile, warps."""

    block_n: int
    block_k: int
    num_warps: int


def matvec_available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of `device` (the attention kernels' condition)."""
    return step_attention_available(device)


def matvec_config(n: int, k: int, device: torch.device, normed: bool) -> MatvecConfig:
    """The launch for an [n, k] product, the fastest of a sweep on an H200 (`tools.bench_products --sweep`):
    one output column per program (thousands of programs keep the most reads in flight), or four when every
    program first reads the input for the norm, which more columns amortise. Tiles are powers of two that
    divide k, so no load needs a mask. Triton's CPU interpreter runs programs one by one in Python, so there
    the programs are as few as whole power-of-two blocks of columns allow."""
    block_n = (4 if normed else 1) if device.type == "cuda" else min(n & -n, 128)
    return MatvecConfig(block_n, min(NORMED_BLOCK_K if normed else BLOCK_K, k & -k), 4 if normed else 8)


def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm: Norm | None = None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    config: MatvecConfig | None = None,
) -> torch.Tensor:
    """x [1, K] times weight [N, K]^T, rounded where eager rounds: `residual + F.linear(h, weight)` with
    h = x or `norm`'s `rms_norm(x) * scale`; with `swiglu`, the weight is [w1; w3] and the result
    `silu(gate) * up` [1, N / 2]. `config` overrides `matvec_config` (benchmarks)."""
    if x.shape[0] != 1 or not weight.is_contiguous():
        raise ValueError(f"matvec: takes one row and a contiguous weight, got an input of shape {list(x.shape)}")
    k = x.shape[1]
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    config = config or matvec_config(n, k, x.device, norm is not None)
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    absent = out  # stands in for the optional tensors a launch does not use; the kernel never reads it
    # Triton launches on the current device; a stage may live on another GPU than that.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _matvec[(n // config.block_n,)](
            x, weight,
            absent if norm is None else norm.weight,
            absent if norm is None or norm.scale is None else norm.scale.reshape(-1),
            absent if residual is None else residual.contiguous(),
            out,
            norm.eps if norm is not None else 0.0,
            N=n, K=k, NORM=norm is not None, SCALE=norm is not None and norm.scale is not None,
            SWIGLU=swiglu, RESIDUAL=residual is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.num_warps,
        )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _normed_tile(x_ptr, norm_ptr, scale_ptr, k0, inv_rms, NORM, SCALE, BLOCK_K: tl.constexpr):
        """Tile k0 of the input row as float32, normed with rms_norm's roundings: normalised then rounded,
        times the weight, times the scale."""
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(x_ptr + ks)
        if NORM:
            dtype = h.dtype
            h = (h.to(tl.float32) * inv_rms).to(dtype)
            h = (h.to(tl.float32) * tl.load(norm_ptr + ks).to(tl.float32)).to(dtype)
            if SCALE:
                h = (h.to(tl.float32) * tl.load(scale_ptr + ks).to(tl.float32)).to(dtype)
        return h.to(tl.float32)

    @triton.jit
    def _matvec(
        x_ptr, w_ptr, norm_ptr, scale_ptr, residual_ptr, out_ptr, eps,
        N: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, SCALE: tl.constexpr, SWIGLU: tl.constexpr,
        RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        dtype = out_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        inv_rms = 0.0
        if NORM:
            # Every program reads the K inputs twice (from L2: a few KiB) rather than a kernel computing the norm.
            squares = tl.zeros([BLOCK_K], tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):
                xk = tl.load(x_ptr + k0 + ks).to(tl.float32)
                squares += xk * xk
            inv_rms = 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        # The weight is read once, so it should not displace the inputs other programs still read.
        # Unrolled, so every tile's load can be issued before the first is used (and, normed, before the norm).
        for k0 in tl.static_range(0, K, BLOCK_K):
            h = _normed_tile(x_ptr, norm_ptr, scale_ptr, k0, inv_rms, NORM, SCALE, BLOCK_K)[None, :]
            offsets = cols[:, None] * K + k0 + ks[None, :]
            acc += h * tl.load(w_ptr + offsets, eviction_policy="evict_first").to(tl.float32)
            if SWIGLU:
                acc_up += h * tl.load(w_ptr + N * K + offsets, eviction_policy="evict_first").to(tl.float32)
        y = tl.sum(acc, 1).to(dtype)
        if SWIGLU:
            gate = y.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            y = (silu.to(tl.float32) * tl.sum(acc_up, 1).to(dtype).to(tl.float32)).to(dtype)
        if RESIDUAL:
            y = (tl.load(residual_ptr + cols).to(tl.float32) + y.to(tl.float32)).to(dtype)
        tl.store(out_ptr + cols, y)
