"""The work between a batched step's products, one Triton kernel each: the RMSNorm (with the decoder's FFN
scale), RoPE with the new keys' and values' cache writes, and SwiGLU.

Many rows go through cuBLAS for their products, and torch runs what lies between them as about twenty small
kernels a block (a norm alone is seven), each a few microseconds that the products' weight reads do not hide.
These compute the same values, rounded where eager rounds (see `rms_norm`, `RotaryEmbedding.apply`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from voxtral_run.stages.kernels.matvec import Heads, Norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds come without Triton; then the model's own modules run
    triton = None

if triton is not None:  # Triton's jit helpers exist only where Triton does
    from voxtral_run.stages.kernels.matvec import heads_epilogue

ROPE_TILE_ROWS = 16  # rows of a RoPE program
ROPE_BLOCK_N = 256  # most columns of a RoPE program
SWIGLU_BLOCK = 1024  # output columns of a SwiGLU program


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current device; a stage may live on another GPU than that.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def norm_rows(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """`rms_norm` of x [B, T, dim] with `norm`'s weight and epsilon, times its `scale` [B, 1, dim] if any (one
    row per stream of the batch, for each of its T positions) -> [B, T, dim]."""
    batch, length, dim = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    scale = x if norm.scale is None else norm.scale.reshape(batch, dim).contiguous()
    with _on_device(x):
        _norm_rows[(batch * length,)](
            x, norm.weight, scale, out, norm.eps, length, DIM=dim, BLOCK=triton.next_power_of_2(dim),
            SCALE=norm.scale is not None, num_warps=4,
        )  # fmt: skip
    return out


def rope_rows(qkv: torch.Tensor, heads: Heads) -> torch.Tensor:
    """A q/k/v product's output [R, q_dim + 2 * kv_dim] with RoPE applied in place to its query and key columns
    (`heads.rotations` [2, R, head_dim / 2]); its keys and values also written into `heads.slot_buffers` when
    given. -> the rotated queries and keys [R, q_dim + kv_dim], a view of `qkv`."""
    rows, width = qkv.shape
    if qkv.stride(1) != 1 or heads.rotations.shape != (2, rows, heads.head_dim // 2):
        raise ValueError(f"rope_rows: a product of shape {list(qkv.shape)} does not fit its rotations")
    rotated = heads.q_dim + heads.kv_dim
    keys, values, slots = heads.slot_buffers or (qkv, qkv, qkv)
    # Column blocks that divide the product's width, so none reaches past its values; without the cache writes
    # only the rotated columns need a program.
    block_n = math.gcd(width, ROPE_BLOCK_N)
    columns = width if heads.slot_buffers is not None else rotated
    grid = (triton.cdiv(rows, ROPE_TILE_ROWS), triton.cdiv(columns, block_n))
    with _on_device(qkv):
        _rope_rows[grid](
            qkv, heads.rotations.contiguous(), keys, values, slots.contiguous(), qkv.stride(0), rows,
            Q_DIM=heads.q_dim, KV_DIM=heads.kv_dim, HEAD_DIM=heads.head_dim, CACHE=heads.slot_buffers is not None,
            TILE=ROPE_TILE_ROWS, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
    return qkv[:, :rotated]


def swiglu_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of a [w1; w3] product's output [..., 2 * hidden] -> [..., hidden]."""
    *lead, width = gate_up.shape
    hidden = width // 2
    flat = gate_up.reshape(-1, width)
    out = torch.empty(flat.shape[0], hidden, dtype=gate_up.dtype, device=gate_up.device)
    with _on_device(gate_up):
        _swiglu_rows[(flat.shape[0], triton.cdiv(hidden, SWIGLU_BLOCK))](
            flat, out, flat.stride(0), HIDDEN=hidden, BLOCK=SWIGLU_BLOCK, num_warps=4
        )
    return out.view(*lead, hidden)


if triton is not None:

    @triton.jit
    def _norm_rows(x_ptr, weight_ptr, scale_ptr, out_ptr, eps, length, DIM: tl.constexpr, BLOCK: tl.constexpr,
                   SCALE: tl.constexpr):  # fmt: skip
        """One row: normalised in float32 and rounded, times the weight and rounded, times its stream's scale
        and rounded."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < DIM
        x = tl.load(x_ptr + row * DIM + cols, mask=inside, other=0.0)
        dtype = x.dtype
        full = x.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(full * full, 0) / DIM + eps)
        h = (full * inv_rms).to(dtype)
        h = (h.to(tl.float32) * tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)).to(dtype)
        if SCALE:
            scale = tl.load(scale_ptr + row // length * DIM + cols, mask=inside, other=0.0)
            h = (h.to(tl.float32) * scale.to(tl.float32)).to(dtype)
        tl.store(out_ptr + row * DIM + cols, h, mask=inside)

    @triton.jit(do_not_specialize=["n_rows"])
    def _rope_rows(
        qkv_ptr, rot_ptr, keys_ptr, values_ptr, slots_ptr, row_stride, n_rows,
        Q_DIM: tl.constexpr, KV_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE: tl.constexpr, TILE: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """A tile of rows and columns: rotated (query and key columns) and written back, keys and values into
        their slots."""
        rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = (rows < n_rows)[:, None]
        at = rows[:, None] * row_stride + cols[None, :]
        y = tl.load(qkv_ptr + at, mask=live, other=0.0)
        y = heads_epilogue(
            y, rows, cols, live, rot_ptr, keys_ptr, values_ptr, slots_ptr, n_rows, Q_DIM, KV_DIM, HEAD_DIM, CACHE,
            TILE, BLOCK_N,
        )  # fmt: skip
        tl.store(qkv_ptr + at, y, mask=live & (cols < Q_DIM + KV_DIM)[None, :])

    @triton.jit
    def _swiglu_rows(gate_up_ptr, out_ptr, row_stride, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
        """A block of one row's outputs: the gate's SiLU rounded, times the up projection, rounded."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < HIDDEN
        gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0)
        up = tl.load(gate_up_ptr + row * row_stride + HIDDEN + cols, mask=inside, other=0.0)
        dtype = gate.dtype
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)
        tl.store(out_ptr + row * HIDDEN + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=inside)
