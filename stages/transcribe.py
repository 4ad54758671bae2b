"""In-process transcription: the pipeline's stage objects chained in one process.

`Transcriber` is the Python API: load a model once, then transcribe files, arrays and live streams. `run_chain`
and `transcribe_audio` are the reference the pipeline is tested against.
"""

from __future__ import annotations

import itertools
import numbers
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxtral_run.stages.audio.capture import FileSource, frames_per_chunk
from voxtral_run.stages.audio.constants import MAX_SOURCE_CHANNELS, check_source_format
from voxtral_run.stages.base import Item, Stage, StageError
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.model.hub import resolve_model
from voxtral_run.stages.text.writers import Cue, build_cues

MODEL_CHAIN = ("mel", "encoder", "decoder", "detokenize")
AUDIO_CHAIN = ("resample", *MODEL_CHAIN)


@dataclass(frozen=True)
class Transcript:
    """Every id the decoder generated (specials included, in order) and the decoded text."""

    token_ids: list[int]
    text: str


def _push_through(chain: Sequence[Stage], stream_id: str, items: list[Item], start: int = 0) -> list[Item]:
    """Push items into chain[start] and what comes out on through the later stages; the last stage's items."""
    for stage in chain[start:]:
        items = [out for item in items for out in stage.push(stream_id, item)]
    return items


def _finish_through(chain: Sequence[Stage], stream_id: str) -> list[Item]:
    """Finish a stream stage by stage, each stage's last items pushed through the stages after it."""
    outputs: list[Item] = []
    for index, stage in enumerate(chain):
        outputs.extend(_push_through(chain, stream_id, stage.finish(stream_id), index + 1))
    return outputs


def run_chain(chain: Sequence[Stage], stream_id: str, chunks: Iterable[Item]) -> list[Item]:
    """Push chunks through stages in order, then finish the stream stage by stage; the last stage's items."""
    outputs = [out for chunk in chunks for out in _push_through(chain, stream_id, [chunk])]
    return outputs + _finish_through(chain, stream_id)


def build_chain(model_dir: Path, *, delay_ms: float | None = None, device: str = "cpu") -> list[Stage]:
    """mel -> encoder -> decoder -> detokenize stage objects for one model, delay and device."""
    return [build_stage(kind, model_dir=model_dir, device=device, delay_ms=delay_ms) for kind in MODEL_CHAIN]


def transcript_of(events: Iterable[Item]) -> Transcript:
    """The transcript carried by a detokenize stage's final `done` event."""
    done = [event for event in events if event["type"] == "done"]
    return Transcript(token_ids=list(done[-1]["token_ids"]), text=done[-1]["text"])


