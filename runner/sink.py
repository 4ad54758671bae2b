"""The runner's sink: final events to the terminal (live text) and to the transcript writer; with several
inputs, a transcript per stream."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from voxtral_run.runner.edges import add_gap
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.wire import Envelope, Kind
from voxtral_run.stages.text.writers import TranscriptWriter, open_writer

EVENT_TYPES = ("delta", "done")
# Audio times are sums of chunk lengths on both sides of a comparison, rounded differently; chunks are 10 ms or more.
TIME_TOLERANCE_S = 1e-6
FORMAT_SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "srt": ".srt", "vtt": ".vtt"}


def write_out(stream: TextIO, text: str) -> None:
    """Write and flush text on a terminal or pipe; a failure is a one-line RunnerError."""
    try:
        stream.write(text)
        stream.flush()
    except OSError as error:
        raise RunnerError(f"cannot write the live text ({error.strerror or error})") from None


def transcript_name(input_name: str, format: str) -> str:
    """The file name of an input's transcript in an output folder: the input's stem, the format's suffix."""
    return Path(input_name).stem + FORMAT_SUFFIXES[format]


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
        write_out(self._stream, text)


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
    """Receives the detokenize events of one stream; if the run ends before its `done` event (Ctrl-C), it
    writes a `done` built from the deltas received so far, so the transcript file is complete up to there.
    Given the stream's `input` name, every event it passes on carries it."""

    def __init__(self, writer: TranscriptWriter | None, live: LiveText | None = None, input: str | None = None):
        self._writer = writer
        self._live = live
        self._input = input
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._done = False
        self._gaps: list[list[float]] = []  # audio a live queue dropped: [start s, length s], in time order
        self._stream_id: str | None = None

    def take(self, envelope: Envelope) -> None:
        """One message of the transcript's queue, where the run is one stream: its gaps and events; its failure
        is a RunnerError with the failing stage's words, and a second stream is refused."""
        if self._stream_id is None:
            self._stream_id = envelope.stream_id
        elif envelope.stream_id != self._stream_id:
            raise RunnerError(
                "the transcript's queue carried a second stream; this invocation writes one transcript "
                "(give it the same inputs as the capture's for one per input)"
            )
        self.add_gaps(envelope.gaps)
        if envelope.kind is Kind.DATA:
            self.write(envelope.item)
        elif envelope.kind is Kind.FAILED:
            raise RunnerError(envelope.message)

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
        if self._input is not None:
            event = event | {"input": self._input}
        if self._writer is not None:
            self._writer.write(event)
        if self._live is not None:
            self._live.write(event)
        if event["type"] == "delta":
            self._text.append(event["text"])
            self._token_ids.extend(int(token_id) for token_id in event.get("token_ids", ()))
        else:
            self._done = True

    def close(self, complete: bool = True) -> list[Path]:
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
        return [partial] if partial is not None else []


class StreamTranscripts:
    """The transcripts of a run of several inputs, one per stream, named after the input its first message
    names: a file each in `folder` (written as one transcript's file is, FILE.partial until whole), or on `out`
    (text: each stream's whole text on one line after its input's name, as the stream ends; JSONL: the events as
    they come). JSONL events carry their input. A stream's failure is one line to `report` naming its input, and
    counts in `failures`; the other streams go on."""

    def __init__(
        self, format: str, folder: Path | None, out: TextIO, report: Callable[[str], None], show_text: bool = True
    ):
        self._format = format
        self._folder = folder
        self._out = out
        self._report = report
        self._show_text = show_text  # with a folder: also each stream's text on `out` as it ends
        self._open: dict[str, tuple[str, TranscriptSink]] = {}  # stream id -> (its input, its transcript)
        self._names: set[str] = set()  # transcript file names taken: an input's must be its own
        self.failures = 0

    def take(self, envelope: Envelope) -> None:
        """One message of the transcript's queue: a stream's gaps and events, its end or its failure."""
        stream_id = envelope.stream_id
        if stream_id not in self._open:
            self._open[stream_id] = self._start(envelope.options.get("input"))
        input_name, sink = self._open[stream_id]
        sink.add_gaps(envelope.gaps)
        if envelope.kind is Kind.DATA:
            sink.write(envelope.item)
        elif envelope.kind is Kind.EOS:
            del self._open[stream_id]
            sink.close()
            if self._show_text if self._folder is not None else self._format == "text":
                write_out(self._out, f"{input_name}: {sink.text.strip()}\n")
        else:
            del self._open[stream_id]
            self.failures += 1
            partial = "".join(f" (the transcript up to the failure is in {path})" for path in sink.close(False))
            self._report(f"voxtral-run: error: {input_name}: {envelope.message}{partial}")

    def _start(self, input_name: str | None) -> tuple[str, TranscriptSink]:
        """A new stream's transcript, named after its input."""
        if input_name is None:
            raise RunnerError("the transcript's queue carried a stream that does not name its input")
        if self._folder is None:
            writer = open_writer(self._format, None, self._out) if self._format != "text" else None
            return input_name, TranscriptSink(writer, input=input_name)
        name = transcript_name(input_name, self._format)
        if name in self._names:
            raise RunnerError(f"{input_name}: its transcript {self._folder / name} is another input's too")
        self._names.add(name)
        return input_name, TranscriptSink(open_writer(self._format, self._folder / name), input=input_name)

    def close(self, complete: bool = True) -> list[Path]:
        """Close the streams still open (a run stopped or failed before their end); the partial files left."""
        partials = []
        for _, sink in self._open.values():
            partials += sink.close(complete)
        self._open.clear()
        return partials
