"""The data envelope on the wire: a msgpack header, then each numpy array of the payload as a raw frame."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from voxtral_run.stages.base import Item

# msgpack extension code marking an array leaf in the header: its data is [frame index, dtype, shape].
_ARRAY_EXT = 1


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
        return Envelope(
            stream_id=header["s"],
            seq=header["q"],
            capture_time=header["t"],
            kind=Kind(header["k"]),
            item=header["p"],
            sent_time=header["ts"],
        )
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
        raise WireError(f"malformed envelope: {error}") from error


def payload_bytes(frames: list[bytes | np.ndarray]) -> int:
    """Total size of a message's frames, for profiling output sizes."""
    return sum(len(frame) if isinstance(frame, bytes) else frame.nbytes for frame in frames)
