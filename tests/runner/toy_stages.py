"""Toy stage cores for runner tests: cheap, deterministic, and sensitive to every sample they receive."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np

from voxtral_run.stages.audio.capture import FileSource
from voxtral_run.stages.base import END, Item, Marker, Output, Source, Stage, StageError, StreamEnd, StreamStart, Work


def _token_of(samples: np.ndarray) -> int:
    """A token id that changes with any change of the chunk's samples."""
    data = np.ascontiguousarray(samples, dtype=np.float32).tobytes()
    return int.from_bytes(__import__("hashlib").sha1(data).digest()[:4], "little")


class ToyTranscriber(Stage):
    """Audio chunks (capture dicts or arrays) in, one delta per chunk out, a done with every id at the end; with
    `fail_after`, a stream longer than that many chunks fails."""

    def __init__(self, fail_after: int | None = None):
        self._ids: dict[str, list[int]] = {}
        self._fail_after = fail_after

    def streams(self) -> list[str]:
        return list(self._ids)

    def push(self, stream_id: str, item: Item) -> list[Item]:
        samples = item["samples"] if isinstance(item, dict) else item
        ids = self._ids.setdefault(stream_id, [])
        if self._fail_after is not None and len(ids) >= self._fail_after:
            raise StageError(f"toy failure after {self._fail_after} chunks")
        ids.append(_token_of(samples))
        start = (len(ids) - 1) * 0.08
        return [
            {
                "type": "delta",
                "text": f" t{ids[-1] % 1000}",
                "token_ids": [ids[-1]],
                "start_s": start,
                "end_s": start + 0.08,
            }
        ]

    def finish(self, stream_id: str) -> list[Item]:
        ids = self._ids.pop(stream_id, [])
        return [{"type": "done", "text": "".join(f" t{i % 1000}" for i in ids), "token_ids": ids}]


class Passthrough(Stage):
    """Forwards items unchanged."""

    def push(self, stream_id: str, item: Item) -> list[Item]:
        return [item]

    def finish(self, stream_id: str) -> list[Item]:
        return []


class BatchingRelay(Passthrough):
    """Forwards items unchanged, a step's items of every stream as one batched computation (as a model stage
    batches its streams' rows), streams' ends and failures as they come."""

    def step(self, work: list[Work]) -> list[Output]:
        outputs = [
            (stream_id, END if isinstance(item, StreamEnd) else item)
            for stream_id, item in work
            if not isinstance(item, StreamStart)
        ]
        rows = sum(1 for _, item in work if not isinstance(item, Marker))
        self.batch_sizes = [rows] if rows else []
        return outputs


class OneAtATime(Passthrough):
    """Forwards one stream at a time, as a model stage at its ceiling does: other streams' items wait, held, and a
    stream that ends makes room only for the next call, which then takes the oldest waiting stream."""

    def __init__(self) -> None:
        self._pending: dict[str, list] = {}  # per stream, oldest first: its items waiting, then END once it ended
        self._active: str | None = None

    def streams(self) -> list[str]:
        return list(self._pending)

    def step(self, work: list[Work]) -> list[Output]:
        for stream_id, item in work:
            if not isinstance(item, StreamStart):
                self._pending.setdefault(stream_id, []).append(item)
        if self._active is None and self._pending:
            self._active = next(iter(self._pending))
        outputs: list[Output] = []
        self.batch_sizes = []
        if self._active is not None:
            items = self._pending[self._active]
            outputs = [(self._active, item) for item in items]
            rows = sum(1 for item in items if not isinstance(item, Marker))
            self.batch_sizes = [rows] if rows else []
            if items and isinstance(items[-1], StreamEnd):
                del self._pending[self._active]
                self._active = None
            else:
                items.clear()
        return outputs


class LossyLiveSource(Source):
    """A file read at its real pace that loses the chunks at LOST, as a microphone whose queue filled up does, and
    says after each chunk how much audio it lost just before it (`dropped_before_s`, as MicSource does)."""

    live = True
    LOST = (3, 4, 10)

    def __init__(self, input: str):
        self._file = FileSource(input, realtime=True)
        self.dropped_before_s = 0.0

    def chunks(self) -> Iterator[Item]:
        lost_s = 0.0
        for index, chunk in enumerate(self._file.chunks()):
            if index in self.LOST:
                lost_s += len(chunk["samples"]) / chunk["sample_rate"]
                continue
            self.dropped_before_s, lost_s = lost_s, 0.0
            yield chunk

    def close(self) -> None:
        self._file.close()


class EnvironmentTranscriber(ToyTranscriber):
    """ToyTranscriber whose deltas' text is the value of `variable` in its process's environment (`-` if unset):
    what a stage process inherits from the runner."""

    def __init__(self, variable: str):
        super().__init__()
        self._variable = variable

    def push(self, stream_id: str, item: Item) -> list[Item]:
        deltas = super().push(stream_id, item)
        return [delta | {"text": os.environ.get(self._variable, "-")} for delta in deltas]


class CudaUnavailable(Passthrough):
    """A stage that cannot start, as a GPU stage whose CUDA context is refused."""

    def __init__(self) -> None:
        raise StageError("CUDA error: all CUDA-capable devices are busy or unavailable")


class HeapReporter(ToyTranscriber):
    """ToyTranscriber whose deltas' text is how many objects its process's collector has frozen (gc.freeze)."""

    def push(self, stream_id: str, item: Item) -> list[Item]:
        return [delta | {"text": str(gc.get_freeze_count())} for delta in super().push(stream_id, item)]
