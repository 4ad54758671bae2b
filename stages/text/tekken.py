"""The one reader of tekken.json: byte vocabulary, special token ids and the streaming audio block."""

from __future__ import annotations

import base64
import binascii
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxtral_run.stages.audio.constants import (
    FRAME_RATE,
    HOP_LENGTH,
    MAX_DELAY_MS,
    MIN_DELAY_MS,
    MS_PER_TOKEN,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    WINDOW_SIZE,
    delay_tokens,
)
from voxtral_run.stages.base import CheckpointError, read_json_object

TEKKEN_FILE = "tekken.json"  # its name in a model directory

BOS = "<s>"
EOS = "</s>"
STREAMING_PAD = "[STREAMING_PAD]"
STREAMING_WORD = "[STREAMING_WORD]"
REQUIRED_SPECIAL_TOKENS = (BOS, EOS, STREAMING_PAD, STREAMING_WORD)
STREAMING_FORMAT = "streaming"
NUM_BYTE_TOKENS = 256  # ranks 0..255 are the single bytes 0x00..0xFF

# (key in the audio block, expected value from stages/audio/constants.py); the model is built for exactly these rates.
_FIXED_AUDIO_VALUES = (
    ("sampling_rate", SAMPLE_RATE),
    ("frame_rate", FRAME_RATE),
    ("audio_encoding_config.num_mel_bins", NUM_MEL_BINS),
    ("audio_encoding_config.hop_length", HOP_LENGTH),
    ("audio_encoding_config.window_size", WINDOW_SIZE),
)


@dataclass(frozen=True)
class TekkenAudio:
    """The `audio` block of tekken.json (docs/MODEL.md §2), streaming format only."""

    sampling_rate: int
    frame_rate: float
    num_mel_bins: int
    hop_length: int
    window_size: int
    transcription_delay_ms: float
    streaming_n_left_pad_tokens: int
    streaming_look_ahead_ms: float
    streaming_look_back_ms: float
    transcription_format: str

    @property
    def num_delay_tokens(self) -> int:
        """Delay in decoder tokens, rounded up as mistral-common rounds (docs/MODEL.md §4)."""
        return delay_tokens(self.transcription_delay_ms)


