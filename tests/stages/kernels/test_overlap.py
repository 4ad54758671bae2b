"""The step kernels' overlap with their neighbours: how a launch shares a prefetch, and that the Hopper-only code
(programmatic dependent launch, bulk L2 prefetch) compiles for an H100/H200, which the CPU interpreter never
runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from voxtral_run.stages.kernels import overlap as kernel_overlap
from voxtral_run.stages.kernels.overlap import (
    DEFAULT_OVERLAP,
    NO_OVERLAP,
    PREFETCH_ALIGNMENT,
    PREFETCH_PROGRAMS,
    Overlap,
    prefetch_share,
    uses_pdl,
)
from voxtral_run.stages.kernels.step_attention import step_attention_available


@pytest.fixture
def hopper(monkeypatch) -> None:
    """Host-side decisions as on a GPU that runs both mechanisms."""
    monkeypatch.setattr(kernel_overlap, "overlap_supported", lambda device: True)


@pytest.mark.parametrize("programs", [1, 3, 80, PREFETCH_PROGRAMS, 9216])
@pytest.mark.parametrize("numel", [8, 1000, 3 << 20])
def test_a_launch_prefetches_the_start_of_a_tensor_in_aligned_chunks_of_its_first_programs(
    hopper, programs, numel
) -> None:
    tensor = torch.zeros(numel, dtype=torch.bfloat16)
    share = prefetch_share(tensor, Overlap(prefetch_bytes=1 << 20), programs)
    size = 2 * numel
    assert share.total == min(size, 1 << 20) - min(size, 1 << 20) % PREFETCH_ALIGNMENT
    assert share.chunk % PREFETCH_ALIGNMENT == 0
    issuers = min(programs, PREFETCH_PROGRAMS)
    # The smallest aligned chunk with which the issuing programs cover the bytes.
    assert share.chunk - PREFETCH_ALIGNMENT < share.total / issuers <= share.chunk


def test_no_prefetch_without_a_tensor_a_budget_an_aligned_start_or_a_capable_device(hopper, monkeypatch) -> None:
    tensor = torch.zeros(4096, dtype=torch.bfloat16)
    prefetching = Overlap(prefetch_bytes=1 << 20)
    assert prefetch_share(None, prefetching, 80) is None
    assert prefetch_share(tensor, NO_OVERLAP, 80) is None
    assert prefetch_share(tensor, Overlap(prefetch_bytes=0), 80) is None
    assert prefetch_share(tensor[1:], prefetching, 80) is None  # 2 bytes past an aligned start
    assert prefetch_share(tensor[8:], prefetching, 80) is not None
    monkeypatch.setattr(kernel_overlap, "overlap_supported", lambda device: False)
    assert prefetch_share(tensor, prefetching, 80) is None


def test_kernels_off_a_hopper_gpu_launch_plainly() -> None:
    assert not uses_pdl(DEFAULT_OVERLAP, torch.device("cpu"))
    assert not kernel_overlap.overlap_supported(torch.device("cpu"))


# Compiled in a fresh process: the tests' own process defines the kernels for the CPU interpreter. `ptx` takes
# pointer types by name beyond POINTERS (else bf16).
PTX_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from voxtral_run.stages.kernels import matvec, rows_matmul, step_attention

POINTERS = {"partial_ptr": "*fp32", "stats_ptr": "*fp32", "ticket_ptr": "*i32", "slots_ptr": "*i64"}
FLOATS = ("eps", "scale")

def ptx(kernel, constants, pointers={}):
    signature, constexprs = {}, {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", constants[name]
        else:
            signature[name] = {**POINTERS, **pointers}.get(name, "*bf16") if name.endswith("_ptr") else (
                "fp32" if name in FLOATS else "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"launch_pdl": True, "num_warps": 4}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
"""
OVERLAPPING_KERNELS = """
bf16 = {"DOT": triton.language.bfloat16, "PRECISION": "tf32"}
heads = {"ROPE": True, "CACHE": True, "Q_DIM": 4096, "KV_DIM": 1024, "HEAD_DIM": 128}
overlap = {"PREFETCH": True, "PDL": True}
kernels = {}
for early in (True, False):
    name = "" if early else "_late"
    kernels["matvec" + name] = ptx(matvec._matvec, {
        "N": 6144, "K": 3072, "NORM": True, "SCALE": False, "SWIGLU": False, "RESIDUAL": False,
        "GELU": not early,  # the adapter's GELU (erf) compiles for the GPU too
        "W_SCALE": False, "BLOCK_N": 4, "BLOCK_K": 1024, **overlap, "EARLY": early, **heads})
    kernels["rows_matmul" + name] = ptx(rows_matmul._rows_matmul, {
        "ROWS": 4, "N": 1280, "K": 2048, "BIAS": True, "NORM": False, "SCALE": False, "SWIGLU": False,
        "RESIDUAL": True, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4, "STAGES": 5, **overlap, "EARLY": early,
        "ROPE": False, "CACHE": False, "Q_DIM": 0, "KV_DIM": 0, "HEAD_DIM": 2, "TILE": 16, **bf16})
kernels["split_attention"] = ptx(step_attention._split_attention, {
    **bf16, "FP8_DOT": triton.language.float16, "LOG2_E": 1.4426950408889634, "ROWS": 16, "BLOCK": 64, **overlap,
    "PAGED": False, "LENGTH": 4, "GROUP": 1,
    "HEAD_DIM": 64, "MERGE_SLICES": 8, "MERGE_ROWS": 4, "EMPTY_PAGE": 0, "FP8": False, "SUB": 64})
print(json.dumps({name: {"wait": "griddepcontrol.wait" in code,
                         "launch_dependents": "griddepcontrol.launch_dependents" in code,
                         "prefetch": "cp.async.bulk.prefetch.L2.global" in code,
                         "loads_before_wait": "ld.global" in code.split("griddepcontrol.wait")[0]}
                  for name, code in kernels.items()}))
"""


@pytest.mark.skipif(
    not step_attention_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)"
)
def test_the_overlapping_kernels_compile_for_hopper_with_their_instructions() -> None:
    """The kernels with programmatic dependent launch and L2 prefetching on, compiled to PTX (and by ptxas) for
    an H100/H200: every kernel waits for its predecessor, lets its successor launch, and prefetches (the next
    product's weight, or its slice of the cache); the products' first weight loads come before the wait."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    script = PTX_FOR_HOPPER + OVERLAPPING_KERNELS
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    # Products load their first weight tile before the wait unless told not to; attention loads nothing first.
    early = {"matvec": True, "rows_matmul": True, "matvec_late": False, "rows_matmul_late": False}
    assert set(found) == {*early, "split_attention"}
    for name, instructions in found.items():
        assert instructions.pop("loads_before_wait") == early.get(name, False), name
        assert all(instructions.values()), (name, instructions)
