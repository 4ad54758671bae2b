"""POST /v1/audio/transcriptions as OpenAI defines it: a multipart upload transcribed as one more stream.

The file is decoded as the CLI decodes its input (soundfile, or PyAV for M4A/WebM), a second at a time off the
event loop, resampled to 16 kHz mono and sent to the hub no faster than it takes it. response_format: json,
text, srt, vtt (the CLI's own writers) or verbose_json (timed segments, and words when asked); stream=true
answers with server-sent events of the deltas instead. Extras beyond OpenAI's: `delay_ms` in the form, and the
token ids and audio times in the bodies.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import os
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from voxtral_run.runner.serve.hub import Done, HubError, StreamError, StreamHandle, StreamHub, StreamOptions, TextDelta
from voxtral_run.runner.serve.metrics import ServeMetrics
from voxtral_run.runner.serve.protocol import (
    ApiError,
    ApiErrorBody,
    DurationUsage,
    Segment,
    TextDeltaEvent,
    TextDoneEvent,
    TokenUsage,
    TranscriptionJson,
    VerboseTranscription,
    Word,
)
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.stages.audio.capture import FileSource
from voxtral_run.stages.audio.resample import ResampleStage
from voxtral_run.stages.base import Item, StageError
from voxtral_run.stages.text.writers import build_cues, open_writer

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TEXT_MEDIA_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
GRANULARITIES = ("word", "segment")
READ_CHUNK_MS = 1000  # the upload is read a second at a time: few thread hops, little memory
MAX_FORM_FIELDS = 32
SERVER_SIDE = {"server_at_capacity": 503, "server_not_ready": 503, "server_shutting_down": 503}


class ApiFailure(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_response(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error body: invalid_request_error for a 4xx, server_error otherwise."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ApiError(error=ApiErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


@dataclass(frozen=True)
class TranscriptionRequest:
    """The form's fields this server uses, checked."""

    upload: UploadFile
    response_format: str
    stream: bool
    language: str | None
    words: bool
    delay_ms: int | None


async def transcriptions(request: Request, hub: StreamHub, settings: ServeSettings, metrics: ServeMetrics) -> Response:
    """Transcribe an uploaded file; OpenAI's error body with a 4xx or 503 status when it cannot be."""
    try:
        form = await _read_form(request, settings)
    except ApiFailure as failure:
        return error_response(failure.status, failure.code, failure.message, failure.param)
    path: Path | None = None
    handle: StreamHandle | None = None
    try:
        asked = _checked(form)
        path = await asyncio.to_thread(_spooled, asked.upload)
        source = await asyncio.to_thread(_open_source, path, asked.upload.filename or "file")
        try:
            handle = await hub.open(StreamOptions(delay_ms=asked.delay_ms, label="http"))
        except HubError as error:
            source.close()
            if error.code == "server_at_capacity":
                metrics.refused.inc()
            raise ApiFailure(SERVER_SIDE.get(error.code, 400), error.code, error.message) from None
        metrics.sessions.labels("http").inc()
        feeding = asyncio.create_task(_feed(handle, source))
        if asked.stream:
            response: Response = _EventStream(_events(handle, feeding, metrics), _cleanup(handle, feeding, path))
            handle = path = None  # the response owns them now
            return response
        metrics.active_sessions.inc()
        try:
            deltas, done = await _collect(handle, feeding)
        finally:
            metrics.active_sessions.dec()
        _count(metrics, done)
        return _response(asked, deltas, done)
    except ApiFailure as failure:
        return error_response(failure.status, failure.code, failure.message, failure.param)
    finally:
        await form.close()
        if handle is not None:
            handle.abort()
        if path is not None:
            path.unlink(missing_ok=True)


async def _read_form(request: Request, settings: ServeSettings) -> FormData:
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ApiFailure(411, "length_required", "the request needs a Content-Length header")
    if int(length) > settings.max_upload_bytes:
        limit = settings.max_upload_bytes
        raise ApiFailure(413, "file_too_large", f"the request has {length} bytes, over the {limit}-byte limit")
    try:
        return await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except HTTPException as error:
        raise ApiFailure(400, "invalid_request", f"malformed multipart form: {error.detail}") from None


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiFailure(400, "invalid_value", f"{name} must be a text field", name)
    return value


