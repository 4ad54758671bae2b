"""Toy stage cores for runner tests: cheap, deterministic, and sensitive to every sample they receive."""

from __future__ import annotations

import numpy as np

from voxtral_run.stages.base import Item, Stage, StageError


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
