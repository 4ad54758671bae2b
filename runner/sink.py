"""The runner's sink: final events to the terminal (live text) and to the transcript writer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TextIO

from voxtral_run.runner.edges import add_gap
from voxtral_run.runner.errors import RunnerError
from voxtral_run.stages.text.writers import TranscriptWriter

EVENT_TYPES = ("delta", "done")
# Audio times are sums of chunk lengths on both sides of a comparison, rounded differently; chunks are 10 ms or more.
TIME_TOLERANCE_S = 1e-6


class LiveText:
    """Prints each delta's text as it arrives, then a newline at the end."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._started = False

    def write(self, event: dict) -> None:
        if event.get("type") != "delta":
            return
        text = event["text"] if self._started else event["text"].lstrip()
        if text:
            self._started = True
            self._put(text)

    def close(self) -> None:
        if self._started:
            self._put("\n")

    def _put(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError as error:
            raise RunnerError(f"cannot write the live text ({error.strerror or error})") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_event(event: object) -> None:
    """A RunnerError unless `event` is what the last stage sends: a delta (text, token ids, start and end times)
    or a done (text, token ids)."""
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        raise RunnerError(f"the transcript's queue carried something that is not a delta or done event: {event!r:.80}")
    token_ids = event.get("token_ids", [])
    ids_ok = isinstance(token_ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in token_ids)
    times_ok = event["type"] == "done" or all(_is_number(event.get(key)) for key in ("start_s", "end_s"))
    if not isinstance(event.get("text"), str) or not ids_ok or not times_ok:
        raise RunnerError(f"the transcript's queue carried a malformed {event['type']} event: {event!r:.80}")


class TranscriptSink:
    """Receives the detokenize events of one run; if the run ends before its `done` event (Ctrl-C), it
    writes a `done` built from the deltas received so far, so the transcript file is complete up to there."""

    def __init__(self, writer: TranscriptWriter | None, live: LiveText | None = None):
        self._writer = writer
        self._live = live
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._done = False
        self._gaps: list[list[float]] = []  # audio a live queue dropped: [start s, length s], in time order

    def add_gaps(self, gaps: list[list[float]]) -> None:
        """Audio left out before the next events: their times move past it, to the real audio's times."""
        for gap in gaps:
            add_gap(self._gaps, gap)

    def _real_time(self, seconds: float) -> float:
        for start_s, length_s in self._gaps:
            if seconds >= start_s - TIME_TOLERANCE_S:
                seconds += length_s
        return seconds

    @property
    def text(self) -> str:
        return "".join(self._text)

    def write(self, event: dict) -> None:
        """Check one event, move its times past the audio a live queue dropped, and pass it on."""
        if self._done:
            return
        check_event(event)
        if event["type"] == "delta" and self._gaps:
            event = event | {key: self._real_time(event[key]) for key in ("start_s", "end_s")}
        if self._writer is not None:
            self._writer.write(event)
        if self._live is not None:
            self._live.write(event)
        if event["type"] == "delta":
            self._text.append(event["text"])
            self._token_ids.extend(int(token_id) for token_id in event.get("token_ids", ()))
        else:
            self._done = True

    def close(self, complete: bool = True) -> Path | None:
        """Complete the transcript with a `done` if none came and close the writer; a run that failed
        (`complete` false) gets no `done`, and its file stays partial. The partial file's path, if one is left."""
        partial = None
        try:
            if complete and not self._done:
                self.write({"type": "done", "text": self.text, "token_ids": self._token_ids})
        finally:
            if self._writer is not None:
                if complete:
                    self._writer.close()
                else:
                    partial = self._writer.abort()
            if self._live is not None:
                self._live.close()
        return partial
