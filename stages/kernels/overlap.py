"""How a step's Triton kernels overlap their neighbours on Hopper GPUs: programmatic dependent launch, and
prefetching the next product's weight into L2.

A step is a chain of short kernels, each a few-MB weight read that finishes in microseconds, so between two
of them the memory sits idle: the first kernel's tail, the launch, the second's first loads. Launched as a
programmatic dependent, a kernel starts while its predecessor finishes and waits (`griddepcontrol.wait`)
only before it reads what that predecessor wrote. A product's first programs also start the next product's
weight on its way into L2 (`cp.async.bulk.prefetch`), so that read is under way across the gap. Both change
no result: the wait comes before any read of a predecessor's output, and a prefetch only warms L2, which
every store reaches.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only torch builds come without Triton
    triton = None

HOPPER = 9  # compute capability major of the first GPUs with griddepcontrol and bulk L2 prefetch
PREFETCH_PROGRAMS = 128  # programs that issue a launch's prefetch: the first to run, spread over the GPU
PREFETCH_PIECE = 64 << 10  # bytes per prefetch instruction
PREFETCH_ALIGNMENT = 16  # bulk prefetches take 16-byte aligned addresses and sizes


class Overlap(NamedTuple):
    """Whether kernels launch as programmatic dependents, how many bytes of the next product's weight a product
    prefetches into L2 (with none, attention does not prefetch its slice of the cache either), and whether a
    product's first weight loads come before its wait."""

    pdl: bool = True
    # 1 MB: larger prefetches compete with the running product's own reads (the products alone slow down from
    # 4 MB on) and gain nothing clear in the steps. `tools.bench_products` and `tools.bench_gpu` compare the
    # sizes; figures in docs/PERFORMANCE.md.
    prefetch_bytes: int = 1 << 20
    # A product issues the loads of its first weight tile before it waits for its predecessor.
    early_weights: bool = True


DEFAULT_OVERLAP = Overlap()
NO_OVERLAP = Overlap(pdl=False, prefetch_bytes=0, early_weights=False)


class Prefetch(NamedTuple):
    """A launch's share of a prefetch: the tensor, the bytes to prefetch from its start, and each issuing
    program's chunk of them."""

    tensor: torch.Tensor
    total: int
    chunk: int


@functools.cache
def overlap_supported(device: torch.device) -> bool:
    """Whether `device` runs griddepcontrol and bulk L2 prefetches: a CUDA GPU of compute capability 9 or later
    (Triton's CPU interpreter runs neither)."""
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= HOPPER


def uses_pdl(overlap: Overlap, device: torch.device) -> bool:
    """Whether a kernel on `device` launches as a programmatic dependent under `overlap`."""
    return overlap.pdl and overlap_supported(device)


def launch_options(pdl: bool) -> dict:
    """Triton launch keywords for a kernel that does or does not launch as a programmatic dependent."""
    return {"launch_pdl": True} if pdl else {}


def prefetch_share(tensor: torch.Tensor | None, overlap: Overlap, programs: int) -> Prefetch | None:
    """How a launch of `programs` programs prefetches the start of `tensor` under `overlap`; None when it does
    not (no tensor, no prefetching, a device without bulk prefetch, or an unaligned tensor)."""
    if tensor is None or overlap.prefetch_bytes <= 0 or not overlap_supported(tensor.device):
        return None
    if tensor.data_ptr() % PREFETCH_ALIGNMENT:
        return None
    total = min(tensor.numel() * tensor.element_size(), overlap.prefetch_bytes)
    total -= total % PREFETCH_ALIGNMENT
    issuers = min(programs, PREFETCH_PROGRAMS)
    chunk = -(-total // issuers)
    chunk += -chunk % PREFETCH_ALIGNMENT
    return Prefetch(tensor, total, chunk) if total else None


if triton is not None:
    # One thread of the program issues each piece; the others skip it.
    _PREFETCH_ASM = tl.constexpr(
        "{ .reg .pred first; .reg .b32 thread; mov.u32 thread, %tid.x; setp.eq.u32 first, thread, 0; "
        "@first cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }"
    )

    _ISSUERS = tl.constexpr(PREFETCH_PROGRAMS)
    _PIECE = tl.constexpr(PREFETCH_PIECE)
    _ALIGNMENT = tl.constexpr(PREFETCH_ALIGNMENT)

    @triton.jit
    def prefetch_to_l2(base_ptr, total, chunk, program, PREFETCH: tl.constexpr):
        """This program's chunk of the first `total` bytes at `base_ptr` into L2, when PREFETCH."""
        if PREFETCH:
            start = tl.minimum(program, _ISSUERS) * chunk  # programs past the issuers start past the end
            if start < total:
                size = tl.minimum(chunk, total - start)
                first = base_ptr.to(tl.pointer_type(tl.int8)) + start
                for offset in range(0, size, _PIECE):
                    piece = tl.minimum(_PIECE, size - offset)
                    tl.inline_asm_elementwise(
                        _PREFETCH_ASM, "=r,l,r", [first + offset, piece], dtype=tl.int32, is_pure=False, pack=1
                    )

    @triton.jit
    def prefetch_share_to_l2(base_ptr, total, program, programs):
        """Program `program` of `programs`: its even share of the first `total` bytes at `base_ptr` into L2."""
        chunk = (total + programs - 1) // programs
        chunk = (chunk + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT
        prefetch_to_l2(base_ptr, total, chunk, program, True)

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Under programmatic dependent launch, wait until the previous kernel's writes are visible, then let
        the next kernel launch: it starts while this one runs, never more than one ahead."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
