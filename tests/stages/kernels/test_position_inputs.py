"""The one-kernel position inputs (slots, rotations, attention bias) against the torch operations they replace."""

from __future__ import annotations

import pytest
import torch

from voxtral_run.stages.kernels import position_inputs as position_inputs_module
from voxtral_run.stages.kernels.position_inputs import fused_position_inputs, position_inputs_available
from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.layers import RotaryEmbedding, position_inputs

pytestmark = pytest.mark.skipif(
    not position_inputs_available(torch.device("cpu"), 8), reason="needs Triton (the dev extra installs it)"
)

WINDOW = 20
TOLERANCE = {torch.float32: {"rtol": 0, "atol": 2e-7}, torch.bfloat16: {"rtol": 2**-7, "atol": 0}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 63])
def test_the_kernel_enters_positions_and_computes_what_torch_computes_across_ring_wraps(rows, dtype) -> None:
    rope = RotaryEmbedding(head_dim=16, theta=10_000.0)
    fused, reference = (KVCache(WINDOW, 64, 1, 1, 16, dtype=dtype, device="cpu") for _ in range(2))
    # Several wraps of the ring, and positions far along a stream (the angles' float32 rounding).
    starts = [0, rows, 5 * rows, 3 * fused.capacity + 7, 100_003]
    for start in starts:
        positions = torch.arange(start, start + rows)
        for cache in (fused, reference):
            cache.prepare(start + rows)
        slots, rotations, bias = fused_position_inputs(
            positions, rope.inv_freq, fused.positions[0], fused.span, WINDOW, dtype
        )
        expected_rotations, expected_bias = position_inputs(positions[None], rope, reference, dtype)
        assert torch.equal(fused.positions, reference.positions)
        assert torch.equal(slots, reference.slots[0])
        assert torch.equal(bias, expected_bias[0])
        assert bool((bias == 0).any()) and bool(bias.isinf().any())
        # On a GPU the kernel's cosine is CUDA's, as torch's, and rounds to nearest; the CPU interpreter's is
        # NumPy's, a float32 ulp off at times, and it rounds float32 to bfloat16 toward zero.
        torch.testing.assert_close(rotations, expected_rotations[:, 0], **TOLERANCE[dtype])


def test_one_compiled_variant_serves_every_span_and_block_length(monkeypatch) -> None:
    """A stream's span grows step by step and its first push is a long block: if either were compiled into the
    kernel, a step mid-stream would wait for a compile."""
    launches = []
    kernel = position_inputs_module._position_inputs

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constants):
                launches.append((grid, tuple(sorted(constants.items()))))
                return kernel[grid](*args, **constants)

            return launch

    monkeypatch.setattr(position_inputs_module, "_position_inputs", Recorder())
    rope = RotaryEmbedding(head_dim=16, theta=10_000.0)
    cache = KVCache(1000, 64, 1, 1, 16, dtype=torch.float32, device="cpu")
    for start, rows in ((0, 131), (131, 4), (300, 3), (700, 4), (5000, 1)):
        cache.prepare(start + rows)
        positions = torch.arange(start, start + rows)
        fused_position_inputs(positions, rope.inv_freq, cache.positions[0], cache.span, 1000, torch.float32)
    assert len({launch for launch in launches}) == 1 and len(launches) == 5


def test_rotation_planes_must_be_a_power_of_two() -> None:
    assert not position_inputs_available(torch.device("cpu"), 3)
    assert position_inputs_available(torch.device("cpu"), 32)