def transcribe_audio(
    audio: np.ndarray,
    *,
    model_dir: Path,
    delay_ms: float | None = None,
    device: str = "cpu",
    chunk_samples: int | None = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 audio; `chunk_samples` feeds it in pieces as a live stream would."""
    audio = np.asarray(audio, dtype=np.float32)
    step = chunk_samples or max(len(audio), 1)
    chunks = [audio[i : i + step] for i in range(0, len(audio), step)]
    return transcript_of(run_chain(build_chain(model_dir, delay_ms=delay_ms, device=device), "stream", chunks))


@dataclass(frozen=True)
class Delta:
    """Text as soon as the decoder completes it, timed by the 80 ms audio tokens it came from, and the ids
    generated since the previous delta."""

    text: str
    start_s: float
    end_s: float
    token_ids: list[int]


@dataclass(frozen=True)
class Result(Transcript):
    """A finished transcription: `text`, every generated `token_ids`, timed `segments` and the raw `deltas`.

    Segments are the SRT/VTT cues (`output.build_cues`): whole words grouped up to a sentence end, 7 s or
    42 characters, whitespace folded, which is what one shows or indexes; deltas are often parts of words.
    """

    segments: list[Cue]
    deltas: list[Delta]


def _result(events: list[Item]) -> Result:
    transcript = transcript_of(events)
    deltas = [event for event in events if event["type"] == "delta"]
    return Result(transcript.token_ids, transcript.text, build_cues(deltas), [_delta(event) for event in deltas])


def _delta(event: Item) -> Delta:
    return Delta(event["text"], event["start_s"], event["end_s"], list(event["token_ids"]))


def _sample_rate(rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not float(rate).is_integer() or rate <= 0:
        raise StageError(f"sample_rate must be a positive whole number of Hz, got {rate!r}")
    check_source_format(int(rate), 1, "sample_rate")
    return int(rate)


def _frames(samples: object) -> np.ndarray:
    """Samples as float32 [n, channels], with one-line errors for what the stages would reject deep inside."""
    try:
        array = np.asarray(samples)
    except (TypeError, ValueError, RuntimeError) as err:
        raise StageError(f"samples must be a numpy array of floats ({' '.join(str(err).split())})") from None
    if array.dtype.kind != "f":
        raise StageError(f"samples must be floats in [-1, 1], got {array.dtype} (scale integer PCM: int16 / 32768)")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim != 2 or array.shape[1] == 0:
        raise StageError(f"samples must have shape [n] or [n, channels], got {list(array.shape)}")
    elif array.shape[1] > MAX_SOURCE_CHANNELS:
        shape = list(array.shape)
        raise StageError(f"samples of shape {shape} would be {shape[1]} channels; pass [n, channels] (samples.T)")
    if not np.isfinite(array).all():
        raise StageError("samples contain NaN or infinite values")
    return array.astype(np.float32, copy=False)


class Transcriber:
    """Voxtral loaded once: the pipeline's resample, mel, encoder, decoder and detokenize stage objects,
    transcribing files, arrays and live streams, each call on a stream of its own."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        """Use stage objects built elsewhere: resample, mel, encoder, decoder, detokenize, in that order."""
        self.stages = list(stages)
        # Stages keep per-stream state in plain dicts and torch modules: one push or finish at a time, so
        # streams may be fed from several threads.
        self._lock = threading.Lock()
        self._stream_numbers = itertools.count()
        self._dropped: list[str] = []  # streams left unfinished (garbage-collected), discarded at the next call

    @classmethod
    def load(cls, model: str | Path, *, device: str = "auto", delay_ms: float | None = None) -> Transcriber:
        """Load a model directory or Hugging Face repo id (as `--model` takes) on a device: cpu, cuda:N or auto
        (the first CUDA GPU, else the CPU); `delay_ms` defaults to the model's."""
        model_dir = resolve_model(str(model))
        return cls([build_stage(kind, model_dir=model_dir, device=device, delay_ms=delay_ms) for kind in AUDIO_CHAIN])

    def transcribe(self, audio: str | os.PathLike | np.ndarray, sample_rate: float | None = None) -> Result:
        """Transcribe an audio file (WAV, FLAC, OGG: its own rate) or an array [n] or [n, channels] of floats
        at `sample_rate` (any rate; channels are averaged)."""
        if isinstance(audio, (str, os.PathLike)):
            if sample_rate is not None:
                raise StageError(f"{audio}: a file gives its own sample rate; pass sample_rate with an array only")
            source = FileSource(audio)
            try:
                return self._transcribe_chunks((chunk["samples"] for chunk in source.chunks()), source.sample_rate)
            finally:
                source.close()
        if sample_rate is None:
            raise StageError("an array needs its rate: transcribe(samples, sample_rate=16000)")
        rate = _sample_rate(sample_rate)
        frames = _frames(audio)
        if len(frames) == 0:
            raise StageError("no audio: the array holds 0 samples")
        # 80 ms pieces, as the capture stage reads a file: memory stays bounded for long audio, and on a GPU
        # each piece is one captured encoder step.
        step = frames_per_chunk(rate)
        return self._transcribe_chunks((frames[i : i + step] for i in range(0, len(frames), step)), rate)

    def stream(self, sample_rate: float) -> TranscriptionStream:
        """A live stream of audio at `sample_rate`: push chunks as they arrive, then finish (or close)."""
        return TranscriptionStream(self, sample_rate)

    def _transcribe_chunks(self, chunks: Iterable[np.ndarray], sample_rate: int) -> Result:
        with self.stream(sample_rate) as stream:
            for chunk in chunks:
                stream.push(chunk)
            return stream.finish()

    def _new_stream_id(self) -> str:
        return f"api-{next(self._stream_numbers)}"

    def _discard_dropped(self) -> None:
        while self._dropped:
            stream_id = self._dropped.pop()
            for stage in self.stages:
                stage.finish(stream_id)

    def _push(self, stream_id: str, item: Item) -> list[Item]:
        with self._lock:
            self._discard_dropped()
            return _push_through(self.stages, stream_id, [item])

    def _finish(self, stream_id: str) -> list[Item]:
        with self._lock:
            self._discard_dropped()
            try:
                return _finish_through(self.stages, stream_id)
            except BaseException:
                self._dropped.append(stream_id)  # a stage that failed mid-finish may still hold the stream
                self._discard_dropped()
                raise

    def _discard(self, stream_id: str) -> None:
        with self._lock:
            self._dropped.append(stream_id)
            self._discard_dropped()


class TranscriptionStream:
    """One live stream through a Transcriber's stages: `push` chunks for the text decoded so far, `finish` for
    the Result; `close` (or leaving a `with` block) drops an unfinished stream."""

    def __init__(self, transcriber: Transcriber, sample_rate: float) -> None:
        self.sample_rate = _sample_rate(sample_rate)
        self._transcriber = transcriber
        self._id = transcriber._new_stream_id()
        self._events: list[Item] = []
        self._num_samples = 0
        self._ended = ""  # "finished" or "closed" once the stream is over
        # A stream dropped unfinished leaves state in the stages; its id is queued for discarding instead.
        self._finalizer = weakref.finalize(self, transcriber._dropped.append, self._id)

    def push(self, samples: np.ndarray) -> list[Delta]:
        """Feed a chunk, [n] or [n, channels] floats at the stream's rate; the deltas it completed (often none:
        text lags the audio by the model's delay)."""
        self._check_open("push")
        frames = _frames(samples)
        self._num_samples += len(frames)
        events = self._transcriber._push(self._id, {"samples": frames, "sample_rate": self.sample_rate})
        self._events.extend(events)
        return [_delta(event) for event in events]

    def finish(self) -> Result:
        """End the stream: the last deltas are decoded from the model's right padding; the whole Result."""
        self._check_open("finish")
        self._end("finished")
        if self._num_samples == 0:
            self._transcriber._discard(self._id)
            raise StageError("stream: no audio was pushed before finish")
        self._events.extend(self._transcriber._finish(self._id))
        return _result(self._events)

    def close(self) -> None:
        """Drop the stream if it is not finished, freeing its state in every stage; later calls do nothing."""
        if not self._ended:
            self._end("closed")
            self._transcriber._discard(self._id)

    def __enter__(self) -> TranscriptionStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self, action: str) -> None:
        if self._ended:
            raise StageError(f"stream: {action} after the stream was {self._ended}")

    def _end(self, how: str) -> None:
        self._ended = how
        self._finalizer.detach()
