"""The compiled step path (inductor, here its CPU backend) computes what the eager path does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.encoder
from stages.audio import SAMPLES_PER_TOKEN
from stages.base import StageError
from stages.factory import build_stage
from stages.layers import EAGER, fused_attention_inputs
from stages.matvec import matvec_available
from stages.transcribe import MODEL_CHAIN, run_chain, transcript_of
from tests.conftest import speechlike_audio


def chain(model_dir, **settings):
    params = {"encoder": settings, "decoder": settings}
    return [build_stage(kind, model_dir=model_dir, params=params.get(kind)) for kind in MODEL_CHAIN]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_compiled_steps_give_the_eager_ids_and_frames(small_window_model_dir, cache) -> None:
    """80 ms chunks: every encoder step and every decoder step after the prompt runs compiled code (with
    Triton, as the fused product kernels), through several wraps of the small windows' static rings (or the
    growing caches)."""
    audio = speechlike_audio(6.0, seed=4)
    pieces = [audio[i : i + SAMPLES_PER_TOKEN] for i in range(0, len(audio), SAMPLES_PER_TOKEN)]
    eager = chain(small_window_model_dir, cache=cache)
    compiled = chain(small_window_model_dir, cache=cache, compile=True)
    assert compiled[1].encoder.step_functions is not eager[1].encoder.step_functions
    # With Triton (the interpreter here), the steps' products are the fused kernels.
    if matvec_available(torch.device("cpu")):
        assert compiled[1].encoder.step_functions.attention_inputs.func is fused_attention_inputs
        assert compiled[2].decoder.step_functions.attention_inputs.func is fused_attention_inputs
    # The warm-up that compiled the steps left no stream behind.
    assert compiled[1].streams() == [] and compiled[2].streams() == []
    eager_frames = np.concatenate(run_chain(eager[:2], "s", pieces))
    compiled_frames = np.concatenate(run_chain(compiled[:2], "s", pieces))
    np.testing.assert_allclose(compiled_frames, eager_frames, rtol=1e-4, atol=1e-5)
    eager_ids = transcript_of(run_chain(eager, "s", pieces)).token_ids
    assert len(set(eager_ids)) >= 3
    assert transcript_of(run_chain(compiled, "s", pieces)).token_ids == eager_ids


def test_a_failing_compiler_is_one_line_naming_the_stage_and_the_way_out(tiny_model_dir, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found\nmany more lines")

    # Both ways the encoder's step can be compiled: as the fused kernels around compiled code, or all compiled.
    for functions in ("fused_block_functions", "compiled_block_functions"):
        monkeypatch.setattr(stages.encoder, functions, lambda *blocks: EAGER._replace(attention_inputs=broken))
    with pytest.raises(StageError) as failure:
        build_stage("encoder", model_dir=tiny_model_dir, params={"compile": True})
    message = str(failure.value)
    assert "\n" not in message
    assert "stage 'encoder': torch.compile failed" in message and "no working C++ compiler" in message
    assert "compile: false" in message
