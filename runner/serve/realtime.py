"""WebSocket sessions of /v1/realtime in vLLM's dialect or OpenAI's, each bounded on its own.

The dialect is guessed from the URL (OpenAI's clients send `?intent=transcription` or `?model=`) or the
`OpenAI-Beta: realtime=v1` header, which picks the session.created sent on connecting (the beta's
transcription_session.created with the header), and settled by the first event when that is an update: a
`session` object or a transcription_session.update is OpenAI's, a top-level `model` vLLM's. Every malformed
event gets an error event and the session goes on. Audio is read no faster than the hub takes it (a client
sending faster than real time waits on its socket); events wait for a slow client in a bounded queue, past which
its session is closed; a session with no client event for `idle_timeout_s` (and no text still due) is closed; a
disconnect aborts its streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.websockets import WebSocket

from voxtral_run.runner.serve.hub import ABORTED, Done, HubError, StreamError, StreamHandle, StreamHub, StreamOptions
from voxtral_run.runner.serve.metrics import ServeMetrics
from voxtral_run.runner.serve.protocol import (
    OPENAI_CLIENT_EVENTS,
    OPENAI_DELAYS_MS,
    OPENAI_RATE,
    OPENAI_RATES,
    VLLM_CLIENT_EVENTS,
    VLLM_RATE,
    BetaSessionCreated,
    BetaSessionUpdate,
    BetaSessionUpdated,
    ClientEvent,
    OpenAIAppend,
    OpenAIAudio,
    OpenAIAudioFormat,
    OpenAIAudioInput,
    OpenAICleared,
    OpenAICommitted,
    OpenAICompleted,
    OpenAIDelta,
    OpenAIError,
    OpenAIFailed,
    OpenAISession,
    OpenAISessionCreated,
    OpenAISessionUpdate,
    OpenAISessionUpdated,
    OpenAISpeechStarted,
    OpenAISpeechStopped,
    OpenAITranscription,
    OpenAITurnDetection,
    TokenUsage,
    VllmAppend,
    VllmCommit,
    VllmDelta,
    VllmDone,
    VllmError,
    VllmSessionCreated,
    VllmSessionUpdate,
    VllmUsage,
    beta_session,
    decode_pcm16,
    ga_session,
    new_id,
    openai_error_detail,
)
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.audio.resample import ResampleStage
from voxtral_run.stages.audio.speech_detector import (
    SAMPLES_PER_MS,
    SpeechAudio,
    SpeechDetector,
    SpeechEvent,
    SpeechStarted,
)
from voxtral_run.stages.base import StageError

CLOSE_TIMEOUT_S = 5.0  # how long the last events and the close frame may take to reach a client
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 123 bytes
POLICY_VIOLATION = 1008  # the close code of a client that broke a bound (idle, reading too slowly)
TRY_AGAIN_LATER = 1013  # the close code of a server at capacity or not ready
INTERNAL_ERROR = 1011
BETA_HEADER, BETA_HEADER_VALUE = "openai-beta", "realtime=v1"  # what a client of OpenAI's beta Realtime API sends
VAD_STREAM = "session"  # the resampler's stream of the audio server VAD hears (items' streams are their ids)

logger = logging.getLogger(__name__)


def speaks_beta(headers: Mapping[str, str]) -> bool:
    """Whether a connection asks for OpenAI's beta Realtime API (`OpenAI-Beta: realtime=v1`)."""
    return BETA_HEADER_VALUE in (part.strip() for part in headers.get(BETA_HEADER, "").split(","))


