"""Toy stage cores for runner tests: cheap, deterministic, and sensitive to every sample they receive."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from voxtral_run.stages.audio.capture import FileSource
from voxtral_run.stages.base import Item, Source, Stage, StageError


def _token_of(samples: np.ndarray) -> int:
    """A token id that changes with any change of the chunk's samples."""
    data = np.ascontiguousarray(samples, dtype=np.float32).tobytes()
    return int.from_bytes(__import__("hashlib").sha1(data).digest()[:4], "little")


class ToyTranscriber(Stage):
    """Audio chunks (capture dicts or arrays) in, one delta per chunk out, a done with every id at the end."""

    def __init__(self, fail_after: int | None = None):
        self._ids: dict[str, list[int]] = {}
        self._fail_after = fail_after

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
