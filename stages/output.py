"""Transcript writers: detokenize events (timed text deltas, then done) as text, JSONL, SRT or WebVTT."""

from __future__ import annotations

import json
import numbers
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from voxtral_run.stages.base import StageError

EVENT_TYPES = ("delta", "done")
MAX_CUE_SECONDS = 7.0  # subtitle cues stay short enough to read while they are shown
MAX_CUE_CHARS = 42  # a common subtitle line length
SENTENCE_END = (".", "?", "!", "…", "。", "？", "！")


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON values (token ids may arrive as numpy integers)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_event(event: Any) -> None:
    """Raise a StageError unless `event` is a delta (text, start_s, end_s) or a done (text) dict."""
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        raise StageError(f"transcript writer: not a delta or done event: {event!r:.100}")
    if not isinstance(event.get("text"), str):
        raise StageError(f"transcript writer: {event['type']} event without a text string: {event!r:.100}")
    if event["type"] == "delta":
        for key in ("start_s", "end_s"):
            if isinstance(event.get(key), bool) or not isinstance(event.get(key), numbers.Real):
                raise StageError(f"transcript writer: delta event without a number {key}: {event!r:.100}")


class TranscriptWriter(ABC):
    """Receives transcript events one by one and writes them in one format to a file or a text stream."""

    def __init__(self, out: TextIO, owns_out: bool):
        self._out = out
        self._owns_out = owns_out  # a file we opened is closed with the writer; a given stream only flushed
        self._closed = False

    def write(self, event: dict) -> None:
        """Take one event ({"type": "delta", ...} or {"type": "done", ...})."""
        if self._closed:
            raise StageError("transcript writer: write after close")
        _check_event(event)
        self._receive(event)

    def close(self) -> None:
        """Write what was received (all of it, or what came before an interrupt) and release the output."""
        if self._closed:
            return
        self._closed = True
        try:
            self._out.write(self._final_content())
        finally:
            if self._owns_out:
                self._out.close()
            else:
                self._out.flush()

    def __enter__(self) -> TranscriptWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abstractmethod
    def _receive(self, event: dict) -> None:
        """Keep or write one checked event."""

    @abstractmethod
    def _final_content(self) -> str:
        """What is written at close."""


class TextWriter(TranscriptWriter):
    """The plain transcript, written at close with a final newline."""

    def __init__(self, out: TextIO, owns_out: bool):
        super().__init__(out, owns_out)
        self._deltas: list[str] = []
        self._done_text: str | None = None

    def _receive(self, event: dict) -> None:
        if event["type"] == "delta":
            self._deltas.append(event["text"])
        else:
            self._done_text = event["text"]

    def _final_content(self) -> str:
        text = "".join(self._deltas) if self._done_text is None else self._done_text
        return text.strip() + "\n"


class JsonlWriter(TranscriptWriter):
    """One JSON object per event, written and flushed as it comes so a partial transcript survives."""

    def _receive(self, event: dict) -> None:
        self._out.write(json.dumps(event, ensure_ascii=False, default=_json_default) + "\n")
        self._out.flush()

    def _final_content(self) -> str:
        return ""


@dataclass
class Cue:
    """One subtitle: its text and when it is shown, in seconds."""

    text: str
    start_s: float
    end_s: float


def build_cues(deltas: list[dict]) -> list[Cue]:
    """Group timed deltas into words (a word starts at a delta that begins with whitespace), then words into
    cues of at most MAX_CUE_SECONDS and MAX_CUE_CHARS, ending a cue after a sentence end."""
    words: list[Cue] = []
    for delta in deltas:
        if not delta["text"]:
            continue
        if words and not delta["text"][0].isspace():
            words[-1].text += delta["text"]
            words[-1].end_s = delta["end_s"]
        else:
            words.append(Cue(delta["text"], delta["start_s"], delta["end_s"]))
    cues: list[Cue] = []
    current: Cue | None = None
    for word in words:
        if current is not None:
            too_long = len(_cue_text(current.text + word.text)) > MAX_CUE_CHARS
            if too_long or word.end_s - current.start_s > MAX_CUE_SECONDS:
                cues.append(current)
                current = None
        if current is None:
            current = Cue(word.text, word.start_s, word.end_s)
        else:
            current.text += word.text
            current.end_s = word.end_s
        if current.text.rstrip().endswith(SENTENCE_END):
            cues.append(current)
            current = None
    if current is not None:
        cues.append(current)
    cues = [cue for cue in cues if cue.text.strip()]
    return [Cue(_cue_text(cue.text), cue.start_s, max(cue.start_s, cue.end_s)) for cue in cues]


def _cue_text(text: str) -> str:
    """Cue text on one line: whitespace runs (a blank line would end the cue) become single spaces."""
    return " ".join(text.split())


def format_timestamp(seconds: float, decimal_marker: str) -> str:
    """HH:MM:SS followed by the marker and milliseconds (SRT uses ",", WebVTT ".")."""
    total_ms = max(0, round(seconds * 1000))
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


class SubtitleWriter(TranscriptWriter):
    """Subtitle cues built from the timed deltas, written at close."""

    def __init__(self, out: TextIO, owns_out: bool):
        super().__init__(out, owns_out)
        self._deltas: list[dict] = []

    def _receive(self, event: dict) -> None:
        if event["type"] == "delta":
            self._deltas.append(event)

    def _final_content(self) -> str:
        return self._header() + "".join(
            self._format_cue(index, cue) for index, cue in enumerate(build_cues(self._deltas), start=1)
        )

    @abstractmethod
    def _header(self) -> str:
        """Text before the first cue."""

    @abstractmethod
    def _format_cue(self, index: int, cue: Cue) -> str:
        """One cue block, ending with its blank line."""


class SrtWriter(SubtitleWriter):
    """SubRip subtitles: numbered cues, times as 00:00:01,234."""

    def _header(self) -> str:
        return ""

    def _format_cue(self, index: int, cue: Cue) -> str:
        times = f"{format_timestamp(cue.start_s, ',')} --> {format_timestamp(cue.end_s, ',')}"
        return f"{index}\n{times}\n{cue.text}\n\n"


class VttWriter(SubtitleWriter):
    """WebVTT subtitles: a WEBVTT header, times as 00:00:01.234."""

    def _header(self) -> str:
        return "WEBVTT\n\n"

    def _format_cue(self, index: int, cue: Cue) -> str:
        times = f"{format_timestamp(cue.start_s, '.')} --> {format_timestamp(cue.end_s, '.')}"
        return f"{times}\n{cue.text}\n\n"


_WRITERS: dict[str, type[TranscriptWriter]] = {
    "text": TextWriter,
    "jsonl": JsonlWriter,
    "srt": SrtWriter,
    "vtt": VttWriter,
}
FORMATS = tuple(_WRITERS)


def open_writer(format: str, path: Path | None, stream: TextIO | None = None) -> TranscriptWriter:
    """A writer of `format` (one of FORMATS) to the file at `path` (UTF-8), or when path is None to `stream`
    (default: sys.stdout at the time of the call), which the writer flushes but does not close."""
    if format not in _WRITERS:
        raise StageError(f"unknown transcript format {format!r}; valid formats: {', '.join(FORMATS)}")
    if path is None:
        return _WRITERS[format](sys.stdout if stream is None else stream, owns_out=False)
    try:
        out = open(path, "w", encoding="utf-8")  # the writer closes it
    except OSError as err:
        raise StageError(f"{path}: cannot write the transcript ({err.strerror})") from None
    return _WRITERS[format](out, owns_out=True)