def _checked(form: FormData) -> TranscriptionRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise ApiFailure(400, "missing_file", "file is required: the audio to transcribe, as a multipart file", "file")
    if not _field(form, "model"):
        raise ApiFailure(400, "missing_model", "model is required", "model")
    response_format = _field(form, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        formats = ", ".join(RESPONSE_FORMATS)
        raise ApiFailure(400, "invalid_value", f"response_format {response_format!r:.40} is not one of {formats}")
    stream = (_field(form, "stream") or "false").lower()
    if stream not in ("true", "false"):
        raise ApiFailure(400, "invalid_value", f"stream must be true or false, got {stream!r:.40}", "stream")
    granularities = form.getlist("timestamp_granularities[]")
    unknown = [value for value in granularities if value not in GRANULARITIES]
    if unknown:
        raise ApiFailure(400, "invalid_value", f"timestamp_granularities: {unknown[0]!r:.40} is not word or segment")
    temperature = _field(form, "temperature")
    if temperature is not None and not _is_temperature(temperature):
        message = f"temperature must be a number from 0 to 1, got {temperature!r:.40}"
        raise ApiFailure(400, "invalid_value", message, "temperature")
    delay = _field(form, "delay_ms")
    if delay is not None and not delay.isdigit():
        raise ApiFailure(400, "invalid_value", f"delay_ms must be a whole number of ms, got {delay!r:.40}", "delay_ms")
    try:
        StreamOptions(delay_ms=None if delay is None else int(delay))
    except HubError as error:
        raise ApiFailure(400, "invalid_value", error.message, "delay_ms") from None
    return TranscriptionRequest(
        upload=upload, response_format=response_format, stream=stream == "true", language=_field(form, "language"),
        words="word" in granularities, delay_ms=None if delay is None else int(delay),
    )  # fmt: skip


def _is_temperature(text: str) -> bool:
    """Whether `text` is OpenAI's temperature, a number from 0 to 1 (decoding here is greedy whatever it is)."""
    try:
        return 0.0 <= float(text) <= 1.0
    except ValueError:
        return False


def _spooled(upload: UploadFile) -> Path:
    """The upload in a file of its own (the decoders read a path), named with the upload's extension."""
    suffix = Path(upload.filename or "").suffix[:16]
    descriptor, name = tempfile.mkstemp(prefix="voxtral-upload-", suffix=suffix)
    with os.fdopen(descriptor, "wb") as out:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, out)
    return Path(name)


def _open_source(path: Path, filename: str) -> FileSource:
    try:
        return FileSource(path, chunk_ms=READ_CHUNK_MS)
    except StageError as error:
        raise ApiFailure(400, "invalid_audio", str(error).replace(str(path), filename), "file") from None


def _next_pieces(chunks: Iterator[Item], resampler: ResampleStage) -> list[np.ndarray] | None:
    """The next second of the file at 16 kHz mono (None at its end, then the resampler's tail)."""
    chunk = next(chunks, None)
    if chunk is None:
        return None
    return resampler.push("upload", chunk)


async def _feed(handle: StreamHandle, source: FileSource) -> str | None:
    """Send the file to the stream and end it; why it could not be read to its end, if it could not."""
    resampler = ResampleStage()
    chunks = source.chunks()
    try:
        while (pieces := await asyncio.to_thread(_next_pieces, chunks, resampler)) is not None:
            for piece in pieces:
                if not await handle.send(piece):
                    return None  # the stream is over: its error event tells why
        for piece in resampler.finish("upload"):
            await handle.send(piece)
        handle.end()
        return None
    except StageError as error:
        handle.abort()
        return str(error).replace(str(source.path), "the file")
    except BaseException:  # cancelled, or a bug: the stream must not wait for audio that never comes
        handle.abort()
        raise
    finally:
        source.close()


async def _collect(handle: StreamHandle, feeding: asyncio.Task) -> tuple[list[TextDelta], Done]:
    deltas: list[TextDelta] = []
    while isinstance(event := await handle.next_event(), TextDelta):
        deltas.append(event)
    if isinstance(event, Done):
        return deltas, event
    unreadable = await feeding
    if unreadable is not None:
        raise ApiFailure(400, "invalid_audio", unreadable, "file")
    raise ApiFailure(SERVER_SIDE.get(event.code, 500), event.code, event.message)


def _count(metrics: ServeMetrics, done: Done) -> None:
    metrics.audio_seconds.inc(done.usage.audio_s)
    metrics.tokens.inc(done.usage.tokens)