def guess_dialect(query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The dialect a connection suggests: OpenAI's clients name an intent or a model in the URL, or ask for the
    beta; vLLM's do none of these."""
    openai = query.get("intent") == "transcription" or "model" in query or speaks_beta(headers)
    return "openai" if openai else "vllm"


def dialect_of_update(event: Mapping[str, Any]) -> str | None:
    """The dialect a session's first event is written in, when it is an update whose shape says: OpenAI's
    session.update nests a `session` object (and only OpenAI's beta has transcription_session.update)."""
    if event.get("type") == "transcription_session.update":
        return "openai"
    if event.get("type") != "session.update":
        return None
    if isinstance(event.get("session"), dict):
        return "openai"
    return "vllm" if "model" in event else None


def parse_event(table: Mapping[str, type[ClientEvent]], event: Mapping[str, Any]) -> ClientEvent:
    """A client event as its model; HubError unknown_event or invalid_event (one line) otherwise."""
    event_type = event.get("type")
    model = table.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        shown = event_type if isinstance(event_type, str) and event_type.isprintable() else repr(event_type)
        raise HubError("unknown_event", f"Unknown event type: {shown[:80]}")
    try:
        return model.model_validate(event)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "event"
        raise HubError("invalid_event", f"{event_type}: {where}: {first['msg']}") from None


class Dialect(ABC):
    """What one protocol says and how it maps onto hub streams, for one session."""

    name: str

    def __init__(self, session: RealtimeSession) -> None:
        self.session = session

    @abstractmethod
    def hello(self) -> BaseModel:
        """The session.created event."""

    @abstractmethod
    def error(self, code: str, message: str, event_id: str | None = None) -> BaseModel:
        """An error event."""

    @abstractmethod
    async def handle(self, event: Mapping[str, Any]) -> None:
        """Act on a client event (a JSON object); HubError for one that is malformed or refused."""

    @abstractmethod
    def on_event(self, handle: StreamHandle, event: Any) -> None:
        """Tell the client a hub event of one of this session's streams, in this dialect."""

    def awaiting_text(self) -> bool:
        """Whether a stream's audio is over and its text still due (the client is waiting, not idle)."""
        return False


class VllmDialect(Dialect):
    """vLLM's realtime protocol: a commit starts a stream (with the audio appended before it), appends feed it,
    a final commit ends it and transcription.done follows; then a commit starts the next."""

    name = "vllm"

    def __init__(self, session: RealtimeSession) -> None:
        super().__init__(session)
        self.model_validated = False
        self.options = StreamOptions(label="vllm")
        self.buffered: list[np.ndarray] = []  # audio appended before the commit that starts a stream
        self.buffered_samples = 0
        self.stream: StreamHandle | None = None  # the stream being fed
        self.ended: set[StreamHandle] = set()  # streams whose audio is over, their text still coming
        self.order: deque[StreamHandle] = deque()  # the streams whose events are not all out, oldest first
        self.held: dict[StreamHandle, list[BaseModel]] = {}  # their events not yet sent
        self.finished: set[StreamHandle] = set()  # those among them whose last event came

    def hello(self) -> BaseModel:
        return VllmSessionCreated()

    def error(self, code: str, message: str, event_id: str | None = None) -> BaseModel:
        return VllmError(error=message, code=code)

    def awaiting_text(self) -> bool:
        return bool(self.ended)

    async def handle(self, event: Mapping[str, Any]) -> None:
        parsed = parse_event(VLLM_CLIENT_EVENTS, event)
        if isinstance(parsed, VllmSessionUpdate):
            self._update(parsed)
        elif isinstance(parsed, VllmAppend):
            await self._append(decode_pcm16(parsed.audio))
        elif isinstance(parsed, VllmCommit):
            await self._commit(parsed.final)

    def _update(self, update: VllmSessionUpdate) -> None:
        if update.model is None:
            raise HubError("invalid_event", "Missing required field: model")
        if update.model != self.session.settings.model_name:
            raise HubError("model_not_found", f"The model `{update.model}` does not exist.")
        if update.delay_ms is not None:
            self.options = StreamOptions(delay_ms=update.delay_ms, label="vllm")
        self.model_validated = True

    async def _append(self, audio: np.ndarray) -> None:
        if self.stream is not None:
            await self.stream.send(audio)
            return
        limit = round(self.session.settings.max_buffered_s * VLLM_RATE)
        if self.buffered_samples + len(audio) > limit:
            held, most = self.buffered_samples / VLLM_RATE, limit / VLLM_RATE
            raise HubError("buffer_full", f"{held:.1f} s of audio wait for a commit, the most is {most:g} s")
        self.buffered.append(audio)
        self.buffered_samples += len(audio)

    async def _commit(self, final: bool) -> None:
        if not self.model_validated:
            message = "Model not validated. Make sure to validate the model by sending a session.update event."
            raise HubError("model_not_validated", message)
        if self.stream is None and (not final or self.buffered):
            await self._start()
        elif self.stream is None:
            raise HubError("invalid_event", "commit final: no audio to transcribe (send a commit, then appends)")
        if final and self.stream is not None:
            self.stream.end()
            self.ended.add(self.stream)
            self.stream = None

    async def _start(self) -> None:
        """Open a stream, as vLLM starts a generation, and feed it the audio held so far."""
        stream = self.stream = await self.session.open_stream(self.options)
        self.order.append(stream)
        buffered, self.buffered, self.buffered_samples = self.buffered, [], 0
        for audio in buffered:
            await stream.send(audio)

    def on_event(self, handle: StreamHandle, event: Any) -> None:
        # A vLLM client reads deltas until transcription.done: a stream's events wait until those of the streams
        # started before it are all out.
        self.held.setdefault(handle, [])
        if isinstance(event, Done):
            usage = VllmUsage.of(event.usage)
            self.held[handle].append(VllmDone(text=event.text, usage=usage, token_ids=list(event.token_ids)))
        elif isinstance(event, StreamError):
            if event.code != ABORTED:
                self.held[handle].append(VllmError(error=event.message, code=event.code))
        else:
            times = {"start_s": event.start_s, "end_s": event.end_s}
            self.held[handle].append(VllmDelta(delta=event.text, token_ids=list(event.token_ids), **times))
        if isinstance(event, (Done, StreamError)):
            self.finished.add(handle)
            self.ended.discard(handle)
            if self.stream is handle:  # it failed while being fed: the next commit starts another
                self.stream = None
        while self.order:
            head = self.order[0]
            for held in self.held.pop(head, []):
                self.session.emit(held)
            if head not in self.finished:
                return
            self.order.popleft()
            self.finished.discard(head)


class OpenAIDialect(Dialect):
    """OpenAI's Realtime transcription sessions, in the GA shape or the beta's: audio/pcm at 24 kHz (or 16 kHz)
    resampled to 16 kHz. Without turn detection, the first append after a commit opens an item (a stream) whose
    deltas come as the audio is decoded, and the client's commit ends it. With server VAD, the session's audio
    goes through the speech detector: each utterance is an item, opened when speech starts and committed by the
    server when it stops; audio outside speech is not transcribed."""

    name = "openai"

    def __init__(self, session: RealtimeSession) -> None:
        super().__init__(session)
        transcription = OpenAITranscription(
            model=session.settings.model_name, delay_ms=session.hub.default_delay_ms
        )  # fmt: skip
        audio_input = OpenAIAudioInput(
            format=OpenAIAudioFormat(type="audio/pcm", rate=OPENAI_RATE), transcription=transcription
        )
        self.config = OpenAISession(
            type="transcription", id=new_id("sess"), object="realtime.transcription_session",
            audio=OpenAIAudio(input=audio_input),
        )  # fmt: skip
        self.resampler = ResampleStage()
        self.stream: StreamHandle | None = None  # the open item's stream
        self.refused = False  # the open item was refused (server at capacity): its audio is dropped until a commit
        self.item_id = ""
        self.item_rate = OPENAI_RATE
        self.previous_item_id: str | None = None
        self.items: dict[StreamHandle, str] = {}  # each stream's item id, until its last event
        self.ended: set[StreamHandle] = set()
        self.heard = 0  # the session's audio so far, in 16 kHz samples
        self.vad: SpeechDetector | None = None  # server VAD's detector, while turn detection is on
        self.vad_start_ms = 0  # the session's audio before the detector's first sample

    @property
    def rate(self) -> int:
        return self.config.audio.input.format.rate

    def hello(self) -> BaseModel:
        if speaks_beta(self.session.websocket.headers):  # a beta client is greeted in the beta's shape
            return BetaSessionCreated(session=beta_session(self.config))
        return OpenAISessionCreated(session=self.config)

    def error(self, code: str, message: str, event_id: str | None = None) -> BaseModel:
        return OpenAIError(error=openai_error_detail(code, message, event_id))

    def awaiting_text(self) -> bool:
        return bool(self.ended)

    async def handle(self, event: Mapping[str, Any]) -> None:
        parsed = parse_event(OPENAI_CLIENT_EVENTS, event)
        if isinstance(parsed, OpenAISessionUpdate):
            self.session.emit(OpenAISessionUpdated(session=await self._update(parsed.session)))
        elif isinstance(parsed, BetaSessionUpdate):
            audio_format = parsed.session.input_audio_format
            if audio_format not in (None, "pcm16"):
                raise HubError("unsupported_audio_format", f"{audio_format} is not supported: send pcm16")
            config = await self._update(ga_session(parsed.session))
            self.session.emit(BetaSessionUpdated(session=beta_session(config)))
        elif isinstance(parsed, OpenAIAppend):
            await self._append(decode_pcm16(parsed.audio))
        elif parsed.type == "input_audio_buffer.commit":
            await self._commit()
        else:
            self._clear()

    async def _update(self, update: OpenAISession) -> OpenAISession:
        """Apply a session update; the effective configuration, or HubError (the session unchanged)."""
        merged = _merged(self.config.model_dump(), update.model_dump(exclude_unset=True))
        config = OpenAISession.model_validate(merged)
        audio_format = config.audio.input.format
        if audio_format.type != "audio/pcm":
            raise HubError("unsupported_audio_format", f"{audio_format.type} is not supported: send audio/pcm")
        if audio_format.rate is None:
            audio_format.rate = OPENAI_RATE
        if audio_format.rate not in OPENAI_RATES:
            rates = " or ".join(str(rate) for rate in OPENAI_RATES)
            raise HubError("unsupported_audio_format", f"audio/pcm at {audio_format.rate} Hz: send {rates} Hz")
        transcription = config.audio.input.transcription
        if transcription is None:
            transcription = config.audio.input.transcription = OpenAITranscription()
        asked = update.audio and update.audio.input and update.audio.input.transcription
        if asked and asked.delay is not None and asked.delay_ms is None:  # a named delay, as OpenAI's clients ask
            transcription.delay_ms = OPENAI_DELAYS_MS[asked.delay]
        StreamOptions(delay_ms=transcription.delay_ms)  # checks the delay now, not at the next item
        config.audio.input.noise_reduction = None
        await self._turn_detection(config.audio.input.turn_detection, audio_format.rate)
        self.config = config
        return config

    async def _turn_detection(self, detection: OpenAITurnDetection | None, rate: int) -> None:
        """Carry the input buffer over an update: turning server VAD on or off commits the open item first (the
        change applies from the next); new VAD settings apply from the next frame, a new rate from the next
        append."""
        if (detection is None) != (self.vad is None):
            await self._commit_open()
            if detection is None:
                self.resampler.finish(VAD_STREAM)  # what it holds is audio after the last utterance
                self.vad = None
            else:
                self.vad = SpeechDetector(detection.settings)
                self.vad_start_ms = self.heard * 1000 // SAMPLE_RATE
        elif self.vad is not None and detection is not None:
            self.vad.settings = detection.settings
            if rate != self.rate:  # the session's resampler starts again at the new rate, after its tail
                await self._on_speech(self._detected(self.resampler.finish(VAD_STREAM)))

    async def _append(self, audio: np.ndarray) -> None:
        if self.vad is not None:
            await self._on_speech(self._detected(self._resample(VAD_STREAM, audio, self.rate)))
            return
        if self.refused:
            return
        if self.stream is None:
            self.item_id = new_id("item")
            try:
                self.stream = await self._open_item()
            except HubError:
                self.refused = True  # one error for the item, not one for each of its appends
                raise
            self.item_rate = self.rate
        stream = self.stream  # which a failure may clear while it is fed
        pieces = [audio] if self.item_rate == VLLM_RATE else self._resample(self.item_id, audio, self.item_rate)
        for piece in pieces:
            self.heard += len(piece)
            await stream.send(piece)

    async def _open_item(self) -> StreamHandle:
        """The stream of a new item (self.item_id); HubError when the hub refuses it."""
        delay = self.config.audio.input.transcription.delay_ms
        stream = await self.session.open_stream(StreamOptions(delay_ms=delay, label="openai"))
        self.items[stream] = self.item_id
        return stream

    def _resample(self, key: str, audio: np.ndarray, rate: int) -> list[np.ndarray]:
        try:
            return self.resampler.push(key, {"samples": audio, "sample_rate": rate})
        except StageError as error:
            raise HubError("invalid_audio", str(error)) from None

    def _detected(self, pieces: list[np.ndarray]) -> list[SpeechEvent]:
        """What the speech detector makes of the session's next 16 kHz audio."""
        events = []
        for piece in pieces:
            self.heard += len(piece)
            events += self.vad.push(piece)
        return events

    async def _on_speech(self, events: list[SpeechEvent], stopped_by_client: bool = False) -> None:
        """Server VAD: an utterance's start opens an item, its audio feeds it, its end commits it."""
        for event in events:
            if isinstance(event, SpeechStarted):
                self.item_id = new_id("item")
                self.session.emit(OpenAISpeechStarted(audio_start_ms=self._ms(event.sample), item_id=self.item_id))
                try:
                    self.stream = await self._open_item()
                except HubError as error:  # this utterance is not transcribed; the next may be
                    self.session.emit(self.error(error.code, error.message))
            elif isinstance(event, SpeechAudio):
                if self.stream is not None:
                    await self.stream.send(event.samples)
            else:
                if not stopped_by_client:  # as OpenAI's, a client's commit has no speech_stopped
                    self.session.emit(OpenAISpeechStopped(audio_end_ms=self._ms(event.sample), item_id=self.item_id))
                stream, self.stream = self.stream, None
                if stream is not None:
                    self._committed(stream)

    def _ms(self, sample: int) -> int:
        """A sample number of the speech detector as ms of the session's audio."""
        return self.vad_start_ms + sample // SAMPLES_PER_MS

    async def _commit(self) -> None:
        if self.refused:
            self.refused = False
            raise HubError("server_at_capacity", "the item was refused (server at capacity): its audio was dropped")
        if self.stream is None and not (self.vad is not None and self.vad.speaking):
            raise HubError("input_audio_buffer_commit_empty", "the input audio buffer is empty: nothing to commit")
        await self._commit_open()

    async def _commit_open(self) -> None:
        """Commit the open item, if any."""
        self.refused = False
        if self.vad is not None:
            await self._on_speech(self.vad.cut(), stopped_by_client=True)
        elif self.stream is not None:
            stream, self.stream = self.stream, None
            for tail in self.resampler.finish(self.item_id):
                self.heard += len(tail)
                await stream.send(tail)
            self._committed(stream)

    def _committed(self, stream: StreamHandle) -> None:
        """End an item's audio and tell the client it is committed."""
        stream.end()
        self.ended.add(stream)
        self.session.emit(OpenAICommitted(item_id=self.item_id, previous_item_id=self.previous_item_id))
        self.previous_item_id = self.item_id

    def _clear(self) -> None:
        self.refused = False
        if self.vad is not None:
            self.vad.clear()
        if self.stream is not None:
            self.resampler.finish(self.item_id)
            self.stream.abort()
            self.stream = None
        self.session.emit(OpenAICleared())

    def on_event(self, handle: StreamHandle, event: Any) -> None:
        translated = self._translated(handle, event)
        if translated is not None:
            self.session.emit(translated)

    def _translated(self, handle: StreamHandle, event: Any) -> BaseModel | None:
        item_id = self.items[handle]
        if isinstance(event, (Done, StreamError)):
            del self.items[handle]
            self.ended.discard(handle)
            if self.stream is handle:  # it failed while being fed: the next append opens another item
                self.stream = None
                self.resampler.finish(item_id)
        if isinstance(event, Done):
            usage = TokenUsage.of(event.usage)
            token_ids = list(event.token_ids)
            return OpenAICompleted(item_id=item_id, transcript=event.text, usage=usage, token_ids=token_ids)
        if isinstance(event, StreamError):
            if event.code == ABORTED:
                return None
            return OpenAIFailed(item_id=item_id, error=openai_error_detail(event.code, event.message))
        times = {"start_s": event.start_s, "end_s": event.end_s}
        return OpenAIDelta(item_id=item_id, delta=event.text, token_ids=list(event.token_ids), **times)


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with the fields `update` sets, nested objects merged field by field (as session.update does)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


DIALECTS: dict[str, type[Dialect]] = {"vllm": VllmDialect, "openai": OpenAIDialect}


class RealtimeSession:
    """One WebSocket connection: its dialect, its streams, the tasks that carry their events to the client."""

    def __init__(self, websocket: WebSocket, hub: StreamHub, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.websocket = websocket
        self.hub = hub
        self.settings = settings
        self.metrics = metrics
        self.dialect: Dialect = DIALECTS[guess_dialect(websocket.query_params, websocket.headers)](self)
        self.outgoing: asyncio.Queue[str | None] = asyncio.Queue(maxsize=settings.max_outgoing_events)
        self.streams: set[StreamHandle] = set()
        self.tasks: set[asyncio.Task] = set()
        self.events_seen = 0
        self.stop = asyncio.Event()
        self.closing: tuple[int, str, str] | None = None  # (close code, error code, message) once it must end
        self.disconnected = False

    async def run(self) -> None:
        """Serve the connection until the client leaves or breaks a bound; its streams end with it."""
        await self.websocket.accept()
        refusal = self._refusal()
        if refusal is not None:
            code, message = refusal
            await self._send_now(self.dialect.error(code, message))
            await self._close_frame(TRY_AGAIN_LATER, message)
            return
        self.metrics.sessions.labels("realtime").inc()
        self.metrics.active_sessions.inc()
        writer = asyncio.create_task(self._write())
        try:
            self.emit(self.dialect.hello())
            await self._read()
        except Exception as error:  # a bug of this server's: this session ends, the others go on
            logger.exception("realtime session failed")
            self._end(INTERNAL_ERROR, "internal_error", f"the server failed: {type(error).__name__}")
        finally:
            for handle in list(self.streams):
                handle.abort()
            for task in list(self.tasks):
                task.cancel()
            await self._finish(writer)
            self.metrics.active_sessions.dec()

    def _refusal(self) -> tuple[str, str] | None:
        if not self.hub.ready:
            return "server_not_ready", "server not ready: try again later"
        if self.hub.active >= self.hub.capacity:
            self.metrics.refused.inc()
            return "server_at_capacity", f"server at capacity ({self.hub.capacity} streams in use); try again later"
        return None

    async def open_stream(self, options: StreamOptions) -> StreamHandle:
        """A new stream of this session, its events carried to the client; HubError when the hub refuses."""
        try:
            handle = await self.hub.open(options)
        except HubError as error:
            if error.code == "server_at_capacity":
                self.metrics.refused.inc()
            raise
        self.streams.add(handle)
        task = asyncio.create_task(self._pump(handle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return handle

    def emit(self, event: BaseModel) -> None:
        """Queue an event for the client; a client this far behind is closed (its queue is full)."""
        if self.closing is not None:
            return
        try:
            self.outgoing.put_nowait(event.model_dump_json())
        except asyncio.QueueFull:
            waiting = self.outgoing.qsize()
            self._end(POLICY_VIOLATION, "slow_reader", f"client reads too slowly: {waiting} events waiting")

    def _end(self, close_code: int, error_code: str, message: str) -> None:
        """End the session: its streams are aborted now, the client told (if it can be) and closed."""
        if self.closing is None:
            self.closing = (close_code, error_code, message)
            for handle in list(self.streams):
                handle.abort()
            self.stop.set()

    async def _pump(self, handle: StreamHandle) -> None:
        async for event in handle.events():
            if isinstance(event, Done):
                self.metrics.audio_seconds.inc(event.usage.audio_s)
                self.metrics.tokens.inc(event.usage.tokens)
            elif not isinstance(event, StreamError):
                self.metrics.token_latency.observe(event.latency_s)
            self.dialect.on_event(handle, event)
        self.streams.discard(handle)

    async def _read(self) -> None:
        receive: asyncio.Future | None = None
        stop = asyncio.ensure_future(self.stop.wait())
        try:
            while self.closing is None:
                if receive is None:
                    receive = asyncio.ensure_future(self.websocket.receive())
                timeout = self.settings.idle_timeout_s
                done, _ = await asyncio.wait({receive, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:  # ended, or the client is gone (a send to it failed)
                    return
                if not done:
                    if not self.dialect.awaiting_text():
                        self._end(POLICY_VIOLATION, "idle_timeout", f"no event for {timeout:g} s: session closed")
                    continue
                message, receive = receive.result(), None
                if message["type"] == "websocket.disconnect":
                    self.disconnected = True
                    return
                await self._on_message(message)
        finally:
            stop.cancel()
            if receive is not None:
                receive.cancel()

    async def _on_message(self, message: Mapping[str, Any]) -> None:
        text = message.get("text")
        event_id = None
        try:
            if text is None:
                raise HubError("invalid_json", "binary messages are not events: send each event as JSON text")
            if len(text) > self.settings.max_message_bytes:
                limit = self.settings.max_message_bytes
                raise HubError("message_too_large", f"a message of {len(text)} bytes is over the {limit}-byte limit")
            try:
                event = json.loads(text)
            except ValueError as error:
                raise HubError("invalid_json", f"Invalid JSON ({error})") from None
            if not isinstance(event, dict):
                raise HubError("invalid_json", "an event must be a JSON object")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            self.events_seen += 1
            if self.events_seen == 1:
                self._settle_dialect(event)
            await self.dialect.handle(event)
        except HubError as error:
            self.emit(self.dialect.error(error.code, error.message, event_id))

    def _settle_dialect(self, event: Mapping[str, Any]) -> None:
        """Switch to the dialect a first update is written in, if the connection suggested the other."""
        name = dialect_of_update(event)
        if name is not None and name != self.dialect.name:
            self.dialect = DIALECTS[name](self)

    async def _write(self) -> None:
        try:
            while True:
                text = await self.outgoing.get()
                if text is None:
                    return
                await self.websocket.send_text(text)
        except Exception:  # the client is gone (reset, closed): reading sees it and ends the session
            self.disconnected = True
            self.stop.set()

    async def _finish(self, writer: asyncio.Task) -> None:
        """Flush what the client can still take, tell it why the session ends, and close the socket."""
        if self.disconnected:
            writer.cancel()
            return
        close_code, message = 1000, ""
        if self.closing is not None:
            close_code, error_code, message = self.closing
            if error_code != "slow_reader":  # a slow reader's queue is full: only the close frame can reach it
                with contextlib.suppress(asyncio.QueueFull):
                    self.outgoing.put_nowait(self.dialect.error(error_code, message).model_dump_json())
        with contextlib.suppress(asyncio.QueueFull):
            self.outgoing.put_nowait(None)
        if self.closing is not None and self.closing[1] == "slow_reader":
            writer.cancel()
        await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S)
        writer.cancel()
        await self._close_frame(close_code, message)

    async def _send_now(self, event: BaseModel) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.send_text(event.model_dump_json()), CLOSE_TIMEOUT_S)

    async def _close_frame(self, code: int, reason: str) -> None:
        reason = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.websocket.close(code, reason), CLOSE_TIMEOUT_S)
