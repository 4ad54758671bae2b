"""Log-mel front end: offline features equal transformers'; streaming frames equal offline for any chunking.

Look-ahead: frame t is centred on padded sample HOP_LENGTH*t and its 400-sample window reaches 200 samples
past the centre, so it becomes computable once HOP_LENGTH*t + 200 padded samples exist.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank
from transformers.models.voxtral_realtime.feature_extraction_voxtral_realtime import (
    VoxtralRealtimeFeatureExtractor,
)

from voxtral_run.stages.audio.constants import (
    HOP_LENGTH,
    MEL_FRAMES_PER_TOKEN,
    N_FFT,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    WINDOW_SIZE,
    pad_audio,
    pad_stream,
)
from voxtral_run.stages.audio.mel import MelStage, frames_ready, log_mel_frames, mel_filter_bank
from voxtral_run.stages.base import END, StageError, StreamStart

TOLERANCE = 1e-5
LEFT_PAD_TOKENS = 32  # the real model's values
DELAY_TOKENS = 6


def pcm16_noise(num_samples: int, seed: int) -> np.ndarray:
    """Random 16-bit PCM as float32 in [-1, 1)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-32768, 32768, num_samples).astype(np.float32) / 32768).astype(np.float32)


def pcm16_sine(num_samples: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(num_samples) / SAMPLE_RATE
    return (np.round(0.5 * np.sin(2 * np.pi * hz * t) * 32767) / 32768).astype(np.float32)


def stream_through(stage: MelStage, stream_id: str, audio: np.ndarray, chunk_sizes: list[int]) -> np.ndarray:
    """Push `audio` in chunks of the given sizes (cycled), finish, and concatenate every emitted frame."""
    emitted = []
    position = 0
    step = 0
    while position < len(audio):
        size = chunk_sizes[step % len(chunk_sizes)]
        emitted += stage.push(stream_id, audio[position : position + size])
        position += size
        step += 1
    emitted += stage.finish(stream_id)
    for frames in emitted:
        assert frames.dtype == np.float32 and frames.ndim == 2 and frames.shape[1] == NUM_MEL_BINS
        assert len(frames) > 0
    return np.concatenate(emitted)


def assert_frames_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.mark.parametrize("num_samples", [16000, 16037, 3 * HOP_LENGTH + 1, 0])
@pytest.mark.parametrize("signal", ["noise", "sine"])
def test_log_mel_matches_transformers_feature_extractor(num_samples: int, signal: str) -> None:
    audio = pcm16_noise(num_samples, seed=num_samples) if signal == "noise" else pcm16_sine(num_samples)
    padded = pad_audio(audio, LEFT_PAD_TOKENS, DELAY_TOKENS)
    extractor = VoxtralRealtimeFeatureExtractor()
    reference = extractor(padded, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
    ours = log_mel_frames(padded)
    assert ours.dtype == np.float32
    assert_frames_equal(ours, reference.T)


def test_log_mel_matches_transformers_on_unpadded_odd_length() -> None:
    audio = pcm16_noise(10 * HOP_LENGTH + 77, seed=3)
    reference = VoxtralRealtimeFeatureExtractor()(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")
    ours = log_mel_frames(audio)
    assert len(ours) == len(audio) // HOP_LENGTH
    assert_frames_equal(ours, reference["input_features"][0].T)


def test_filter_bank_matches_transformers_slaney() -> None:
    reference = hf_mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=NUM_MEL_BINS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    ours = mel_filter_bank()
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference.astype(np.float32))
    assert mel_filter_bank() is ours and not ours.flags.writeable


@settings(max_examples=40, deadline=None)
@given(
    num_samples=st.integers(0, 6 * SAMPLES_PER_TOKEN),
    chunk_sizes=st.lists(st.integers(1, 3 * SAMPLES_PER_TOKEN), min_size=1, max_size=8),
    left_pad_tokens=st.integers(1, 3),
    delay_tokens=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_streaming_equals_offline_for_any_chunking(
    num_samples: int, chunk_sizes: list[int], left_pad_tokens: int, delay_tokens: int, seed: int
) -> None:
    audio = (np.random.default_rng(seed).standard_normal(num_samples) * 0.3).astype(np.float32)
    streamed = stream_through(MelStage(left_pad_tokens, delay_tokens), "s", audio, chunk_sizes)
    assert_frames_equal(streamed, log_mel_frames(pad_stream(audio, left_pad_tokens, delay_tokens)))


def test_one_sample_chunks_emit_each_frame_once_its_look_ahead_arrives() -> None:
    audio = pcm16_noise(3 * SAMPLES_PER_TOKEN + 5, seed=7)
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    left_pad = LEFT_PAD_TOKENS * SAMPLES_PER_TOKEN
    emitted = []
    for count in range(1, len(audio) + 1):
        emitted += stage.push("s", audio[count - 1 : count])
        available = left_pad + count
        ready = sum(1 for t in range(available // HOP_LENGTH + 1) if HOP_LENGTH * t + WINDOW_SIZE // 2 <= available)
        assert sum(len(frames) for frames in emitted) == ready
    emitted += stage.finish("s")
    expected = log_mel_frames(pad_stream(audio, LEFT_PAD_TOKENS, DELAY_TOKENS))
    assert_frames_equal(np.concatenate(emitted), expected)


def test_one_huge_chunk_equals_offline() -> None:
    audio = pcm16_sine(3 * 60 * SAMPLE_RATE + 123, hz=97.0)
    streamed = stream_through(MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS), "s", audio, [len(audio)])
    assert_frames_equal(streamed, log_mel_frames(pad_stream(audio, LEFT_PAD_TOKENS, DELAY_TOKENS)))


def test_single_frame_push_is_bit_identical_to_offline() -> None:
    audio = pcm16_noise(2 * SAMPLES_PER_TOKEN, seed=2)
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    (before,) = stage.push("s", audio[:SAMPLES_PER_TOKEN])
    (single,) = stage.push("s", audio[SAMPLES_PER_TOKEN : SAMPLES_PER_TOKEN + HOP_LENGTH])
    assert len(single) == 1
    offline = log_mel_frames(pad_stream(audio, LEFT_PAD_TOKENS, DELAY_TOKENS))
    np.testing.assert_array_equal(single[0], offline[len(before)])


def test_frames_ready_counts_the_look_ahead() -> None:
    look_ahead = WINDOW_SIZE // 2
    assert frames_ready(look_ahead - 1) == 0
    for t in (0, 1, 7, 255):
        assert frames_ready(HOP_LENGTH * t + look_ahead) == t + 1
        assert frames_ready(HOP_LENGTH * t + look_ahead - 1) == t


@pytest.mark.parametrize("num_samples", [0, 1, SAMPLES_PER_TOKEN - 1, SAMPLES_PER_TOKEN, 12345])
def test_total_frame_count_is_whole_tokens(num_samples: int) -> None:
    audio = pcm16_noise(num_samples, seed=1)
    padded_length = len(pad_stream(audio, LEFT_PAD_TOKENS, DELAY_TOKENS))
    streamed = stream_through(MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS), "s", audio, [SAMPLES_PER_TOKEN])
    assert len(streamed) == padded_length // HOP_LENGTH
    assert len(streamed) % MEL_FRAMES_PER_TOKEN == 0


def test_finish_without_push_is_empty_audio() -> None:
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    (frames,) = stage.finish("never-pushed")
    empty = np.zeros(0, dtype=np.float32)
    assert_frames_equal(frames, log_mel_frames(pad_stream(empty, LEFT_PAD_TOKENS, DELAY_TOKENS)))
    assert stage.streams() == []


def test_interleaved_streams_equal_each_alone() -> None:
    first, second = pcm16_noise(9000, seed=11), pcm16_sine(7001, hz=300.0)
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    outputs: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    steps = -(-len(first) // 700)
    for step in range(steps):
        outputs["a"] += stage.push("a", first[step * 700 : (step + 1) * 700])
        outputs["b"] += stage.push("b", second[step * 333 : (step + 1) * 333])
    assert sorted(stage.streams()) == ["a", "b"]
    outputs["b"] += stage.push("b", second[steps * 333 :])
    outputs["a"] += stage.finish("a")
    assert stage.streams() == ["b"]
    outputs["b"] += stage.finish("b")
    alone_a = stream_through(MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS), "x", first, [700])
    alone_b = stream_through(MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS), "x", second, [333] * steps + [len(second)])
    np.testing.assert_array_equal(np.concatenate(outputs["a"]), alone_a)
    np.testing.assert_array_equal(np.concatenate(outputs["b"]), alone_b)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5 * SAMPLES_PER_TOKEN), min_size=1, max_size=6),
    chunks=st.lists(st.sampled_from([SAMPLES_PER_TOKEN, 160, 700, 2 * SAMPLES_PER_TOKEN + 37]), min_size=1, max_size=3),
    calls=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_steps_over_many_streams_give_each_its_frames_bit_for_bit(lengths, chunks, calls, seed) -> None:
    """Streams of different lengths, delays and chunk sizes, their chunks and ends interleaved and taken a few
    calls' worth at a time by `step`, which computes the STFTs and filter products of all of a call's streams
    together (streams at different frames in one batch when their segments share a length): each stream's frames
    have exactly the bits of the stream pushed alone, in order, then END."""
    rng = np.random.default_rng(seed)
    audios = {f"s{i}": (rng.standard_normal(n) * 0.3).astype(np.float32) for i, n in enumerate(lengths)}
    delays = {name: [1, 6, 12][i % 3] for i, name in enumerate(audios)}
    sizes = {name: chunks[i % len(chunks)] for i, name in enumerate(audios)}
    pieces = {
        name: [audio[at : at + sizes[name]] for at in range(0, len(audio), sizes[name])]
        for name, audio in audios.items()
    }
    work = [(name, StreamStart(delay_ms=delays[name] * 80)) for name in audios]
    for turn in range(max(map(len, pieces.values()), default=0)):
        work += [(name, parts[turn]) for name, parts in pieces.items() if turn < len(parts)]
    work += [(name, END) for name in audios]
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    got: dict[str, list] = {name: [] for name in audios}
    for part in np.array_split(np.arange(len(work)), calls):
        for name, item in stage.step([work[i] for i in part]):
            got[name].append(item)
    for name, parts in pieces.items():
        assert got[name][-1] is END
        alone = MelStage(LEFT_PAD_TOKENS, delays[name])
        expected = [frames for piece in parts for frames in alone.push("x", piece)] + alone.finish("x")
        np.testing.assert_array_equal(np.concatenate(got[name][:-1]), np.concatenate(expected))
    assert stage.streams() == []


