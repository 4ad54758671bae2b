"""Audio constants of Voxtral Realtime, each named once and derived from the others, and the padding rules
(docs/MODEL.md §4)."""

from __future__ import annotations

import math

import numpy as np

from voxtral_run.stages.base import StageError

SAMPLE_RATE = 16_000  # Hz, mono
FRAME_RATE = 12.5  # decoder positions (tokens) per second
SAMPLES_PER_TOKEN = int(SAMPLE_RATE / FRAME_RATE)  # 1280 samples = 80 ms
MS_PER_TOKEN = 1000 / FRAME_RATE  # 80.0
SECONDS_PER_TOKEN = 1 / FRAME_RATE  # 0.08
HOP_LENGTH = 160  # samples between mel frames (10 ms)
WINDOW_SIZE = 400  # STFT window, also n_fft
N_FFT = WINDOW_SIZE
NUM_MEL_BINS = 128
MEL_FRAMES_PER_TOKEN = SAMPLES_PER_TOKEN // HOP_LENGTH  # 8
CONV_STRIDE = 2  # the second conv of the stem halves the frame rate
ENCODER_FRAMES_PER_TOKEN = MEL_FRAMES_PER_TOKEN // CONV_STRIDE  # 4, the adapter's downsample factor
GLOBAL_LOG_MEL_MAX = 1.5  # fixed log-mel ceiling; only the floor (max - 8) is applied
OFFLINE_STREAMING_BUFFER_TOKENS = 10  # extra right-pad tokens that let the last words finish
MIN_DELAY_MS = 80
MAX_DELAY_MS = 2400
# Source audio the capture accepts: telephone rate up to studio rates, and up to 64 channels. Outside these a
# stream is a mistake (a rate of 1 Hz would be upsampled 16,000 times) rather than audio.
MIN_SOURCE_RATE = 8_000
MAX_SOURCE_RATE = 384_000
MAX_SOURCE_CHANNELS = 64


def check_source_format(sample_rate: object, channels: object, where: str) -> None:
    """A one-line StageError, prefixed by `where`, unless the rate and channel count are whole numbers within
    the bounds the capture accepts."""
    for name, value, low, high in (
        ("rate", sample_rate, MIN_SOURCE_RATE, MAX_SOURCE_RATE),
        ("channels", channels, 1, MAX_SOURCE_CHANNELS),
    ):
        whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if not whole or not low <= value <= high:
            raise StageError(f"{where}: {name} {value!r} is outside {low}..{high}")


def num_audio_tokens(num_samples: int) -> int:
    """Decoder positions covered by `num_samples` samples, rounded as mistral-common rounds."""
    if num_samples % HOP_LENGTH == 0:
        frames = num_samples // HOP_LENGTH
    else:
        frames = math.ceil(num_samples / HOP_LENGTH - 1)
    return math.ceil(frames / MEL_FRAMES_PER_TOKEN)


def delay_tokens(delay_ms: float) -> int:
    """Number of delay tokens for a delay in ms (rounded up as mistral-common does); 80..2400 ms only."""
    if not MIN_DELAY_MS <= delay_ms <= MAX_DELAY_MS:
        raise StageError(f"delay_ms={delay_ms:g} is outside {MIN_DELAY_MS}..{MAX_DELAY_MS} ms")
    return num_audio_tokens(int(delay_ms / 1000 * SAMPLE_RATE))


def token_aligned_delay_ms(delay_ms: float) -> int:
    """The delay the model runs for a requested `delay_ms`: whole 80 ms tokens, rounded up as `delay_tokens` rounds."""
    return round(delay_tokens(delay_ms) * MS_PER_TOKEN)


def right_pad_samples(num_samples: int, num_delay_tokens: int) -> int:
    """Zeros appended at the end of a stream: align to a whole token, then delay + 1 + buffer tokens."""
    align = (SAMPLES_PER_TOKEN - num_samples % SAMPLES_PER_TOKEN) % SAMPLES_PER_TOKEN
    return align + SAMPLES_PER_TOKEN * (num_delay_tokens + 1 + OFFLINE_STREAMING_BUFFER_TOKENS)


def stream_right_pad_samples(num_samples: int, num_delay_tokens: int) -> int:
    """Zeros a stream gets at its end: one token fewer than mistral-common's pad, because the reference never
    runs the last padded position (transformers generates N - L tokens for N positions and a prompt of L)."""
    return right_pad_samples(num_samples, num_delay_tokens) - SAMPLES_PER_TOKEN


def _pad(audio: np.ndarray, left_pad_tokens: int, right: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    left = np.zeros(left_pad_tokens * SAMPLES_PER_TOKEN, dtype=np.float32)
    return np.concatenate([left, audio, np.zeros(right, dtype=np.float32)])


def pad_audio(audio: np.ndarray, left_pad_tokens: int, num_delay_tokens: int) -> np.ndarray:
    """mistral-common's offline streaming-format padding: left pad tokens of zeros, the audio, the right pad."""
    return _pad(audio, left_pad_tokens, right_pad_samples(len(audio), num_delay_tokens))


def pad_stream(audio: np.ndarray, left_pad_tokens: int, num_delay_tokens: int) -> np.ndarray:
    """The whole padded stream the pipeline's stages see for `audio` (one token shorter than `pad_audio`)."""
    return _pad(audio, left_pad_tokens, stream_right_pad_samples(len(audio), num_delay_tokens))