class _EventStream(StreamingResponse):
    """Server-sent events whose stream and upload are let go however the response ends: sent, or the client gone
    (when the events may never have started)."""

    def __init__(self, events: AsyncIterator[str], cleanup: Awaitable[None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup


async def _cleanup(handle: StreamHandle, feeding: asyncio.Task, path: Path) -> None:
    handle.abort()  # the client left early (or the stream is over, when this does nothing)
    feeding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeding
    path.unlink(missing_ok=True)


async def _events(handle: StreamHandle, feeding: asyncio.Task, metrics: ServeMetrics) -> AsyncIterator[str]:
    """Server-sent events: a transcript.text.delta per delta, then transcript.text.done (or an error), [DONE]."""
    metrics.active_sessions.inc()
    try:
        async for event in handle.events():
            if isinstance(event, TextDelta):
                body: Any = TextDeltaEvent(
                    delta=event.text, start_s=event.start_s, end_s=event.end_s, token_ids=list(event.token_ids)
                )  # fmt: skip
            elif isinstance(event, Done):
                _count(metrics, event)
                body = TextDoneEvent(text=event.text, usage=TokenUsage.of(event.usage), token_ids=list(event.token_ids))
            else:
                body = _stream_error(event, await feeding)
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        metrics.active_sessions.dec()


def _stream_error(event: StreamError, unreadable: str | None) -> ApiError:
    if unreadable is not None:
        return ApiError(error=ApiErrorBody(message=unreadable, type="invalid_request_error", code="invalid_audio"))
    return ApiError(error=ApiErrorBody(message=event.message, type="server_error", code=event.code))


def _response(asked: TranscriptionRequest, deltas: list[TextDelta], done: Done) -> Response:
    token_ids = list(done.token_ids)
    if asked.response_format == "json":
        body = TranscriptionJson(text=done.text, usage=TokenUsage.of(done.usage), token_ids=token_ids)
        return JSONResponse(body.model_dump())
    events = [{"type": "delta", "text": delta.text, "start_s": delta.start_s, "end_s": delta.end_s} for delta in deltas]
    if asked.response_format == "verbose_json":
        return JSONResponse(_verbose(asked, deltas, events, done).model_dump(exclude_none=True))
    out = io.StringIO()
    writer = open_writer(asked.response_format, None, stream=out)
    for event in [*events, {"type": "done", "text": done.text}]:
        writer.write(event)
    writer.close()
    return PlainTextResponse(out.getvalue(), media_type=TEXT_MEDIA_TYPES[asked.response_format])


def _verbose(asked: TranscriptionRequest, deltas: list[TextDelta], events: list[dict], done: Done) -> Any:
    """verbose_json: the SRT cues as segments, each with the ids of the deltas that start in it."""
    cues = build_cues(events)
    starts = [cue.start_s for cue in cues]
    tokens: list[list[int]] = [[] for _ in cues]
    for delta in deltas:
        index = bisect.bisect_right(starts, delta.start_s) - 1
        if cues:
            tokens[max(index, 0)].extend(delta.token_ids)
    segments = [
        Segment(
            id=index,
            start=cue.start_s,
            end=cue.end_s,
            text=cue.text,
            tokens=tokens[index],
            compression_ratio=_compression_ratio(cue.text),
        )  # fmt: skip
        for index, cue in enumerate(cues)
    ]
    return VerboseTranscription(
        language=asked.language or "unknown", duration=done.usage.audio_s, text=done.text, segments=segments,
        words=_words(deltas) if asked.words else None, usage=DurationUsage(seconds=done.usage.audio_s),
        token_ids=list(done.token_ids),
    )  # fmt: skip


def _compression_ratio(text: str) -> float:
    """Whisper's repetition score: the text's bytes over their zlib-compressed bytes."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _words(deltas: list[TextDelta]) -> list[Word]:
    """Deltas joined into whitespace-separated words, each timed from its first delta to its last."""
    words: list[list[Any]] = []  # [text, start, end]
    for delta in deltas:
        if words and not delta.text[:1].isspace() and not words[-1][0][-1:].isspace():
            words[-1][0] += delta.text
            words[-1][2] = delta.end_s
        else:
            words.append([delta.text, delta.start_s, delta.end_s])
    return [Word(word=text.strip(), start=start, end=end) for text, start, end in words if text.strip()]
