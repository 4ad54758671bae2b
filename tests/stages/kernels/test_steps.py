"""The compiled step path (inductor, here its CPU backend) computes what the eager path does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import speechlike_audio
from voxtral_run.stages import decoder as decoder_module
from voxtral_run.stages import encoder as encoder_module
from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN
from voxtral_run.stages.base import StageError
from voxtral_run.stages.decoder import load_text_decoder
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.kernels.matvec import matvec, matvec_available
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.layers import EAGER, fused_attention_inputs
from voxtral_run.stages.transcribe import MODEL_CHAIN, run_chain, transcript_of


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
        monkeypatch.setattr(encoder_module, functions, lambda *blocks: EAGER._replace(attention_inputs=broken))
    with pytest.raises(StageError) as failure:
        build_stage("encoder", model_dir=tiny_model_dir, params={"compile": True})
    message = str(failure.value)
    assert "\n" not in message
    assert "stage 'encoder': torch.compile failed" in message and "no working C++ compiler" in message
    assert "compile: false" in message


@pytest.mark.skipif(not matvec_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)")
def test_the_fused_adapter_and_lm_head_compute_what_torch_does(tiny_model_dir, monkeypatch) -> None:
    """One position's adapter (with its GELU) and greedy id (with the final norm) as `matvec` kernels, in the
    interpreter here, against torch's ops; a prompt's block of positions keeps torch's adapter."""
    decoder = load_text_decoder(ModelDir(tiny_model_dir), dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(2 * ENCODER_FRAMES_PER_TOKEN, decoder.params.encoder.dim, generator=generator)
    hiddens = [torch.randn(3, decoder.params.decoder.dim, generator=generator) for _ in range(12)]
    with torch.inference_mode():
        eager_audio = decoder.adapt(frames[:ENCODER_FRAMES_PER_TOKEN])
        eager_block = decoder.adapt(frames)
        eager_ids = [int(decoder.next_token(hidden)) for hidden in hiddens]
        calls = []
        monkeypatch.setattr(
            decoder_module, "matvec", lambda *args, **kwargs: calls.append(1) or matvec(*args, **kwargs)
        )
        decoder.fused_ends = DEFAULT_OVERLAP
        fused_audio = decoder.adapt(frames[:ENCODER_FRAMES_PER_TOKEN])
        assert len(calls) == 2
        fused_ids = [int(decoder.next_token(hidden)) for hidden in hiddens]
        assert len(calls) == 2 + len(hiddens)
        assert torch.equal(decoder.adapt(frames), eager_block) and len(calls) == 2 + len(hiddens)
    torch.testing.assert_close(fused_audio, eager_audio, rtol=1e-5, atol=1e-6)
    assert len(set(eager_ids)) >= 3
    assert fused_ids == eager_ids
