"""Log-mel front end of Voxtral Realtime (docs/MODEL.md §5): the exact offline features and a streaming stage.

Frame t of the padded stream is the periodic-Hann STFT of samples [HOP*t - 200, HOP*t + 200): it is centred
on sample HOP*t and needs CENTER_PAD = 200 samples beyond its centre (a 12.5 ms look-ahead), so it can be
emitted once HOP*t + 200 samples exist (see `frames_ready`). torch's centre reflect pad only ever mirrors
zeros, because the stream starts with the left pad and ends with the right pad, so the streaming stage
prepends and appends zeros instead and computes every frame once, from exactly the samples the offline STFT
sees.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from voxtral_run.stages.audio.constants import (
    GLOBAL_LOG_MEL_MAX,
    HOP_LENGTH,
    MEL_FRAMES_PER_TOKEN,
    N_FFT,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    WINDOW_SIZE,
    delay_tokens,
    stream_right_pad_samples,
)
from voxtral_run.stages.base import Item, Output, Stage, StageError, StreamStart, Work

NUM_FREQUENCY_BINS = N_FFT // 2 + 1  # 201 one-sided STFT bins
MEL_BLOCK_FRAMES = MEL_FRAMES_PER_TOKEN  # frames per filter product (see _log_mel)
CENTER_PAD = N_FFT // 2  # reflect pad of torch.stft(center=True) at each end; also each frame's look-ahead
# Audio in whole 80 ms tokens makes frames ready up to this offset in a token's 8 (the last frame's window reaches
# CENTER_PAD past its centre), so a live stream's pushes start there: the filter product's blocks start there too,
# and each such push is one block.
MEL_BLOCK_START = (SAMPLES_PER_TOKEN - CENTER_PAD) // HOP_LENGTH + 1
MEL_POWER_FLOOR = 1e-10  # clamp before log10
LOG_MEL_DYNAMIC_RANGE = 8.0  # log10 units kept below GLOBAL_LOG_MEL_MAX
LOG_MEL_OFFSET = 4.0  # features = (log10 mel + offset) / scale
LOG_MEL_SCALE = 4.0

# Slaney mel scale: linear below the break, logarithmic above it.
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL  # 15
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # ln(Hz ratio) per mel above the break


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    above = hz >= _SLANEY_BREAK_HZ
    safe_hz = np.where(above, hz, _SLANEY_BREAK_HZ)  # keeps log() away from zero on the linear side
    log_side = _SLANEY_BREAK_MEL + np.log(safe_hz / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return np.where(above, log_side, hz / _SLANEY_HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    above = mel >= _SLANEY_BREAK_MEL
    return np.where(
        above,
        _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL)),
        mel * _SLANEY_HZ_PER_MEL,
    )


@functools.cache
def mel_filter_bank() -> np.ndarray:
    """Slaney-scale, Slaney-area-normalised triangles over 0..SAMPLE_RATE/2: read-only [201, 128] float32."""
    nyquist = SAMPLE_RATE / 2
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(nyquist), NUM_MEL_BINS + 2))
    bin_hz = np.linspace(0.0, nyquist, NUM_FREQUENCY_BINS)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bin_hz[:, None] - lower) / (centre - lower)
    falling = (upper - bin_hz[:, None]) / (upper - centre)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    filters = (triangles * (2.0 / (upper - lower))).astype(np.float32)
    filters.flags.writeable = False
    return filters


@functools.cache
def _torch_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """The periodic Hann window and the transposed filter bank [128, 201], built once."""
    return torch.hann_window(WINDOW_SIZE), torch.from_numpy(mel_filter_bank().copy()).T


def frames_ready(num_padded_samples: int) -> int:
    """Mel frames computable from the first `num_padded_samples` of a padded stream (frame t needs
    HOP_LENGTH*t + CENTER_PAD samples)."""
    if num_padded_samples < CENTER_PAD:
        return 0
    return (num_padded_samples - CENTER_PAD) // HOP_LENGTH + 1


def _validated_samples(samples: object, what: str) -> np.ndarray:
    if not isinstance(samples, np.ndarray):
        raise StageError(f"{what} must be a numpy array of float samples, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise StageError(f"{what} must be 1-D mono samples, got shape {samples.shape}")
    if samples.dtype.kind != "f":
        raise StageError(f"{what} must have a float dtype (samples in [-1, 1]), got {samples.dtype}")
    if not np.isfinite(samples).all():
        raise StageError(f"{what} contains NaN or infinite samples")
    return samples.astype(np.float32, copy=False)


def _block_lead(first_frame: int) -> int:
    """The column of frame `first_frame` in its block of the filter product."""
    return (first_frame - MEL_BLOCK_START) % MEL_BLOCK_FRAMES


def _log_mel(spectrum: torch.Tensor, first_frame: int) -> np.ndarray:
    """Complex STFTs [B, 201, T] of frames first_frame.. of B streams to time-major features [B, T, 128],
    following the reference op by op."""
    _, filters_t = _torch_constants()
    power = spectrum.abs() ** 2
    batch, bins, num_frames = power.shape
    # The filter product runs on blocks of MEL_BLOCK_FRAMES frames at fixed places of the stream's frame index
    # (from MEL_BLOCK_START), each block a product of the same shape with a frame always in the same column: BLAS
    # rounds by shape and position (one column takes the matrix-vector path, wide products other kernels), so
    # any chunking of a stream, and any number of streams computed together, gives the offline frames' bits.
    lead = _block_lead(first_frame)
    blocks = -(-(lead + num_frames) // MEL_BLOCK_FRAMES)
    padded = power.new_zeros(batch, bins, blocks * MEL_BLOCK_FRAMES)
    padded[..., lead : lead + num_frames] = power
    padded = padded.reshape(batch, bins, blocks, MEL_BLOCK_FRAMES).transpose(1, 2).reshape(-1, bins, MEL_BLOCK_FRAMES)
    mel = torch.bmm(filters_t.expand(batch * blocks, -1, -1), padded)  # [B * blocks, 128, MEL_BLOCK_FRAMES]
    mel = mel.reshape(batch, blocks, -1, MEL_BLOCK_FRAMES).transpose(1, 2).reshape(batch, filters_t.shape[0], -1)
    mel = mel[..., lead : lead + num_frames]
    log_mel = torch.clamp(mel, min=MEL_POWER_FLOOR).log10()
    log_mel = torch.maximum(log_mel, torch.tensor(GLOBAL_LOG_MEL_MAX - LOG_MEL_DYNAMIC_RANGE))
    features = (log_mel + LOG_MEL_OFFSET) / LOG_MEL_SCALE
    return features.transpose(1, 2).contiguous().numpy()


def _stft(samples: torch.Tensor, center: bool) -> torch.Tensor:
    """The periodic-Hann STFT of samples [..., n] -> [..., 201, frames]."""
    window, _ = _torch_constants()
    return torch.stft(samples, N_FFT, HOP_LENGTH, window=window, center=center, pad_mode="reflect",
                      return_complex=True)  # fmt: skip


def log_mel_frames(padded_audio: np.ndarray) -> np.ndarray:
    """Exact offline log-mel of an already padded stream: float32 [len // HOP_LENGTH, 128], time-major."""
    audio = _validated_samples(padded_audio, "padded audio")
    if len(audio) <= CENTER_PAD:
        raise StageError(f"padded audio has {len(audio)} samples; the STFT reflect pad needs > {CENTER_PAD}")
    spectrum = _stft(torch.from_numpy(audio), center=True)
    return _log_mel(spectrum[None, :, :-1], 0)[0]  # the last STFT frame is dropped, as the reference does


@dataclass
class _MelStream:
    """One stream's overlap: `tail` holds samples of the zero-extended padded stream from `tail_start`
    (extended coordinates: padded index + CENTER_PAD)."""

    tail: np.ndarray
    num_delay_tokens: int
    tail_start: int = 0
    next_frame: int = 0
    num_samples: int = 0  # real samples pushed so far, for the right pad


class MelStage(Stage):
    """Streaming log-mel: 16 kHz float32 samples in, time-major [k, 128] frames out, equal to `log_mel_frames`
    of the whole padded stream for any chunking."""

    name = "mel"

    def __init__(self, left_pad_tokens: int, num_delay_tokens: int) -> None:
        # The reflect pad at the start mirrors samples 1..CENTER_PAD, which must be zeros of the left pad.
        if not isinstance(left_pad_tokens, int) or left_pad_tokens < 1:
            raise StageError(f"left_pad_tokens must be an integer >= 1, got {left_pad_tokens!r}")
        if not isinstance(num_delay_tokens, int) or num_delay_tokens < 0:
            raise StageError(f"num_delay_tokens must be an integer >= 0, got {num_delay_tokens!r}")
        self.left_pad_samples = left_pad_tokens * SAMPLES_PER_TOKEN
        self.num_delay_tokens = num_delay_tokens
        self._streams: dict[str, _MelStream] = {}
        self._batch: list[_Segment] | None = None  # within `step`: the segments whose features it computes

    def _new_stream(self, num_delay_tokens: int | None = None) -> _MelStream:
        delay = self.num_delay_tokens if num_delay_tokens is None else num_delay_tokens
        return _MelStream(tail=np.zeros(CENTER_PAD + self.left_pad_samples, dtype=np.float32), num_delay_tokens=delay)

    def start(self, stream_id: str, options: StreamStart) -> None:
        """Open a stream with its own delay (the right pad at its end covers it)."""
        delay = None if options.delay_ms is None else delay_tokens(options.delay_ms)
        self._streams[stream_id] = self._new_stream(delay)

    def push(self, stream_id: str, item: Item) -> list[Item]:
        """Append samples to a stream (starting it with the left pad); return the frames now computable."""
        samples = _validated_samples(item, f"mel input of stream {stream_id!r}")
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = self._new_stream()
        stream.tail = np.concatenate([stream.tail, samples])
        stream.num_samples += len(samples)
        return self._emit(stream, frames_ready(self.left_pad_samples + stream.num_samples))

    def finish(self, stream_id: str) -> list[Item]:
        """Append the right pad, return the remaining frames (the last STFT frame dropped) and forget the
        stream; a stream never pushed counts as empty audio."""
        stream = self._streams.pop(stream_id, None) or self._new_stream()
        right_pad = stream_right_pad_samples(stream.num_samples, stream.num_delay_tokens)
        # The zero right pad is longer than CENTER_PAD, so the end reflect pad is zeros too.
        stream.tail = np.concatenate([stream.tail, np.zeros(right_pad + CENTER_PAD, dtype=np.float32)])
        num_frames = (self.left_pad_samples + stream.num_samples + right_pad) // HOP_LENGTH
        return self._emit(stream, num_frames)

    def streams(self) -> list[str]:
        """Ids of the streams with samples pending."""
        return list(self._streams)

    def step(self, work: list[Work]) -> list[Output]:
        """`Stage.step`, with the STFTs and filter products of all the streams' new frames computed together, a
        batch for each shape (the same bits as one by one)."""
        self._batch = []
        try:
            outputs = super().step(work)
            groups = _segment_groups(self._batch)
            features = {
                segment: frames for group in groups for segment, frames in zip(group, _features(group), strict=True)
            }
        finally:
            self._batch = None
        self.batch_sizes = [len(group) for group in groups]
        return [(stream_id, features[item] if isinstance(item, _Segment) else item) for stream_id, item in outputs]

    def _emit(self, stream: _MelStream, stop_frame: int) -> list[Item]:
        """Take the samples of frames next_frame..stop_frame-1 (one STFT) and keep only those later frames need;
        their features, or, within `step`, the segment whose features the step computes with the others."""
        if stop_frame <= stream.next_frame:
            return []
        first = HOP_LENGTH * stream.next_frame - stream.tail_start
        last = HOP_LENGTH * (stop_frame - 1) + N_FFT - stream.tail_start
        segment = _Segment(stream.tail[first:last], stream.next_frame)
        consumed = HOP_LENGTH * stop_frame - stream.tail_start
        stream.tail = stream.tail[consumed:].copy()
        stream.tail_start += consumed
        stream.next_frame = stop_frame
        if self._batch is not None:
            self._batch.append(segment)
            return [segment]
        return _features([segment])


@dataclass(eq=False)
class _Segment:
    """A stream's samples for one STFT (center off) and the index of its first frame."""

    samples: np.ndarray
    first_frame: int


def _segment_groups(segments: list[_Segment]) -> list[list[_Segment]]:
    """Segments of the same length and the same alignment to the filter product's blocks, together."""
    groups: dict[tuple[int, int], list[_Segment]] = {}
    for segment in segments:
        groups.setdefault((len(segment.samples), _block_lead(segment.first_frame)), []).append(segment)
    return list(groups.values())


def _features(group: list[_Segment]) -> list[np.ndarray]:
    """The log-mel frames [T, 128] of segments of one length and block alignment, in one STFT and product."""
    samples = torch.from_numpy(np.stack([segment.samples for segment in group]))
    return list(_log_mel(_stft(samples, center=False), group[0].first_frame))