@dataclass(frozen=True)
class Tekken:
    """A loaded tekken.json: normal token bytes (id = rank + num_special), special ids and the audio block."""

    token_bytes: list[bytes]
    num_special: int
    vocab_size: int
    special_ids: dict[str, int]
    bos_id: int
    eos_id: int
    streaming_pad_id: int
    streaming_word_id: int
    audio: TekkenAudio

    def is_special(self, token_id: int) -> bool:
        """Whether an id is a control token (dropped from text)."""
        return token_id < self.num_special

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes an id adds to the text: none for a special token."""
        return b"" if self.is_special(token_id) else self.token_bytes[token_id - self.num_special]


_JSON_TYPE_NAMES = {int: "an integer", str: "a string", list: "an array", dict: "an object"}
_NUMBER = (int, float)


def _get(block: dict, dotted_key: str, kind: type | tuple[type, ...], path: Path, where: str = "") -> Any:
    """Look up `a.b.c` in nested dicts and check its JSON type (bools never count as numbers); `where`
    prefixes the key in messages, e.g. `special_tokens[3].`."""
    value: Any = block
    for part in dotted_key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(f"{path}: missing key {where}{dotted_key}")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "a number" if kind == _NUMBER else _JSON_TYPE_NAMES[kind]
        raise CheckpointError(f"{path}: {where}{dotted_key} must be {expected}, got {reprlib.repr(value)}")
    return value


def _load_vocab(data: dict, num_normal: int, path: Path) -> list[bytes]:
    vocab = _get(data, "vocab", list, path)
    if len(vocab) < num_normal:
        raise CheckpointError(
            f"{path}: vocab has {len(vocab)} entries, fewer than "
            f"config.default_vocab_size - config.default_num_special_tokens = {num_normal}"
        )
    token_bytes: list[bytes] = []
    try:
        for rank, entry in enumerate(vocab[:num_normal]):
            if entry["rank"] != rank:
                raise CheckpointError(f"{path}: vocab[{rank}].rank is {entry['rank']!r}, expected {rank}")
            token_bytes.append(base64.b64decode(entry["token_bytes"], validate=True))
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: vocab[{rank}] needs rank and base64 token_bytes") from None
    except binascii.Error:
        raise CheckpointError(f"{path}: vocab[{rank}].token_bytes is not base64") from None
    for rank in range(NUM_BYTE_TOKENS):
        if token_bytes[rank] != bytes([rank]):
            raise CheckpointError(f"{path}: vocab[{rank}].token_bytes must be the single byte 0x{rank:02x}")
    return token_bytes


def _load_special_ids(data: dict, num_special: int, path: Path) -> dict[str, int]:
    entries = _get(data, "special_tokens", list, path)
    special_ids: dict[str, int] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: special_tokens[{index}] must be an object")
        token_id = _get(entry, "rank", int, path, where=f"special_tokens[{index}].")
        name = _get(entry, "token_str", str, path, where=f"special_tokens[{index}].")
        if not 0 <= token_id < num_special:
            last = num_special - 1
            raise CheckpointError(f"{path}: special_tokens[{index}].rank {token_id} is outside 0..{last}")
        special_ids[name] = token_id
    missing = [name for name in REQUIRED_SPECIAL_TOKENS if name not in special_ids]
    if missing:
        raise CheckpointError(f"{path}: special_tokens lacks {', '.join(missing)}")
    return special_ids


def _load_audio(data: dict, path: Path) -> TekkenAudio:
    _get(data, "audio", dict, path)
    for key, expected in _FIXED_AUDIO_VALUES:
        value = _get(data, f"audio.{key}", _NUMBER, path)
        if value != expected:
            raise CheckpointError(f"{path}: audio.{key} is {value}, this engine supports only {expected}")
    audio_format = _get(data, "audio.transcription_format", str, path)
    if audio_format != STREAMING_FORMAT:
        problem = f"audio.transcription_format {audio_format!r} is not {STREAMING_FORMAT!r}"
        raise CheckpointError(f"{path}: {problem}")
    delay_ms = _get(data, "audio.transcription_delay_ms", _NUMBER, path)
    if delay_ms <= 0 or delay_ms % MS_PER_TOKEN != 0:
        rule = f"must be a positive multiple of {MS_PER_TOKEN:g} ms"
        raise CheckpointError(f"{path}: audio.transcription_delay_ms is {delay_ms}, {rule}")
    if not MIN_DELAY_MS <= delay_ms <= MAX_DELAY_MS:
        raise CheckpointError(
            f"{path}: audio.transcription_delay_ms is {delay_ms}, outside {MIN_DELAY_MS}..{MAX_DELAY_MS} ms"
        )
    left_pad = _get(data, "audio.streaming_n_left_pad_tokens", int, path)
    if left_pad < 0:
        raise CheckpointError(f"{path}: audio.streaming_n_left_pad_tokens is {left_pad}, must be >= 0")
    look_ahead_ms = _get(data, "audio.streaming_look_ahead_ms", _NUMBER, path)
    look_back_ms = _get(data, "audio.streaming_look_back_ms", _NUMBER, path)
    for key, value in (("streaming_look_ahead_ms", look_ahead_ms), ("streaming_look_back_ms", look_back_ms)):
        if value < 0:
            raise CheckpointError(f"{path}: audio.{key} is {value}, must be >= 0")
    encoding = data["audio"]["audio_encoding_config"]
    return TekkenAudio(
        sampling_rate=data["audio"]["sampling_rate"],
        frame_rate=data["audio"]["frame_rate"],
        num_mel_bins=encoding["num_mel_bins"],
        hop_length=encoding["hop_length"],
        window_size=encoding["window_size"],
        transcription_delay_ms=delay_ms,
        streaming_n_left_pad_tokens=left_pad,
        streaming_look_ahead_ms=look_ahead_ms,
        streaming_look_back_ms=look_back_ms,
        transcription_format=audio_format,
    )


def load_tekken(path: Path) -> Tekken:
    """Read and check a tekken.json; any problem is a one-line CheckpointError naming the file and key."""
    path = Path(path)
    data = read_json_object(path)
    vocab_size = _get(data, "config.default_vocab_size", int, path)
    num_special = _get(data, "config.default_num_special_tokens", int, path)
    if num_special <= 0 or vocab_size - num_special < NUM_BYTE_TOKENS:
        raise CheckpointError(
            f"{path}: config.default_vocab_size {vocab_size} and default_num_special_tokens {num_special} "
            f"must leave at least one special and {NUM_BYTE_TOKENS} byte tokens"
        )
    token_bytes = _load_vocab(data, vocab_size - num_special, path)
    special_ids = _load_special_ids(data, num_special, path)
    return Tekken(
        token_bytes=token_bytes,
        num_special=num_special,
        vocab_size=vocab_size,
        special_ids=special_ids,
        bos_id=special_ids[BOS],
        eos_id=special_ids[EOS],
        streaming_pad_id=special_ids[STREAMING_PAD],
        streaming_word_id=special_ids[STREAMING_WORD],
        audio=_load_audio(data, path),
    )
