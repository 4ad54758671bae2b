"""A graphed step's staged input and output: what reaches the device, when, and what the host reads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxtral_run.stages.kernels.graphs import GraphPool, StagedInput, StagedOutput, StepGraphs


def test_a_staged_input_reaches_its_buffer_in_the_step_rounded_as_torch_rounds() -> None:
    staged = StagedInput(torch.zeros(4, 8, dtype=torch.bfloat16))
    values = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    staged.load(values)
    assert not staged.buffer.any()  # nothing moves before the step
    staged.copy_in()
    assert torch.equal(staged.buffer, torch.from_numpy(values).to(torch.bfloat16))
    staged.load(torch.from_numpy(-values))  # a tensor loads as an array does
    staged.copy_in()
    assert torch.equal(staged.buffer, torch.from_numpy(-values).to(torch.bfloat16))


def test_a_staged_input_refuses_values_of_another_shape_even_one_that_broadcasts() -> None:
    staged = StagedInput(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"expected shape \[4, 8\], got \[1, 8\]"):
        staged.load(np.ones((1, 8), dtype=np.float32))


def test_a_staged_output_read_is_a_copy_that_later_steps_leave_alone() -> None:
    staged = StagedOutput(torch.zeros(2, 3, dtype=torch.bfloat16), torch.float32)
    first = torch.tensor([[1.5, -2.0, 3.0], [0.25, 8.0, -1.0]], dtype=torch.bfloat16)
    staged.copy_out(first)
    read = staged.read()
    staged.copy_out(-first)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, first.float().numpy())
    np.testing.assert_array_equal(staged.read(), -first.float().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_step_takes_each_replays_input_and_returns_its_output() -> None:
    """Captured transfers must read the host buffers when replayed, not freeze what they held at capture."""
    device = torch.device("cuda")
    staged_in = StagedInput(torch.zeros(4, 8, dtype=torch.bfloat16, device=device))
    doubled = StagedOutput(staged_in.buffer, torch.float32)
    largest = torch.zeros(1, dtype=torch.long, device=device)
    largest_out = StagedOutput(largest, torch.long)

    def step() -> None:
        staged_in.copy_in()
        doubled.copy_out(staged_in.buffer * 2)
        largest.copy_(staged_in.buffer.flatten().argmax(0, keepdim=True))
        largest_out.copy_out(largest)

    pool = GraphPool()
    graphs = StepGraphs(step, device, pool=pool)
    rng = np.random.default_rng(1)
    for _ in range(4):  # the first call captures, the later ones replay
        values = rng.standard_normal((4, 8)).astype(np.float32)
        staged_in.load(values)
        graphs("step")
        rounded = torch.from_numpy(values).to(torch.bfloat16)
        np.testing.assert_array_equal(doubled.read(), (rounded * 2).float().numpy())
        assert int(largest_out.read()[0]) == int(rounded.flatten().argmax())
    assert len(graphs) == 1
    assert pool.captured == 1 and pool.capture_s > 0  # the pool's tally counts the one capture
