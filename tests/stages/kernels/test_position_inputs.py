"""The position-inputs kernel (in Triton's CPU interpreter here) computes what the model's torch operations do."""

from __future__ import annotations

import pytest
import torch

from voxtral_run.stages.kernels import position_inputs as position_inputs_module
from voxtral_run.stages.kernels.position_inputs import fused_position_inputs, position_inputs_available
from voxtral_run.stages.model.cache import single_stream_cache
from voxtral_run.stages.model.layers import RotaryEmbedding, position_inputs

WINDOW = 100
# On a GPU the kernel's cosine is CUDA's, as torch's, and rounds to nearest; the CPU interpreter's is NumPy's, a
# float32 ulp off at times, and it rounds float32 to bfloat16 toward zero.
TOLERANCE = {torch.float32: {"rtol": 0, "atol": 2e-7}, torch.bfloat16: {"rtol": 2**-7, "atol": 0}}

pytestmark = pytest.mark.skipif(
    not position_inputs_available(torch.device("cpu"), 8), reason="needs Triton (the dev extra installs it)"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_the_torch_operations_for_a_batch_across_wraps(dtype) -> None:
    """Three rows at their own positions, steps of 4, rings wrapping: the same bias, slots, pages and ring
    positions, bit for bit, and the same rotations to the interpreter's trigonometry."""
    rope = RotaryEmbedding(16, 1e6)
    fused, reference = (single_stream_cache(WINDOW, 64, 1, 1, 16, rows=3, dtype=dtype, device="cpu") for _ in "ab")
    starts = torch.tensor([[0], [37], [500]])
    for step in range(60):
        positions = starts + torch.arange(4 * step, 4 * step + 4)
        for cache in (fused, reference):
            cache.prepare((positions[:, -1] + 1).tolist())
        rotations, bias = fused_position_inputs(positions, rope.inv_freq, fused, dtype)
        expected_rotations, expected_bias = position_inputs(positions, rope, reference, dtype)
        assert torch.equal(bias, expected_bias) and bool((bias == 0).any()) and bool(bias.isinf().any())
        torch.testing.assert_close(rotations, expected_rotations, **TOLERANCE[dtype])
        assert torch.equal(fused.slots, reference.slots) and torch.equal(fused.pages, reference.pages)
    assert torch.equal(fused.pool.positions, reference.pool.positions)
    assert 4 * 60 + 500 > 2 * fused.capacity  # the rings wrapped


def test_the_kernel_needs_power_of_two_rotation_planes() -> None:
    assert not position_inputs_available(torch.device("cpu"), 3)
    assert position_inputs_available(torch.device("cpu"), 32)


def test_one_compiled_variant_serves_every_span_and_block_length(monkeypatch) -> None:
    """A stream's span grows step by step and its first push is a long block: if either were compiled into the
    kernel, a step mid-stream would wait for a compile."""
    launches = []
    kernel = position_inputs_module._position_inputs

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constants):
                launches.append(tuple(sorted(constants.items())))
                return kernel[grid](*args, **constants)

            return launch

    monkeypatch.setattr(position_inputs_module, "_position_inputs", Recorder())
    rope = RotaryEmbedding(16, 10_000.0)
    cache = single_stream_cache(1000, 64, 1, 1, 16, dtype=torch.float32, device="cpu")
    for start, rows in ((0, 131), (131, 4), (300, 3), (700, 4), (5000, 1)):
        cache.prepare(start + rows)
        fused_position_inputs(torch.arange(start, start + rows)[None], rope.inv_freq, cache, torch.float32)
    assert len(set(launches)) == 1 and len(launches) == 5
