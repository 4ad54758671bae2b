"""The stages' fused steps (the GPU path's kernels, in Triton's CPU interpreter here) compute what the model's
eager forward computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.kernels import fused
from voxtral_run.stages.kernels.fused import FusedBlocks, fused_adapt, fused_next_token
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.decoder import load_text_decoder
from voxtral_run.stages.transcribe import MODEL_CHAIN, run_chain, transcript_of


def chain(model_dir, **settings):
    params = {"encoder": settings, "decoder": settings}
    return [build_stage(kind, model_dir=model_dir, params=params.get(kind)) for kind in MODEL_CHAIN]


@pytest.mark.slow
def test_fused_steps_give_the_eager_ids_and_frames(small_window_model_dir) -> None:
    """80 ms chunks: every encoder step and every decoder step after the prompt runs the fused kernels, through
    wraps of the small windows' rings."""
    # 31 tokens after 32 of left padding: the encoder's ring (64 slots) wraps three times, the decoder's once.
    audio = speechlike_audio(2.5, seed=4)
    pieces = [audio[i : i + SAMPLES_PER_TOKEN] for i in range(0, len(audio), SAMPLES_PER_TOKEN)]
    eager = chain(small_window_model_dir)
    fast = chain(small_window_model_dir, fused_kernels=True)
    assert isinstance(fast[1].blocks, FusedBlocks) and isinstance(fast[2].blocks, FusedBlocks)
    # The warm-up that compiled the steps left no stream behind.
    assert fast[1].streams() == [] and fast[2].streams() == []
    # Each chain's decoder takes its own encoder's frames, as in the pipeline.
    eager_frames, fast_frames = (run_chain(stages[:2], "s", pieces) for stages in (eager, fast))
    np.testing.assert_allclose(np.concatenate(fast_frames), np.concatenate(eager_frames), rtol=1e-4, atol=1e-5)
    eager_ids = transcript_of(run_chain(eager[2:], "s", eager_frames)).token_ids
    assert len(set(eager_ids)) >= 3
    assert transcript_of(run_chain(fast[2:], "s", fast_frames)).token_ids == eager_ids


@pytest.mark.parametrize("fp8_lm_head", [False, True], ids=["tied", "fp8_lm_head"])
def test_the_fused_adapter_and_lm_head_compute_what_the_model_does(tiny_model_dir, monkeypatch, fp8_lm_head) -> None:
    """One position's adapter (with its GELU) and greedy id (with the final norm) as `matvec` kernels against
    the model's torch operations; the head the tied embeddings or their 8-bit copy."""
    decoder = load_text_decoder(ModelDir(tiny_model_dir), dtype=torch.float32, device="cpu", fp8_lm_head=fp8_lm_head)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(1, ENCODER_FRAMES_PER_TOKEN, decoder.params.encoder.dim, generator=generator)
    hiddens = [torch.randn(1, 3, decoder.params.decoder.dim, generator=generator) for _ in range(12)]
    calls = []
    matvec = fused.matvec
    monkeypatch.setattr(fused, "matvec", lambda *args, **kwargs: calls.append(1) or matvec(*args, **kwargs))
    with torch.inference_mode():
        fused_audio = fused_adapt(decoder, frames)
        assert len(calls) == 2
        fused_ids = [int(fused_next_token(decoder, hidden)) for hidden in hiddens]
        assert len(calls) == 2 + len(hiddens)
        eager_audio = decoder.adapt(frames)
        eager_ids = [int(decoder.next_token(hidden)) for hidden in hiddens]
    torch.testing.assert_close(fused_audio, eager_audio, rtol=1e-5, atol=1e-6)
    assert len(set(eager_ids)) >= 3
    assert fused_ids == eager_ids
