"""The data envelope on the wire: a msgpack header, then each numpy array of the payload as a raw frame."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from voxtral_run.stages.audio.constants import MAX_DELAY_MS, MIN_DELAY_MS
from voxtral_run.stages.base import Item

# msgpack extension code marking an array leaf in the header: its data is [frame index, dtype, shape].
_ARRAY_EXT = 1
MAX_STREAM_ID_CHARS = 64
MAX_GAPS = 4096  # gaps one message may carry: a queue drops at most its capacity between two sends
MAX_MESSAGE_CHARS = 1000  # a failed stream's reason
MAX_INPUT_CHARS = 4096  # a stream's input name (a path: PATH_MAX)
# A stream's own options, on its first message: its delay, and the input it was read from (the sink names its
# transcript after it).
STREAM_OPTIONS = ("delay_ms", "input")
LAST_STREAM_ID = ""  # the stream id of the sender's last message, which belongs to no stream


class WireError(Exception):
    """A message that cannot be encoded or decoded (unsupported type, truncated frames)."""


class Kind(str, Enum):
    """What an envelope carries: a payload item, the end of its stream, the news that its stream was given up on,
    or the sender's last message."""

    DATA = "data"
    EOS = "eos"
    FAILED = "failed"  # a stage gave the stream up: `message` says why; nothing more of it follows
    LAST = "last"  # every stream the sender carried has ended; `seq` counts them


