"""Where speech starts and stops in a 16 kHz stream, by energy: the core of the server's turn detection.

The stream is cut into 20 ms frames from its first sample; a frame is voiced when its RMS level, in dBFS (RMS
relative to a full-scale 1.0, so a full-scale sine is -3 dBFS), reaches the level `threshold` maps to: linear
in dB from -70 dBFS at 0 to -10 dBFS at 1, so the default 0.5 is -40 dBFS. An utterance starts
`prefix_padding_ms` before its first voiced frame (never before the previous utterance's end) and ends
`silence_duration_ms` after its last voiced frame, once the frames up to there are all unvoiced; that silence is
part of it. Audio outside utterances is given out by no event.

An energy detector rather than a neural VAD: no model to download, no new dependency, and a rule a client can
predict from its own audio; it tells speech from silence and quiet noise, not from loud noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from voxtral_run.stages.audio.constants import SAMPLE_RATE

FRAME_MS = 20  # each frame is voiced or not as a whole
SAMPLES_PER_MS = SAMPLE_RATE // 1000
FRAME_SAMPLES = FRAME_MS * SAMPLES_PER_MS
QUIETEST_DBFS = -70.0  # the level of threshold 0: all but near-digital silence is voiced
LOUDEST_DBFS = -10.0  # the level of threshold 1: only audio near full scale is voiced
DEFAULT_THRESHOLD = 0.5  # OpenAI's server_vad defaults
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_SILENCE_DURATION_MS = 500
MAX_DURATION_MS = 60_000  # the most either duration may be: the prefix is held in memory, per session


def threshold_dbfs(threshold: float) -> float:
    """The level in dBFS a frame must reach to be voiced, for a threshold in 0..1."""
    return QUIETEST_DBFS + threshold * (LOUDEST_DBFS - QUIETEST_DBFS)


def frame_dbfs(frame: np.ndarray) -> float:
    """A frame's RMS level in dBFS (-inf for digital silence)."""
    mean_square = float(np.mean(np.square(frame, dtype=np.float64))) if len(frame) else 0.0
    return 10 * math.log10(mean_square) if mean_square > 0 else -math.inf


@dataclass(frozen=True)
class SpeechSettings:
    """How loud a voiced frame is (`threshold`, 0..1), the audio kept before speech, the silence that ends it."""

    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:  # NaN fails too
            raise ValueError(f"threshold {self.threshold!r} is outside 0..1")
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_DURATION_MS:
                raise ValueError(f"{name} {value!r} is outside 0..{MAX_DURATION_MS} ms")

    @property
    def level_dbfs(self) -> float:
        return threshold_dbfs(self.threshold)

    @property
    def prefix_samples(self) -> int:
        return self.prefix_padding_ms * SAMPLES_PER_MS

    @property
    def silence_samples(self) -> int:
        return self.silence_duration_ms * SAMPLES_PER_MS


@dataclass(frozen=True)
class SpeechStarted:
    """An utterance starts at this sample of the stream (its prefix padding included)."""

    sample: int


@dataclass(frozen=True)
class SpeechAudio:
    """The next samples of the open utterance."""

    samples: np.ndarray


@dataclass(frozen=True)
class SpeechStopped:
    """The open utterance ends before this sample of the stream."""

    sample: int


SpeechEvent = SpeechStarted | SpeechAudio | SpeechStopped


class SpeechDetector:
    """Push 16 kHz float32 samples, get the utterances in them: SpeechStarted, its SpeechAudio, SpeechStopped.

    Samples are numbered from the first pushed, and every bound an event gives is a whole ms. `settings` may
    be replaced at any time; it applies from the next frame."""

    def __init__(self, settings: SpeechSettings | None = None) -> None:
        self.settings = settings or SpeechSettings()
        self.received = 0  # the samples pushed so far
        self._buffer = np.zeros(0, np.float32)  # the samples [_buffer_start, received) still needed
        self._buffer_start = 0
        self._frame_start = 0  # the next frame to classify
        self._floor = 0  # no utterance takes audio before this: the previous one's end, or a clear
        self._given = 0  # while speaking: the utterance's audio given out up to here
        self._end: int | None = None  # while speaking: where it ends if no voiced frame comes before

    @property
    def speaking(self) -> bool:
        """Whether an utterance is open."""
        return self._end is not None

    def push(self, samples: np.ndarray) -> list[SpeechEvent]:
        """The events that the next samples complete, in order; an open utterance's audio as far as it is known."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples, got shape {list(samples.shape)}")
        self._buffer = np.concatenate([self._buffer, samples])
        self.received += len(samples)
        events: list[SpeechEvent] = []
        while self._frame_start + FRAME_SAMPLES <= self.received:
            self._classify(self._frame_start, events)
            self._frame_start += FRAME_SAMPLES
        if self._end is not None:
            self._give(min(_whole_ms(self.received), self._end), events)
        self._forget()
        return events

    def cut(self) -> list[SpeechEvent]:
        """End the open utterance now, at the last whole ms received (or its end, if sooner): its last audio and
        SpeechStopped, or [] when none is open."""
        if self._end is None:
            return []
        events: list[SpeechEvent] = []
        self._stop(min(_whole_ms(self.received), self._end), events)
        self._forget()
        return events

    def clear(self) -> None:
        """Drop the open utterance, if any, and the audio held for a prefix: the next utterance starts later."""
        self._end = None
        self._floor = _whole_ms(self.received)
        self._forget()

    def _classify(self, start: int, events: list[SpeechEvent]) -> None:
        end = start + FRAME_SAMPLES
        frame = self._buffer[start - self._buffer_start : end - self._buffer_start]
        if frame_dbfs(frame) >= self.settings.level_dbfs:
            if self._end is None:
                self._given = max(start - self.settings.prefix_samples, self._floor, self._buffer_start)
                events.append(SpeechStarted(self._given))
            self._end = end + self.settings.silence_samples
        elif self._end is not None and end >= self._end:  # this frame holds the silence's last sample
            self._stop(self._end, events)

    def _give(self, until: int, events: list[SpeechEvent]) -> None:
        if until > self._given:
            events.append(SpeechAudio(self._buffer[self._given - self._buffer_start : until - self._buffer_start]))
            self._given = until

    def _stop(self, end: int, events: list[SpeechEvent]) -> None:
        self._give(end, events)
        events.append(SpeechStopped(end))
        self._end = None
        self._floor = end

    def _forget(self) -> None:
        """Drop the samples no frame, utterance or prefix needs any more."""
        if self._end is not None:
            keep = self._given
        else:
            keep = max(self._frame_start - self.settings.prefix_samples, self._floor)
        keep = min(keep, self._frame_start)
        if keep > self._buffer_start:
            self._buffer = self._buffer[keep - self._buffer_start :].copy()
            self._buffer_start = keep


def _whole_ms(sample: int) -> int:
    """A sample number rounded down to a whole ms."""
    return sample - sample % SAMPLES_PER_MS
