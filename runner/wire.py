"""The data envelope on the wire: a msgpack header, then each numpy array of the payload as a raw frame."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from voxtral_run.stages.base import Item

# msgpack extension code marking an array leaf in the header: its data is [frame index, dtype, shape].
_ARRAY_EXT = 1
MAX_STREAM_ID_CHARS = 64
MAX_GAPS = 4096  # gaps one message may carry: a queue drops at most its capacity between two sends


class WireError(Exception):
    """A message that cannot be encoded or decoded (unsupported type, truncated frames)."""


class Kind(str, Enum):
    """What an envelope carries: a payload item, or the end of its stream."""

    DATA = "data"
    EOS = "eos"


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
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, msgpack.UnpackException) as error:
        raise WireError(f"malformed envelope: {one_line(error)}") from None
    _check_header(envelope)
    return envelope


def one_line(text: object) -> str:
    """Any text on one line, at most 200 characters."""
    return " ".join(str(text).split())[:200]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_header(envelope: Envelope) -> None:
    """The routing fields must have their types and sizes; what a stage does with the payload is its own check."""
    stream = envelope.stream_id
    if not isinstance(stream, str) or not 0 < len(stream) <= MAX_STREAM_ID_CHARS:
        raise WireError(f"malformed envelope: stream id {stream!r:.80}")
    if not isinstance(envelope.seq, int) or isinstance(envelope.seq, bool) or envelope.seq < 0:
        raise WireError(f"malformed envelope: sequence number {envelope.seq!r:.80}")
    if not (_is_number(envelope.capture_time) and _is_number(envelope.sent_time)):
        raise WireError("malformed envelope: times are not numbers")
    gaps = envelope.gaps
    pairs = isinstance(gaps, list) and len(gaps) <= MAX_GAPS
    if not pairs or not all(isinstance(gap, list) and len(gap) == 2 and all(map(_is_number, gap)) for gap in gaps):
        raise WireError("malformed envelope: audio gaps are not [start, length] pairs")


def payload_bytes(frames: list[bytes | np.ndarray]) -> int:
    """Total size of a message's frames, for profiling output sizes."""
    return sum(len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames)