@dataclass
class Envelope:
    """Routing and timing of one message: stream, order, capture time of the audio it covers, kind, payload."""

    stream_id: str
    seq: int
    capture_time: float  # wall-clock seconds when the audio this item covers was captured
    kind: Kind = Kind.DATA
    item: Item = None
    sent_time: float = field(default=0.0)  # wall-clock seconds when the sender put it on the wire
    # Audio a dropping queue left out before this message, as [start s, length s] of the source's own time: the
    # sink moves later text by it, so times stay those of the real audio.
    gaps: list[list[float]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # the stream's own options: on its first message only
    message: str = ""  # why a FAILED stream was given up on
    at_capacity: bool = False  # a FAILED stream was refused at a stage's ceiling


def encode(envelope: Envelope) -> list[bytes | np.ndarray]:
    """Frames of an envelope: header first (msgpack, arrays replaced by references), then the array bytes."""
    arrays: list[np.ndarray] = []

    def pack_leaf(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise WireError(f"cannot send an array of dtype {value.dtype}")
            array = value if value.flags.c_contiguous else value.copy(order="C")
            arrays.append(array)
            meta = msgpack.packb([len(arrays) - 1, array.dtype.str, list(array.shape)])
            return msgpack.ExtType(_ARRAY_EXT, meta)
        if isinstance(value, np.generic):
            return value.item()
        raise WireError(f"cannot send a value of type {type(value).__name__}")

    header = {
        "k": envelope.kind.value,
        "s": envelope.stream_id,
        "q": envelope.seq,
        "t": envelope.capture_time,
        "ts": time.time(),
        "p": envelope.item,
    }
    if envelope.gaps:
        header["g"] = envelope.gaps
    if envelope.options:
        header["o"] = envelope.options
    if envelope.message:
        header["m"] = envelope.message
    if envelope.at_capacity is not False:
        header["c"] = envelope.at_capacity
    packed = msgpack.packb(header, default=pack_leaf, use_bin_type=True)
    return [packed, *(array.reshape(-1).view(np.uint8) for array in arrays)]


def decode(frames: list[bytes]) -> Envelope:
    """Rebuild an envelope from its frames; arrays come back writable and with their dtype and shape."""

    def unpack_ext(code: int, data: bytes) -> Any:
        if code != _ARRAY_EXT:
            raise WireError(f"unknown msgpack extension {code}")
        index, dtype, shape = msgpack.unpackb(data)
        if not 0 < index + 1 < len(frames):
            raise WireError(f"array frame {index} missing from a {len(frames)}-frame message")
        return np.frombuffer(frames[index + 1], dtype=np.dtype(dtype)).reshape(shape).copy()

    try:
        header = msgpack.unpackb(frames[0], ext_hook=unpack_ext, raw=False, strict_map_key=False)
        envelope = Envelope(
            stream_id=header["s"],
            seq=header["q"],
            capture_time=header["t"],
            kind=Kind(header["k"]),
            item=header["p"],
            sent_time=header["ts"],
            gaps=header.get("g", []),
            options=header.get("o", {}),
            message=header.get("m", ""),
            at_capacity=header.get("c", False),
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, msgpack.UnpackException) as error:
        raise WireError(f"malformed envelope: {one_line(error)}") from None
    _check_header(envelope)
    return envelope


def one_line(text: object) -> str:
    """Any text on one line, at most 200 characters."""
    return " ".join(str(text).split())[:200]


def printable_line(text: object, limit: int) -> str:
    """Text as a header carries it: on one line, characters that do not print replaced, at most `limit` long."""
    line = " ".join(str(text).split())[:limit]
    return "".join(char if char.isprintable() else "\ufffd" for char in line)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_line(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _check_header(envelope: Envelope) -> None:
    """The routing fields must have their types and sizes; what a stage does with the payload is its own check."""
    stream = envelope.stream_id
    last = envelope.kind is Kind.LAST
    if last and stream != LAST_STREAM_ID:
        raise WireError(f"malformed envelope: the sender's last message names stream {stream!r:.80}")
    if not last and (not isinstance(stream, str) or not 0 < len(stream) <= MAX_STREAM_ID_CHARS):
        raise WireError(f"malformed envelope: stream id {stream!r:.80}")
    if last and (envelope.item is not None or envelope.options or envelope.gaps):
        raise WireError("malformed envelope: the sender's last message carries more than its count")
    if not isinstance(envelope.seq, int) or isinstance(envelope.seq, bool) or envelope.seq < 0:
        raise WireError(f"malformed envelope: sequence number {envelope.seq!r:.80}")
    if not (_is_number(envelope.capture_time) and _is_number(envelope.sent_time)):
        raise WireError("malformed envelope: times are not numbers")
    gaps = envelope.gaps
    pairs = isinstance(gaps, list) and len(gaps) <= MAX_GAPS
    if not pairs or not all(isinstance(gap, list) and len(gap) == 2 and all(map(_is_number, gap)) for gap in gaps):
        raise WireError("malformed envelope: audio gaps are not [start, length] pairs")
    _check_options(envelope.options)
    failed = envelope.kind is Kind.FAILED
    if failed != (envelope.message != "") or (failed and not _is_line(envelope.message, MAX_MESSAGE_CHARS)):
        raise WireError(f"malformed envelope: failure message {envelope.message!r:.80} on a {envelope.kind.value}")
    if envelope.at_capacity is not False and not (failed and envelope.at_capacity is True):
        raise WireError(f"malformed envelope: at-capacity mark {envelope.at_capacity!r:.80} on a {envelope.kind.value}")


def _check_options(options: object) -> None:
    """A stream's options: known keys, a delay within the model's bounds, an input name on one printable line."""
    if not isinstance(options, dict):
        raise WireError("malformed envelope: stream options are not a map")
    unknown = [key for key in options if key not in STREAM_OPTIONS]
    if unknown:
        raise WireError(f"malformed envelope: unknown stream option {unknown[0]!r:.80}")
    delay = options.get("delay_ms", MIN_DELAY_MS)
    if not isinstance(delay, int) or isinstance(delay, bool) or not MIN_DELAY_MS <= delay <= MAX_DELAY_MS:
        raise WireError(f"malformed envelope: stream option delay_ms {delay!r:.80}")
    if "input" in options and not _is_line(options["input"], MAX_INPUT_CHARS):
        raise WireError(f"malformed envelope: stream option input {options['input']!r:.80}")


def payload_bytes(frames: list[bytes | np.ndarray]) -> int:
    """Total size of a message's frames, for profiling output sizes."""
    return sum(len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames)
