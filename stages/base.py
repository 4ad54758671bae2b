"""The contract every pipeline stage core follows: items in, items out, per-stream state, no sockets."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# An item is a numpy array (audio samples, mel frames, encoder frames, token ids) or a dict of
# msgpack-friendly values whose leaves may be numpy arrays (audio chunks with their rate, text events).
Item = Any
WARM_UP_STREAM = "__warm-up__"  # the stream id of `PerStreamStage.push_and_forget`


class StageError(Exception):
    """A one-line problem a stage reports (bad input or setting); the runner prints it and exits non-zero."""


class CheckpointError(StageError):
    """A model directory that cannot be loaded: missing file, bad field, missing/extra/misshapen tensor."""


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file whose top level is an object; any problem is a one-line CheckpointError naming the file."""
    try:
        with Path(path).open("rb") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be a JSON object")
    return data


class Stage(ABC):
    """A stage core: keeps explicit state per stream id and turns input items into output items.

    The runner wraps a stage in a process; tests and the in-process transcriber chain stage objects directly.
    """

    name: str = "stage"

    @abstractmethod
    def push(self, stream_id: str, item: Item) -> list[Item]:
        """Consume one input item of a stream (starting the stream if new); return the items now ready."""

    @abstractmethod
    def finish(self, stream_id: str) -> list[Item]:
        """End a stream: flush what it still holds, return the last items, and forget its state."""

    def streams(self) -> list[str]:
        """Ids of the streams this stage currently holds state for."""
        return []


class PerStreamStage(Stage):
    """A stage whose per-stream state lives in one dict keyed by stream id."""

    def __init__(self) -> None:
        self._states: dict[str, Any] = {}

    def streams(self) -> list[str]:
        return list(self._states)

    def state(self, stream_id: str) -> Any:
        """The live state of a stream (for inspection, e.g. of cache sizes)."""
        return self._states[stream_id]

    def push_and_forget(self, *items: Item) -> Any:
        """Push items through a stream that is dropped straight after: a warm-up that compiles and captures
        the stage's step code before real streams arrive. Returns the dropped stream's state."""
        for item in items:
            self.push(WARM_UP_STREAM, item)
        return self._states.pop(WARM_UP_STREAM, None)


class Source(ABC):
    """The capture stage's core: yields audio chunks of one stream (dicts with `samples` [n, channels] float32
    and `sample_rate`), with no sockets."""

    name: str = "capture"
    live: bool = False  # a live source cannot be paused, so only its outgoing edge may drop

    @property
    def paced(self) -> bool:
        """Whether chunks arrive at the audio's own pace (a live source, or a file read in real time)."""
        return self.live

    @abstractmethod
    def chunks(self) -> Iterator[Item]:
        """Yield the stream's audio chunks until the source ends or `close` is called."""

    @abstractmethod
    def close(self) -> None:
        """Stop producing (microphone closed, file released); `chunks` then ends."""
