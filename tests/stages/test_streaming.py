"""Streaming: any chunking, interleaved streams, bounded state, and the delay setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    N_FFT,
    SAMPLES_PER_TOKEN,
    delay_tokens,
    pad_audio,
)
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.base import StageError
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.decoder import streaming_prompt
from voxtral_run.stages.transcribe import build_chain, run_chain, transcribe_audio, transcript_of

AUDIO = speechlike_audio(2.5, seed=7)


def split(audio: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Cut audio into consecutive chunks of the given sizes (cycled), the last one shorter."""
    chunks, start, i = [], 0, 0
    while start < len(audio):
        chunks.append(audio[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return chunks


@pytest.fixture(scope="module", params=["tiny", "small_windows"])
def chain_and_offline(request, tiny_model_dir, small_window_model_dir):
    """One stage chain per configuration (reused across examples) and its offline ids for AUDIO."""
    model_dir = tiny_model_dir if request.param == "tiny" else small_window_model_dir
    offline = transcribe_audio(AUDIO, model_dir=model_dir).token_ids
    assert len(set(offline)) >= 3
    return build_chain(model_dir), offline


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=6), data=st.data())
def test_any_chunking_gives_the_offline_ids(chain_and_offline, sizes, data) -> None:
    chain, offline = chain_and_offline
    stream_id = f"s{data.draw(st.integers(0, 10**9))}"
    streamed = transcript_of(run_chain(chain, stream_id, split(AUDIO, sizes))).token_ids
    assert streamed == offline
    assert all(stage.streams() == [] for stage in chain), "finished streams must leave no state behind"


def test_long_stream_with_small_windows_equals_transformers(small_window_model_dir, hf_oracle) -> None:
    """Encoder window 16 frames, decoder window 12 positions, audio ~40x longer: 80 ms live chunks."""
    audio = speechlike_audio(8.0, seed=3)
    model = ModelDir(small_window_model_dir)
    num_delay = delay_tokens(480)
    prompt = streaming_prompt(model.tekken, num_delay)
    features = log_mel_frames(pad_audio(audio, model.tekken.audio.streaming_n_left_pad_tokens, num_delay))
    with torch.inference_mode():
        expected = hf_oracle(small_window_model_dir).generate(
            input_ids=torch.tensor([prompt]),
            input_features=torch.from_numpy(features.T[None].copy()),
            num_delay_tokens=num_delay,
            do_sample=False,
        )[0, len(prompt) :]
    streamed = transcribe_audio(audio, model_dir=small_window_model_dir, chunk_samples=SAMPLES_PER_TOKEN)
    assert len(set(expected.tolist())) >= 3
    assert streamed.token_ids == expected.tolist()


def test_two_interleaved_streams_equal_each_alone(tiny_model_dir) -> None:
    other = speechlike_audio(1.7, seed=11)
    alone_a = transcribe_audio(AUDIO, model_dir=tiny_model_dir).token_ids
    alone_b = transcribe_audio(other, model_dir=tiny_model_dir).token_ids
    assert alone_a != alone_b

    chain = build_chain(tiny_model_dir)
    outputs: dict[str, list] = {"a": [], "b": []}
    chunks = {"a": split(AUDIO, [1000, 3333]), "b": split(other, [2560])}
    for index in range(max(len(c) for c in chunks.values())):
        for stream_id in ("b", "a"):
            if index < len(chunks[stream_id]):
                items = [chunks[stream_id][index]]
                for stage in chain:
                    items = [out for item in items for out in stage.push(stream_id, item)]
                outputs[stream_id].extend(items)
    for stream_id in ("a", "b"):
        items: list = []
        for stage in chain:
            items = [out for item in items for out in stage.push(stream_id, item)] + stage.finish(stream_id)
        outputs[stream_id].extend(items)
    assert transcript_of(outputs["a"]).token_ids == alone_a
    assert transcript_of(outputs["b"]).token_ids == alone_b


@pytest.mark.slow
def test_state_stops_growing_once_windows_fill(small_window_model_dir) -> None:
    """Several minutes of 80 ms chunks: every stream's KV pages stop at its ring and nothing else grows."""
    chain = build_chain(small_window_model_dir)
    mel, encoder, decoder = chain[0], chain[1], chain[2]
    audio = speechlike_audio(180.0, seed=5)
    sizes = []
    for index, chunk in enumerate(split(audio, [SAMPLES_PER_TOKEN])):
        items = [chunk]
        for stage in chain:
            items = [out for item in items for out in stage.push("long", item)]
        if index % 250 == 249:
            place = decoder.state("long").place
            sizes.append(
                (
                    encoder.pool.pages_in_use,
                    decoder.pool.pages_in_use,
                    (len(place.groups), 0 if place.frames is None else len(place.frames)),
                    mel._streams["long"].tail.nbytes,
                )
            )
    assert decoder.state("long").place.next_position > 2000  # the stream really ran for minutes
    assert len(sizes) >= 8
    # Each ring's pages, all of them, and no more.
    assert all(s[0] == encoder.pool.pages_per_stream and s[1] == decoder.pool.pages_per_stream for s in sizes)
    # Nothing waits but a partial group of encoder frames.
    assert all(s[2][0] == 0 and s[2][1] < ENCODER_FRAMES_PER_TOKEN for s in sizes)
    assert max(s[3] for s in sizes) < N_FFT * 4  # the mel overlap tail: under one STFT window of float32


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_valid_delays_are_accepted(tiny_model_dir, delay_ms) -> None:
    stage = build_stage("decoder", model_dir=tiny_model_dir, delay_ms=delay_ms)
    assert len(stage.prompt) == 1 + 32 + delay_ms // 80


@pytest.mark.parametrize("delay_ms", [0, 50, 3000])
def test_invalid_delays_are_rejected_with_a_message(tiny_model_dir, delay_ms) -> None:
    with pytest.raises(StageError, match=f"delay_ms={delay_ms} is outside 80..2400 ms"):
        build_stage("mel", model_dir=tiny_model_dir, delay_ms=delay_ms)


def test_delay_rounds_up_like_mistral_common() -> None:
    from mistral_common.tokens.tokenizers.audio import AudioConfig, AudioSpectrogramConfig, TranscriptionFormat

    config = AudioConfig(
        sampling_rate=16000,
        frame_rate=12.5,
        encoding_config=AudioSpectrogramConfig(num_mel_bins=128, hop_length=160, window_size=400),
        transcription_delay_ms=480,
        streaming_look_ahead_ms=2.5,
        streaming_look_back_ms=52.5,
        streaming_n_left_pad_tokens=32,
        transcription_format=TranscriptionFormat.STREAMING,
    )
    for delay_ms in (80, 100, 480, 500, 1000, 1200, 2400):
        assert delay_tokens(delay_ms) == config.get_num_delay_tokens(delay_ms)
