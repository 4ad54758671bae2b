"""The resample stage: capture chunks at any rate and channel count in, 16 kHz mono float32 out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.base import Item, Stage, StageError

RESAMPLE_QUALITY = "HQ"  # the quality mistral-common resamples with


@dataclass
class _StreamState:
    in_rate: int
    resampler: soxr.ResampleStream | None  # None when the stream is already at SAMPLE_RATE


def _mono_samples(stream_id: str, item: Item) -> tuple[np.ndarray, int]:
    """The chunk's samples averaged over channels (float32 1-D) and its sample rate, checked."""
    if not isinstance(item, dict) or "samples" not in item or "sample_rate" not in item:
        raise StageError(f"resample: stream {stream_id}: expected a dict with samples and sample_rate")
    rate = item["sample_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise StageError(f"resample: stream {stream_id}: sample_rate {rate!r} is not a positive integer")
    samples = np.asarray(item["samples"], dtype=np.float32)
    if samples.ndim == 1:
        return samples, int(rate)
    if samples.ndim != 2 or samples.shape[1] == 0:
        shape = list(samples.shape)
        raise StageError(f"resample: stream {stream_id}: samples of shape {shape}, expected [n, channels]")
    return samples.mean(axis=1, dtype=np.float32), int(rate)


class ResampleStage(Stage):
    """Averages channels to mono and resamples each stream to SAMPLE_RATE with a streaming soxr resampler."""

    name = "resample"

    def __init__(self) -> None:
        self._streams: dict[str, _StreamState] = {}

    def push(self, stream_id: str, item: Item) -> list[Item]:
        """Resample one capture chunk: [mono float32 samples at SAMPLE_RATE], or [] while soxr fills up."""
        mono, rate = _mono_samples(stream_id, item)
        state = self._streams.get(stream_id)
        if state is None:
            resampler = None
            if rate != SAMPLE_RATE:
                resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, "float32", RESAMPLE_QUALITY)
            state = self._streams[stream_id] = _StreamState(rate, resampler)
        elif rate != state.in_rate:
            change = f"rate changed from {state.in_rate} to {rate} Hz mid-stream"
            raise StageError(f"resample: stream {stream_id}: {change}")
        if state.resampler is None:
            out = mono.copy()
        else:
            out = state.resampler.resample_chunk(np.ascontiguousarray(mono))
        return [out] if out.size else []

    def finish(self, stream_id: str) -> list[Item]:
        """Flush the stream's resampler tail and forget the stream."""
        state = self._streams.pop(stream_id, None)
        if state is None or state.resampler is None:
            return []
        out = state.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return [out] if out.size else []

    def streams(self) -> list[str]:
        """Ids of the streams with a resampler (or pass-through) open."""
        return list(self._streams)
