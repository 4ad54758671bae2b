"""The runner's sink: final events to the terminal (live text) and to the transcript writer."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from voxtral_run.stages.output import TranscriptWriter


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
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        if self._started:
            self._stream.write("\n")
            self._stream.flush()


class TranscriptSink:
    """Receives the detokenize events of one run; if the run ends before its `done` event (Ctrl-C), it
    writes a `done` built from the deltas received so far, so the transcript file is complete up to there."""

    def __init__(self, writer: TranscriptWriter | None, live: LiveText | None = None):
        self._writer = writer
        self._live = live
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._done = False

    @property
    def text(self) -> str:
        return "".join(self._text)

    def write(self, event: dict) -> None:
        if self._done:
            return
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
