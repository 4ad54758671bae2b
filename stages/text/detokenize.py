"""Token ids to text, incrementally: specials dropped, UTF-8 characters split across tokens emitted whole."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from voxtral_run.stages.audio.constants import MS_PER_TOKEN
from voxtral_run.stages.base import Item, Stage, StageError
from voxtral_run.stages.text.tekken import Tekken


def token_start_s(index: int) -> float:
    """Start time in seconds of real-audio token `index` (one rounding, so times are exact multiples)."""
    return index * MS_PER_TOKEN / 1000


def _token_ids(ids: Iterable[int] | np.ndarray, vocab_size: int) -> list[int]:
    """Check that `ids` is a 1-D run of integer ids inside the vocabulary; return them as Python ints."""
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError) as err:
        raise StageError(f"token ids must be a 1-D integer array ({err})") from None
    if array.ndim > 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise StageError(f"token ids must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    token_ids = array.reshape(-1).tolist()
    bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
    if bad:
        raise StageError(f"token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")
    return token_ids


class IncrementalDetokenizer:
    """Turns one stream's ids into text as soon as it is complete UTF-8, holding back a partial character."""

    def __init__(self, tekken: Tekken) -> None:
        self._tekken = tekken
        # The standard incremental decoder keeps an incomplete tail and replaces invalid bytes exactly as
        # bytes.decode(errors="replace") does on the whole stream (which is what tiktoken's decode uses).
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def pending_bytes(self) -> int:
        """Bytes held back because they may still become a character."""
        return len(self._decoder.getstate()[0])

    def feed(self, ids: Iterable[int] | np.ndarray) -> str:
        """Add ids; return the text that is now complete (specials are dropped before bytes are joined)."""
        token_ids = _token_ids(ids, self._tekken.vocab_size)
        return self._decoder.decode(b"".join(self._tekken.bytes_of(token_id) for token_id in token_ids))

    def flush(self) -> str:
        """End of stream: the held-back bytes become U+FFFD; the detokenizer is then empty again."""
        return self._decoder.decode(b"", final=True)


@dataclass
class _StreamState:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # every id received, in order
    ids_since_delta: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)  # token index of each held-back byte
    text: list[str] = field(default_factory=list)


class DetokenizeStage(Stage):
    """Stage core: token ids in, `delta` events with text and audio times out, a `done` event at the end.

    Generated token j describes real-audio token j, so its time span is [j, j+1) * 80 ms (docs/MODEL.md §11).
    """

    name = "detokenize"

    def __init__(self, tekken: Tekken) -> None:
        self._tekken = tekken
        self._streams: dict[str, _StreamState] = {}

    def streams(self) -> list[str]:
        return list(self._streams)

    def _state(self, stream_id: str) -> _StreamState:
        if stream_id not in self._streams:
            self._streams[stream_id] = _StreamState(IncrementalDetokenizer(self._tekken))
        return self._streams[stream_id]

    @staticmethod
    def _delta(state: _StreamState, text: str, contributors: list[int]) -> dict:
        """A delta for `text`, spanning the tokens whose bytes it holds, and the ids since the last delta."""
        state.text.append(text)
        event = {
            "type": "delta",
            "text": text,
            "token_ids": state.ids_since_delta,
            "start_s": token_start_s(contributors[0]),
            "end_s": token_start_s(contributors[-1] + 1),
        }
        state.ids_since_delta = []
        return event

    def push(self, stream_id: str, item: Item) -> list[Item]:
        """Consume a run of token ids; return one delta per id that completes text."""
        try:
            token_ids = _token_ids(item, self._tekken.vocab_size)
        except StageError as err:
            raise StageError(f"{self.name}: stream {stream_id}: {err}") from None
        state = self._state(stream_id)
        events = []
        for token_id in token_ids:
            index = len(state.token_ids)
            state.token_ids.append(token_id)
            state.ids_since_delta.append(token_id)
            token_bytes = self._tekken.bytes_of(token_id)
            state.pending_sources.extend([index] * len(token_bytes))
            text = state.detokenizer.feed([token_id])
            if text:
                num_used = len(state.pending_sources) - state.detokenizer.pending_bytes
                events.append(self._delta(state, text, state.pending_sources[:num_used]))
                del state.pending_sources[:num_used]
        return events

    def finish(self, stream_id: str) -> list[Item]:
        """Flush held-back bytes as a last delta (U+FFFD), then a `done` event; forget the stream."""
        state = self._streams.pop(stream_id, None) or _StreamState(IncrementalDetokenizer(self._tekken))
        events = []
        text = state.detokenizer.flush()
        if text:
            events.append(self._delta(state, text, state.pending_sources))
        events.append({"type": "done", "text": "".join(state.text), "token_ids": state.token_ids})
        return events