def test_a_tick_of_many_streams_is_one_batch() -> None:
    """Streams past their first push each bring 80 ms, so their frames share a shape: one batch for all of them,
    and a stream whose chunk is another size a batch of its own."""
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    names = [f"s{i}" for i in range(5)]
    stage.step([(name, pcm16_noise(SAMPLES_PER_TOKEN, seed=i)) for i, name in enumerate(names)])
    outputs = stage.step(
        [(name, pcm16_noise(SAMPLES_PER_TOKEN, seed=9)) for name in names] + [("s0", pcm16_noise(333, 1))]
    )
    assert sorted(stage.batch_sizes) == [1, 5]
    assert [name for name, _ in outputs] == [*names, "s0"]
    assert all(frames.shape == (MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS) for _, frames in outputs[:5])


def test_state_holds_only_the_overlap_tail() -> None:
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    audio = pcm16_noise(20 * SAMPLES_PER_TOKEN, seed=5)
    for start in range(0, len(audio), 999):
        stage.push("s", audio[start : start + 999])
        assert len(stage._streams["s"].tail) < WINDOW_SIZE  # private: the only way to see the buffer size


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ([0.0, 0.1], "numpy array"),
        (np.zeros((10, 2), dtype=np.float32), "1-D"),
        (np.zeros(10, dtype=np.int16), "float dtype"),
        (np.array([0.0, np.nan], dtype=np.float32), "NaN"),
    ],
)
def test_bad_input_is_rejected(item: object, problem: str) -> None:
    stage = MelStage(LEFT_PAD_TOKENS, DELAY_TOKENS)
    with pytest.raises(StageError, match=problem):
        stage.push("s", item)
    with pytest.raises(StageError, match=problem):
        log_mel_frames(item)


def test_short_padded_audio_and_bad_settings_are_rejected() -> None:
    with pytest.raises(StageError, match="reflect pad"):
        log_mel_frames(np.zeros(N_FFT // 2, dtype=np.float32))
    with pytest.raises(StageError, match="left_pad_tokens"):
        MelStage(0, DELAY_TOKENS)
    with pytest.raises(StageError, match="num_delay_tokens"):
        MelStage(LEFT_PAD_TOKENS, -1)
