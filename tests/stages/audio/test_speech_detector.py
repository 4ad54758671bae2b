"""The energy speech detector on synthetic audio: utterance bounds with their prefix padding and closing silence,
the audio each utterance gives out, any chunking, the threshold's mapping to dBFS, commits and clears."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.audio.speech_detector import (
    FRAME_SAMPLES,
    MAX_DURATION_MS,
    SAMPLES_PER_MS,
    SpeechAudio,
    SpeechDetector,
    SpeechSettings,
    SpeechStarted,
    SpeechStopped,
    frame_dbfs,
    threshold_dbfs,
)


def burst(ms: int, dbfs: float, seed: int = 0) -> np.ndarray:
    """Noise of random signs whose every frame's RMS level is exactly `dbfs`."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=ms * SAMPLES_PER_MS)
    return (10 ** (dbfs / 20) * signs).astype(np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * SAMPLES_PER_MS, np.float32)


def utterances(
    audio: np.ndarray, settings: SpeechSettings | None = None, chunks: list[int] | None = None
) -> list[tuple[int, int, np.ndarray]]:
    """Each utterance as (start ms, end ms, its audio), pushing `audio` in pieces of the `chunks` sizes in turn."""
    detector = SpeechDetector(settings)
    events, position, sizes = [], 0, itertools.cycle(chunks or [len(audio)])
    while position < len(audio):
        size = next(sizes)
        events += detector.push(audio[position : position + size])
        position += size
    return bounds(events)


