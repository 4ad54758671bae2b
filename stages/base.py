"""The contract every pipeline stage core follows: items in, items out, per-stream state, no sockets."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# An item is a numpy array (audio samples, mel frames, encoder frames, token ids) or a dict of
# msgpack-friendly values whose leaves may be numpy arrays (audio chunks with their rate, text events).
Item = Any
WARM_UP_STREAM = "__warm-up__"  # the stream a stage compiles and captures its steps with, then drops


@dataclass(frozen=True)
class StreamStart:
    """Opens a stream in a stage's work, with the stream's own options (None: the stage's setting)."""

    delay_ms: int | None = None


@dataclass(frozen=True)
class StreamEnd:
    """Ends a stream: in a stage's work, its input is over; in its outputs, the stage has finished it."""


@dataclass(frozen=True)
class StreamFailed:
    """A stream a stage gave up on (refused at capacity, bad input): the stage holds nothing of it any more, and
    ignores what else arrives for it. In a later stage's work, the same news from upstream."""

    message: str
    at_capacity: bool = False  # refused at a stage's ceiling: a service tells its client to try again later


END = StreamEnd()
Marker = StreamStart | StreamEnd | StreamFailed
Work = tuple[str, Any]  # (stream id, an item or a marker): what a stage consumes, in arrival order
Output = tuple[str, Any]  # (stream id, an item, END or a StreamFailed): what it produces, each stream's in order


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

    def settings(self) -> dict[str, str]:
        """The settings that decide what it computes, by name (a model stage's number formats), for the start-up
        line and the figures; none for most stages."""
        return {}

    def kv_usage(self) -> dict[str, int]:
        """KV memory pages in use and in all (a model stage's pool), for the figures and a router weighing where a
        new stream goes; none for most stages."""
        return {}

    def graph_captures(self) -> dict[str, float]:
        """CUDA graphs a model stage captured since its warm-up and the host seconds they took (`captured`,
        `capture_s`: a step meeting a new shape waits for its capture), for the figures; none for most stages."""
        return {}

    def start(self, stream_id: str, options: StreamStart) -> None:  # noqa: B027 - a hook: most stages need none
        """Open a stream with its own options; a stage without per-stream options needs none (`push` opens)."""

    def step(self, work: list[Work]) -> list[Output]:
        """Consume the work waiting for this stage, many streams' at once in arrival order, and return what it
        produced: each stream's items in order, then END once a stream is finished, or a StreamFailed for a
        stream given up on. A batching stage runs one batched step for every stream with work; this default
        pushes item by item, and a bad item fails its stream only."""
        outputs: list[Output] = []
        failed: set[str] = set()
        for stream_id, item in work:
            if stream_id in failed:
                continue
            if isinstance(item, StreamStart):
                self.start(stream_id, item)
                continue
            if isinstance(item, StreamFailed):
                self.finish(stream_id)
                failed.add(stream_id)
                outputs.append((stream_id, item))
                continue
            try:
                produced = self.finish(stream_id) if isinstance(item, StreamEnd) else self.push(stream_id, item)
            except StageError as error:
                self.finish(stream_id)
                failed.add(stream_id)
                outputs.append((stream_id, StreamFailed(str(error))))
                continue
            outputs.extend((stream_id, out) for out in produced)
            if isinstance(item, StreamEnd):
                outputs.append((stream_id, END))
        self.batch_sizes = [1] * sum(1 for _, item in work if not isinstance(item, Marker))
        return outputs

    def step_round(self, work: list[Work]) -> list[Output]:
        """`step`, except that a batching stage runs at most one round of batched steps and keeps what is left
        (`has_work`) for later calls: a stream's burst (a first or last item of many positions) then never holds
        back the next tick's batch, which joins the next round."""
        return self.step(work)

    @property
    def has_work(self) -> bool:
        """Whether a call with no new work would compute something (work kept by `step_round`)."""
        return False

    @property
    def backlog(self) -> int:
        """Items taken and kept for later rounds (0 for a stage that finishes each call's work)."""
        return 0

    # Rows in each batched computation of the last `step` call (profiling); one per item for a stage without
    # batching.
    batch_sizes: list[int] = []


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
