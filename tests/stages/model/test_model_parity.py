"""The model core against transformers' VoxtralRealtimeForConditionalGeneration (fp32, CPU, tiny random models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import SMALL_WINDOWS, speechlike_audio
from voxtral_run.stages.audio.constants import delay_tokens, pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.model.checkpoint import CONSOLIDATED_FILE, TOKEN_EMBEDDING, ModelDir
from voxtral_run.stages.model.decoder import load_text_decoder, streaming_prompt
from voxtral_run.stages.model.encoder import load_audio_encoder
from voxtral_run.stages.transcribe import MODEL_CHAIN, run_chain, transcribe_audio, transcript_of
from voxtral_run.tools.make_tiny_checkpoint import TINY, CheckpointSpec

# (spec, seed, delay_ms): widths, GQA ratios 1/2/4, windows smaller than the audio, delays 80/480/1200 ms.
CONFIGS = [
    pytest.param(TINY, 0, 480, id="gqa2-full-windows-480ms"),
    pytest.param(CheckpointSpec(enc_dim=48, enc_heads=4, enc_head_dim=12, dec_kv_heads=4), 2, 80, id="gqa1-80ms"),
    pytest.param(
        CheckpointSpec(dec_dim=96, dec_heads=8, dec_kv_heads=2, dec_head_dim=12, enc_window=16, dec_window=12),
        3,
        1200,
        id="gqa4-small-windows-1200ms",
    ),
    pytest.param(SMALL_WINDOWS, 1, 480, id="gqa2-small-windows-480ms"),
]
AUDIO_SECONDS = 3.0  # 150 encoder frames and ~80 positions: far beyond the small windows


def reference_generate(hf_model, audio: np.ndarray, left_pad_tokens: int, num_delay: int, prompt: list[int]):
    """transformers' greedy generate on mistral-common-padded audio: the new ids only."""
    features = torch.from_numpy(log_mel_frames(pad_audio(audio, left_pad_tokens, num_delay)).T[None].copy())
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids, input_features=features, num_delay_tokens=num_delay, do_sample=False)
    return out[0, len(prompt) :].tolist(), features


@pytest.mark.parametrize(("spec", "seed", "delay_ms"), CONFIGS)
def test_greedy_ids_equal_transformers_generate(checkpoint_factory, hf_oracle, spec, seed, delay_ms) -> None:
    model_dir = checkpoint_factory(spec, seed)
    tekken = ModelDir(model_dir).tekken
    audio = speechlike_audio(AUDIO_SECONDS, seed)
    num_delay = delay_tokens(delay_ms)
    prompt = streaming_prompt(tekken, num_delay)
    expected, features = reference_generate(
        hf_oracle(model_dir), audio, tekken.audio.streaming_n_left_pad_tokens, num_delay, prompt
    )
    assert len(set(expected)) >= 3, "reference output too uniform for the comparison to mean anything"
    # transformers' length rule: N - L new tokens for N padded positions and a prompt of L.
    assert len(expected) == features.shape[-1] // 8 - len(prompt)

    transcript = transcribe_audio(audio, model_dir=model_dir, delay_ms=delay_ms)
    assert transcript.token_ids == expected


@pytest.mark.parametrize(("spec", "seed", "delay_ms"), CONFIGS)
def test_teacher_forced_logits_match_transformers(checkpoint_factory, hf_oracle, spec, seed, delay_ms) -> None:
    model_dir = checkpoint_factory(spec, seed)
    model = ModelDir(model_dir)
    num_delay = delay_tokens(delay_ms)
    audio = speechlike_audio(AUDIO_SECONDS, seed)
    mel = log_mel_frames(pad_audio(audio, model.tekken.audio.streaming_n_left_pad_tokens, num_delay))
    positions = mel.shape[0] // 8
    prompt = streaming_prompt(model.tekken, num_delay)
    rng = np.random.default_rng(seed)
    # Random previous tokens (text and specials alike) after the forced prompt.
    ids = torch.tensor(prompt + rng.integers(0, model.params.vocab_size, positions - len(prompt)).tolist())

    with torch.inference_mode():
        expected = hf_oracle(model_dir)(
            input_ids=ids[None], input_features=torch.from_numpy(mel.T[None].copy()), num_delay_tokens=num_delay
        ).logits[0]
        encoder = load_audio_encoder(model, dtype=torch.float32, device="cpu")
        decoder = load_text_decoder(model, dtype=torch.float32, device="cpu")
        frames = encoder(torch.from_numpy(mel)[None], encoder.new_state())
        cache = decoder.new_cache(block=len(ids))  # every position in one forward, as the oracle runs them
        cache.prepare(len(ids))
        positions = torch.arange(len(ids))[None]
        hidden = decoder(decoder.adapt(frames), ids[None], positions, cache, decoder.ffn_scales(num_delay))
        logits = decoder.logits(hidden)[0]

    assert logits.shape == expected.shape
    relative = (logits - expected).abs().max(dim=-1).values / expected.abs().max(dim=-1).values
    assert float(relative.max()) < 1e-4
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_delay_conditioning_changes_the_output(tiny_model_dir) -> None:
    """The Ada RMSNorm delay conditioning is live: the same audio at another delay gives other logits."""
    model = ModelDir(tiny_model_dir)
    decoder = load_text_decoder(model, dtype=torch.float32, device="cpu")
    scales_480, scales_80 = decoder.ffn_scales(delay_tokens(480)), decoder.ffn_scales(delay_tokens(80))
    assert all(not torch.allclose(a, b) for a, b in zip(scales_480, scales_80, strict=True))


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its EOS embedding (also its LM-head row) doubled: it says EOS mid-stream."""
    out = tmp_path_factory.mktemp("eos-model")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, out)
    tensors = load_file(str(out / CONSOLIDATED_FILE))
    tensors[TOKEN_EMBEDDING][ModelDir(tiny_model_dir).tekken.eos_id] *= 2
    save_file(tensors, str(out / CONSOLIDATED_FILE))
    return out


def test_decoding_stops_at_eos_like_transformers(eos_model_dir, hf_oracle) -> None:
    tekken = ModelDir(eos_model_dir).tekken
    audio = speechlike_audio(AUDIO_SECONDS, 0)
    num_delay = delay_tokens(480)
    prompt = streaming_prompt(tekken, num_delay)
    expected, features = reference_generate(
        hf_oracle(eos_model_dir), audio, tekken.audio.streaming_n_left_pad_tokens, num_delay, prompt
    )
    assert expected[-1] == tekken.eos_id and len(expected) < features.shape[-1] // 8 - len(prompt)

    assert transcribe_audio(audio, model_dir=eos_model_dir).token_ids == expected
    # Streamed in 80 ms chunks, nothing more comes after EOS either.
    assert transcribe_audio(audio, model_dir=eos_model_dir, chunk_samples=1280).token_ids == expected


def test_decoding_past_eos_when_asked(eos_model_dir) -> None:
    chain = [
        build_stage(kind, model_dir=eos_model_dir, params={"stop_at_eos": False} if kind == "decoder" else None)
        for kind in MODEL_CHAIN
    ]
    audio = speechlike_audio(AUDIO_SECONDS, 0)
    ids = transcript_of(run_chain(chain, "s", [audio])).token_ids
    stopped = transcribe_audio(audio, model_dir=eos_model_dir).token_ids
    assert ids[: len(stopped)] == stopped  # the same ids up to and including EOS ...
    assert len(ids) > len(stopped)  # ... then EOS is fed back and decoding goes on