def bounds(events: list) -> list[tuple[int, int, np.ndarray]]:
    """Utterances from a sequence of events, checking their order: started, audio, stopped."""
    found, start, pieces = [], None, []
    for event in events:
        if isinstance(event, SpeechStarted):
            assert start is None
            start, pieces = event.sample, []
        elif isinstance(event, SpeechAudio):
            assert start is not None
            pieces.append(event.samples)
        else:
            assert isinstance(event, SpeechStopped) and start is not None
            for sample in (start, event.sample):
                assert sample % SAMPLES_PER_MS == 0  # every bound is a whole ms
            found.append((start // SAMPLES_PER_MS, event.sample // SAMPLES_PER_MS, np.concatenate(pieces)))
            start = None
    assert start is None, "an utterance is still open"
    return found


# Silence, a 400 ms burst at 500 ms, 1000 ms of silence, a 300 ms burst at 1900 ms, silence.
TWO_BURSTS = np.concatenate([silence(500), burst(400, -20), silence(1000), burst(300, -25, 1), silence(1000)])


def test_two_bursts_are_two_utterances_with_their_prefix_and_closing_silence():
    found = utterances(TWO_BURSTS)
    # Each starts 300 ms before its first voiced frame and ends 500 ms after its last.
    assert [(start, end) for start, end, _ in found] == [(200, 1400), (1600, 2700)]
    for start, end, audio in found:
        np.testing.assert_array_equal(audio, TWO_BURSTS[start * SAMPLES_PER_MS : end * SAMPLES_PER_MS])


@pytest.mark.parametrize("chunks", [[1], [7, 1000, 3], [FRAME_SAMPLES], [480, 1], [24_000]])
def test_any_chunking_gives_the_same_utterances(chunks):
    whole = utterances(TWO_BURSTS)
    chunked = utterances(TWO_BURSTS, chunks=chunks)
    assert [(start, end) for start, end, _ in chunked] == [(start, end) for start, end, _ in whole]
    for (_, _, audio), (_, _, expected) in zip(chunked, whole, strict=True):
        np.testing.assert_array_equal(audio, expected)


def test_settings_move_the_bounds():
    settings = SpeechSettings(prefix_padding_ms=100, silence_duration_ms=200)
    assert [(start, end) for start, end, _ in utterances(TWO_BURSTS, settings)] == [(400, 1100), (1800, 2400)]
    settings = SpeechSettings(prefix_padding_ms=0, silence_duration_ms=0)
    assert [(start, end) for start, end, _ in utterances(TWO_BURSTS, settings)] == [(500, 900), (1900, 2200)]


def test_a_pause_shorter_than_the_silence_duration_keeps_one_utterance():
    shorter = np.concatenate([silence(500), burst(400, -20), silence(480), burst(200, -20), silence(1000)])
    assert [(start, end) for start, end, _ in utterances(shorter)] == [(200, 2080)]
    # A pause of exactly silence_duration_ms ends the first; the next starts where it ended (no overlap).
    exact = np.concatenate([silence(500), burst(400, -20), silence(500), burst(200, -20), silence(1000)])
    assert [(start, end) for start, end, _ in utterances(exact)] == [(200, 1400), (1400, 2100)]


def test_speech_at_the_very_start_has_what_prefix_there_is():
    audio = np.concatenate([silence(100), burst(300, -20), silence(600)])
    assert [(start, end) for start, end, _ in utterances(audio)] == [(0, 900)]


def test_the_threshold_maps_linearly_to_dbfs():
    assert (threshold_dbfs(0), threshold_dbfs(0.5), threshold_dbfs(1)) == (-70, -40, -10)
    t = np.arange(FRAME_SAMPLES) / SAMPLE_RATE
    assert frame_dbfs(np.sin(2 * np.pi * 1000 * t)) == pytest.approx(-3.01, abs=0.01)  # a full-scale sine
    assert frame_dbfs(silence(20)) == -math.inf
    quiet = np.concatenate([silence(500), burst(400, -41), silence(600)])
    louder = np.concatenate([silence(500), burst(400, -39), silence(600)])
    assert utterances(quiet) == [] and len(utterances(louder)) == 1  # threshold 0.5 is -40 dBFS
    assert utterances(louder, SpeechSettings(threshold=0.6)) == []  # -34 dBFS
    assert len(utterances(quiet, SpeechSettings(threshold=0.4))) == 1  # -46 dBFS


def test_new_settings_apply_from_the_next_frame():
    detector = SpeechDetector()
    first = bounds(detector.push(TWO_BURSTS[: 1500 * SAMPLES_PER_MS]))
    detector.settings = SpeechSettings(threshold=0.8)  # -22 dBFS: the -25 dBFS burst is not speech
    assert [(start, end) for start, end, _ in first] == [(200, 1400)]
    assert detector.push(TWO_BURSTS[1500 * SAMPLES_PER_MS :]) == []


def test_a_cut_ends_the_open_utterance_at_the_last_whole_ms_and_a_clear_drops_it():
    detector = SpeechDetector()
    head = np.concatenate([silence(500), burst(400, -20)])
    events = detector.push(head[:-5])  # 899.6875 ms: the utterance has its audio up to 899 ms
    assert detector.speaking
    events += detector.cut()
    ((start, end, audio),) = bounds(events)
    assert (start, end) == (200, 899) and not detector.speaking
    np.testing.assert_array_equal(audio, head[start * SAMPLES_PER_MS : end * SAMPLES_PER_MS])
    assert detector.cut() == []
    # The burst goes on: a new utterance, starting where the cut one ended.
    events = detector.push(np.concatenate([head[-5:], burst(200, -20), silence(100)]))
    assert [type(event) for event in events][:1] == [SpeechStarted] and events[0].sample == end * SAMPLES_PER_MS
    detector.clear()
    assert not detector.speaking
    # The clear dropped the prefix too: the next utterance starts no earlier than it.
    events = detector.push(np.concatenate([silence(100), burst(200, -20), silence(600)]))
    ((start, _, _),) = bounds(events)
    assert start == 1200


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"threshold": 1.5}, "threshold 1.5 is outside 0..1"),
        ({"threshold": -0.1}, "threshold -0.1 is outside 0..1"),
        ({"threshold": math.nan}, "threshold nan is outside 0..1"),
        ({"prefix_padding_ms": -1}, "prefix_padding_ms -1 is outside"),
        ({"silence_duration_ms": -5}, "silence_duration_ms -5 is outside"),
        ({"silence_duration_ms": MAX_DURATION_MS + 1}, f"silence_duration_ms {MAX_DURATION_MS + 1} is outside"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        SpeechSettings(**settings)
