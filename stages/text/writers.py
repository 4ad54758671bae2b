"""Transcript writers: detokenize events (timed text deltas, then done) as text, JSONL, SRT or WebVTT."""

from __future__ import annotations

import io
import json
import numbers
import os
import sys
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from voxtral_run.stages.base import StageError

EVENT_TYPES = ("delta", "done")
PARTIAL_SUFFIX = ".partial"  # a transcript file being written, or left by a run that failed
MAX_CUE_SECONDS = 7.0  # subtitle cues stay short enough to read while they are shown
MAX_CUE_CHARS = 42  # a common subtitle line length
SENTENCE_END = (".", "?", "!", "…", "。", "？", "！")
CLAUSE_END = ("，", "、", "；", "：")  # CJK clause marks: where a cue split for length is best made
# Japanese characters that never start a line (small kana, the long vowel and iteration marks).
NO_LINE_START = "ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶーゝゞヽヾ々"


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

    writes_as_it_goes = False  # whether events reach the output as they come, rather than all at close

    def __init__(self, out: TextIO, owns_out: bool, commit_to: Path | None = None):
        self._out = out
        self._owns_out = owns_out  # a file we opened is closed with the writer; a given stream only flushed
        self._commit_to = commit_to  # `out` is a partial file that becomes this path once the transcript is whole
        self._closed = False

    def write(self, event: dict) -> None:
        """Take one event ({"type": "delta", ...} or {"type": "done", ...})."""
        if self._closed:
            raise StageError("transcript writer: write after close")
        _check_event(event)
        self._receive(event)

    def close(self) -> None:
        """Write what was received (all of it, or what came before an interrupt) and release the output; a write
        error (full disk, revoked permission) is a one-line StageError, and a partial file keeps its name."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._out.write(self._final_content())
            finally:
                self._release()
            if self._commit_to is not None:
                os.replace(self._out.name, self._commit_to)
        except OSError as err:
            raise self._write_error(err) from None

    def _write_error(self, err: OSError) -> StageError:
        where = self._commit_to or getattr(self._out, "name", "the output")
        return StageError(f"{where}: cannot write the transcript ({err.strerror or err})")

    def abort(self) -> Path | None:
        """Release the output without finishing the transcript (the run failed). A transcript written at close
        goes to its .partial file, which keeps that name so it never looks finished, and is removed if there
        was no text; returns its path if it stays."""
        if self._closed:
            return None
        self._closed = True
        content = self._final_content()
        try:
            try:
                self._out.write(content)
            finally:
                self._release()
        except OSError:  # the run failed already; a disk that is full too changes nothing in what is reported
            pass
        if self._commit_to is None:
            return None
        partial = Path(self._out.name)
        if not content.strip():
            partial.unlink()
            return None
        return partial

    def _release(self) -> None:
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

    def __init__(self, out: TextIO, owns_out: bool, commit_to: Path | None = None):
        super().__init__(out, owns_out, commit_to)
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
    """One JSON object per event, written and flushed as it comes so a partial transcript survives; only a
    finished transcript ends with a `done` event."""

    writes_as_it_goes = True

    def _receive(self, event: dict) -> None:
        line = json.dumps(event, ensure_ascii=False, default=_json_default) + "\n"
        try:
            self._write_record(line)
        except OSError as err:
            raise self._write_error(err) from None

    def _write_record(self, line: str) -> None:
        """Write one whole line; if the write fails part way, cut the file back to the last whole record, so a
        reader never meets half a line."""
        try:
            descriptor = self._out.fileno()
        except (AttributeError, io.UnsupportedOperation):  # an in-memory stream
            self._out.write(line)
            self._out.flush()
            return
        data = line.encode("utf-8")
        self._out.flush()  # nothing of ours is buffered; the stream's own earlier text goes first
        try:
            committed = os.lseek(descriptor, 0, os.SEEK_CUR)
        except OSError:  # a pipe or terminal: nothing to cut back
            committed = None
        written = 0
        try:
            while written < len(data):
                written += os.write(descriptor, data[written:])
        except OSError:
            if written and committed is not None:
                try:
                    os.ftruncate(descriptor, committed)
                    os.lseek(descriptor, committed, os.SEEK_SET)
                except OSError:
                    pass
            raise

    def _final_content(self) -> str:
        return ""


@dataclass
class Cue:
    """One subtitle: its text and when it is shown, in seconds."""

    text: str
    start_s: float
    end_s: float


def build_cues(deltas: list[dict]) -> list[Cue]:
    """Group timed deltas into unbreakable pieces, then pieces into cues of at most MAX_CUE_SECONDS and
    MAX_CUE_CHARS, ending a cue after a sentence end and preferring a CJK comma when one must be split."""
    # Cues break only between deltas, never inside one: each delta's times are exact, while a split inside it
    # would have to guess when each character was spoken; a delta is one token's text, a few characters.
    pieces: list[Cue] = []
    for delta in deltas:
        if not delta["text"]:
            continue
        if pieces and not _may_break(pieces[-1].text, delta["text"]):
            pieces[-1].text += delta["text"]
            pieces[-1].end_s = delta["end_s"]
        else:
            pieces.append(Cue(delta["text"], delta["start_s"], delta["end_s"]))
    cues: list[list[Cue]] = []
    current: list[Cue] = []
    for piece in pieces:
        if current and not _fits([*current, piece]):
            tail = _after_last_clause(current)
            if tail and _fits([*tail, piece]):
                cues.append(current[: -len(tail)])
                current = tail
            else:
                cues.append(current)
                current = []
        current.append(piece)
        if _joined(current).rstrip().endswith(SENTENCE_END):
            cues.append(current)
            current = []
    if current:
        cues.append(current)
    return [
        Cue(_cue_text(_joined(cue)), cue[0].start_s, max(cue[0].start_s, cue[-1].end_s))
        for cue in cues
        if _joined(cue).strip()
    ]


def _joined(pieces: list[Cue]) -> str:
    return "".join(piece.text for piece in pieces)


def _is_wide(char: str) -> bool:
    """Chinese, Japanese and Korean characters and their punctuation (East Asian wide or fullwidth)."""
    return unicodedata.east_asian_width(char) in ("W", "F")


def _may_break(before: str, after: str) -> bool:
    """Whether a cue may end between two texts: at whitespace, or beside a CJK character since Chinese and
    Japanese put no spaces between words, though never before closing punctuation or a small kana, nor after
    opening punctuation."""
    if before[-1].isspace() or after[0].isspace():
        return True
    closes = unicodedata.category(after[0]) in ("Po", "Pe", "Pf") or after[0] in NO_LINE_START
    if closes or unicodedata.category(before[-1]) in ("Ps", "Pi"):
        return False
    return _is_wide(before[-1]) or _is_wide(after[0])


def _fits(pieces: list[Cue]) -> bool:
    """Whether these pieces make one cue within MAX_CUE_CHARS and MAX_CUE_SECONDS."""
    return len(_cue_text(_joined(pieces))) <= MAX_CUE_CHARS and pieces[-1].end_s - pieces[0].start_s <= MAX_CUE_SECONDS


def _after_last_clause(pieces: list[Cue]) -> list[Cue]:
    """The pieces after the cue's last CJK clause mark (，、；：) in its second half, to start the next cue
    with, so a split cue ends at a pause rather than mid-clause; none if there is no such mark."""
    length = 0
    cut = len(pieces)
    for index, piece in enumerate(pieces):
        length += len(piece.text)
        if piece.text.rstrip().endswith(CLAUSE_END) and length >= MAX_CUE_CHARS // 2:
            cut = index + 1
    return pieces[cut:]


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

    def __init__(self, out: TextIO, owns_out: bool, commit_to: Path | None = None):
        super().__init__(out, owns_out, commit_to)
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
    writer = _WRITERS[format]
    # A transcript written at close goes to PATH.partial, renamed when it is whole: a run that fails midway
    # leaves no file under the transcript's name. One written as it goes is read as it grows, under its name.
    target = path if writer.writes_as_it_goes else path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        out = open(target, "w", encoding="utf-8")  # the writer closes it
    except OSError as err:
        raise StageError(f"{path}: cannot write the transcript ({err.strerror})") from None
    return writer(out, owns_out=True, commit_to=None if target == path else path)
