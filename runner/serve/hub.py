"""The stream hub a server talks to: open a stream with its options, send it 16 kHz mono audio, end or abort it,
and read its events. `InProcessHub` steps the model's stage cores in one worker thread of this process."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxtral_run.stages.audio.constants import (
    MAX_DELAY_MS,
    MIN_DELAY_MS,
    MS_PER_TOKEN,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    token_aligned_delay_ms,
)
from voxtral_run.stages.audio.mel import CENTER_PAD
from voxtral_run.stages.base import END, Output, Stage, StreamEnd, StreamFailed, StreamStart, Work
from voxtral_run.stages.factory import MODEL_STAGE_KINDS, build_stage
from voxtral_run.stages.transcribe import MODEL_CHAIN

MAX_LABEL_CHARS = 200
DEFAULT_MAX_PENDING_S = 2.0  # audio a stream may have waiting for the worker before `send` holds its caller back
ABORTED = "aborted"


class HubError(Exception):
    """A one-line refusal or misuse, with a code a protocol can pass on (server_at_capacity, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StreamOptions:
    """A stream's own settings: its delay (None: the hub's default) and a label naming it in logs."""

    delay_ms: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        delay = self.delay_ms
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int)):
            raise HubError("invalid_event", f"delay_ms must be a whole number of ms, got {delay!r}")
        if delay is not None and not MIN_DELAY_MS <= delay <= MAX_DELAY_MS:
            raise HubError("invalid_event", f"delay_ms={delay} is outside {MIN_DELAY_MS}..{MAX_DELAY_MS} ms")
        if len(self.label) > MAX_LABEL_CHARS or not self.label.isprintable():
            raise HubError("invalid_event", f"label must be at most {MAX_LABEL_CHARS} printable characters")


@dataclass(frozen=True)
class TextDelta:
    """Text as soon as it is complete, the audio it describes (seconds from the stream's start), the ids since
    the previous delta, and how long after its audio and the delay had arrived it came (`latency_s`)."""

    text: str
    start_s: float
    end_s: float
    token_ids: tuple[int, ...]
    latency_s: float


@dataclass(frozen=True)
class Usage:
    """What a stream used: seconds of audio received and ids generated (specials included)."""

    audio_s: float
    tokens: int

    @property
    def audio_tokens(self) -> int:
        """The audio's 80 ms positions."""
        return math.ceil(round(self.audio_s * SAMPLE_RATE) / SAMPLES_PER_TOKEN)


@dataclass(frozen=True)
class Done:
    """The end of a stream: the whole text, every id generated, and the usage."""

    text: str
    token_ids: tuple[int, ...]
    usage: Usage


@dataclass(frozen=True)
class StreamError:
    """A stream given up on: a code (stream_failed, aborted, internal_error, server_shutting_down) and why."""

    code: str
    message: str


StreamEvent = TextDelta | Done | StreamError


class AudioClock:
    """When each part of a stream's audio arrived, to time its text: the latency of text ending at `end_s` counts
    from the arrival of the audio the model needed for it (up to `end_s` plus the delay, plus the log-mel's
    look-ahead), or from the stream's end when that audio is the right pad."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.samples = 0
        self._arrivals: deque[tuple[int, float]] = deque()  # (samples received after a chunk, when it came)
        self._last_s = time.monotonic()
        self._ended_s: float | None = None

    def arrived(self, num_samples: int, now_s: float) -> None:
        """Note a chunk of `num_samples` arriving at `now_s` (monotonic seconds)."""
        self.samples += num_samples
        self._arrivals.append((self.samples, now_s))
        self._last_s = now_s

    def ended(self, now_s: float) -> None:
        """Note the end of the stream's audio."""
        self._ended_s = now_s

    def latency_s(self, end_s: float, now_s: float) -> float:
        """Seconds from the arrival of the audio text ending at `end_s` waited for, to `now_s`."""
        due = round((end_s + self.delay_s) * SAMPLE_RATE) + CENTER_PAD
        # Text comes in time order, so arrivals before the one it waited for are never needed again.
        while self._arrivals and self._arrivals[0][0] < due:
            self._arrivals.popleft()
        if self._arrivals:
            since = self._arrivals[0][1]
        else:
            since = self._last_s if self._ended_s is None else self._ended_s
        return max(0.0, now_s - since)


class StreamHandle(ABC):
    """One stream in a hub, used from the event loop that opened it."""

    id: str
    options: StreamOptions

    @abstractmethod
    async def send(self, audio: np.ndarray) -> bool:
        """Queue 16 kHz mono float32 samples, waiting while the stream has too much audio queued; False once the
        stream is over (failed or aborted), when the audio is dropped."""

    @abstractmethod
    def end(self) -> None:
        """End the stream's audio: its last text and its Done follow."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the stream now, freeing its state in every stage; no event follows but a StreamError(aborted)."""

    @abstractmethod
    async def next_event(self) -> StreamEvent:
        """The stream's next event; a Done or StreamError is its last."""

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The stream's events up to and including its Done or StreamError."""
        while True:
            event = await self.next_event()
            yield event
            if not isinstance(event, TextDelta):
                return


class QueuedHandle(StreamHandle):
    """What both hubs' handles share: their state, the events queued on the loop that opened the stream, the
    wait for room before audio is taken, and the stage outputs turned into events."""

    def __init__(self, hub: StreamHub, stream_id: str, options: StreamOptions, loop: asyncio.AbstractEventLoop):
        self.id = stream_id
        self.options = options
        self.loop = loop
        self._clock = AudioClock(hub.delay_s(options))
        self._events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._room = asyncio.Event()
        self._state = "open"  # then "ended" (audio over, text still coming) and "over" (no more events)

    @abstractmethod
    def _has_room(self) -> bool:
        """Whether the hub takes more of this stream's audio now."""

    def _accepted(self, audio: np.ndarray) -> np.ndarray:
        """The samples `send` was given, checked; HubError for audio after the stream's end or malformed audio."""
        if self._state == "ended":
            raise HubError("invalid_event", f"stream {self.id}: audio after its end")
        return checked_audio(audio)

    async def _wait_for_room(self) -> bool:
        """Wait while the stream has too much audio waiting; whether it is still open."""
        while self._state == "open" and not self._has_room():
            self._room.clear()
            # The worker sets _room on this loop after taking the stream's audio: checking again after clear()
            # sees any take that happened before, and a later one sets the event.
            if self._has_room():
                break
            await self._room.wait()
        return self._state == "open"

    async def next_event(self) -> StreamEvent:
        return await self._events.get()

    def _text_event(self, item: dict, now: float) -> None:
        """A detokenize event as the stream's TextDelta, or its Done (its last event)."""
        ids = tuple(int(token_id) for token_id in item.get("token_ids", ()))
        if item["type"] == "done":
            self._finish(Done(item["text"], ids, Usage(self._clock.samples / SAMPLE_RATE, len(ids))))
        else:
            latency = self._clock.latency_s(item["end_s"], now)
            self._events.put_nowait(TextDelta(item["text"], item["start_s"], item["end_s"], ids, latency))

    def _finish(self, event: StreamEvent) -> None:
        if self._state != "over":
            self._state = "over"
            self._events.put_nowait(event)
            self._room.set()

    def _wake(self) -> None:
        self._room.set()


class StreamHub(ABC):
    """Where streams are transcribed: many at once, up to `capacity`."""

    _capacity: int
    _default_delay_ms: int

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether new streams are taken."""

    @property
    @abstractmethod
    def active(self) -> int:
        """Streams open, counting aborted ones until their state is freed."""

    @property
    def capacity(self) -> int:
        """The most streams open at once."""
        return self._capacity

    @property
    def default_delay_ms(self) -> int:
        """The delay of a stream whose options name none."""
        return self._default_delay_ms

    def refuse_if_full(self, error: str, open_streams: int) -> None:
        """The HubError a new stream gets now, if any: server_not_ready after `error`, server_at_capacity with
        `open_streams` open."""
        if error:
            raise HubError("server_not_ready", f"server not ready: {error}")
        if open_streams >= self._capacity:
            in_use = f"{open_streams} of {self._capacity} streams in use"
            raise HubError("server_at_capacity", f"server at capacity ({in_use}); try again later")

    @abstractmethod
    async def open(self, options: StreamOptions) -> StreamHandle:
        """A new stream, bound to the running event loop; HubError server_at_capacity past `capacity`, or
        server_not_ready."""

    @abstractmethod
    def close(self) -> None:
        """Stop taking streams, end the open ones with StreamError(server_shutting_down) and free their state."""

    def delay_s(self, options: StreamOptions) -> float:
        """A stream's delay in seconds, rounded up to whole tokens as the model rounds it."""
        delay = self.default_delay_ms if options.delay_ms is None else options.delay_ms
        return token_aligned_delay_ms(delay) / 1000


def _aligned_pieces(samples: np.ndarray, offset: int) -> list[np.ndarray]:
    """Samples cut at the stream's 80 ms boundaries (it has `offset` samples before them), so each piece is one
    step of the model stages."""
    first = (-offset) % SAMPLES_PER_TOKEN
    cuts = [cut for cut in range(first, len(samples), SAMPLES_PER_TOKEN) if cut > 0]
    return np.split(samples, cuts)


def checked_audio(audio: object) -> np.ndarray:
    """Audio a hub takes: 1-D float samples; anything else is a HubError naming what it got."""
    samples = np.asarray(audio)
    if samples.ndim != 1 or samples.dtype.kind != "f":
        raise HubError("invalid_audio", f"audio must be 1-D float samples, got {samples.dtype} {list(samples.shape)}")
    if not np.isfinite(samples).all():
        raise HubError("invalid_audio", "audio contains NaN or infinite samples")
    return samples.astype(np.float32, copy=False)


class _InProcessHandle(QueuedHandle):
    def __init__(self, hub: InProcessHub, stream_id: str, options: StreamOptions, loop: asyncio.AbstractEventLoop):
        super().__init__(hub, stream_id, options, loop)
        self._hub = hub

    def _has_room(self) -> bool:
        return self._hub._pending_samples(self.id) <= self._hub.max_pending_samples

    async def send(self, audio: np.ndarray) -> bool:
        samples = self._accepted(audio)
        if not await self._wait_for_room():
            return False
        if len(samples):
            self._hub._submit(self.id, samples, self._clock.samples)
            self._clock.arrived(len(samples), time.monotonic())
        return True

    def end(self) -> None:
        if self._state == "open":
            self._state = "ended"
            self._clock.ended(time.monotonic())
            self._hub._submit(self.id, END, self._clock.samples)

    def abort(self) -> None:
        if self._state != "over":
            self._hub._submit(self.id, StreamFailed(ABORTED), self._clock.samples)
            self._finish(StreamError(ABORTED, f"stream {self.id} aborted"))

    def _receive(self, items: list[Any]) -> None:
        """The stream's outputs of one worker step (on the loop): detokenize events, then END or a failure."""
        now = time.monotonic()
        for item in items:
            if self._state == "over":
                return
            if isinstance(item, StreamFailed):
                self._finish(StreamError("stream_failed", item.message))
            elif isinstance(item, dict) and item["type"] in ("delta", "done"):
                self._text_event(item, now)


class InProcessHub(StreamHub):
    """The mel, encoder, decoder and detokenize stage cores of this process, stepped by one worker thread: each
    tick takes all the work waiting and calls each stage's `step` once over it, as the batched stages want."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        capacity: int | None = None,
        max_pending_s: float = DEFAULT_MAX_PENDING_S,
    ) -> None:
        names = tuple(stage.name for stage in stages)
        if names != MODEL_CHAIN:
            raise HubError("invalid_setting", f"stages must be {', '.join(MODEL_CHAIN)}; got {', '.join(names)}")
        ceiling = min(stage.max_streams for stage in stages if stage.name in MODEL_STAGE_KINDS)
        if capacity is None:
            capacity = ceiling
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= ceiling:
            raise HubError("invalid_setting", f"capacity must be 1..{ceiling} (the model stages' max_streams)")
        if not 0 < max_pending_s <= 60:
            raise HubError("invalid_setting", f"max_pending_s must be in (0, 60], got {max_pending_s!r}")
        self.stages = list(stages)
        self.max_pending_samples = round(max_pending_s * SAMPLE_RATE)
        self._capacity = capacity
        self._default_delay_ms = round(stages[MODEL_CHAIN.index("decoder")].num_delay_tokens * MS_PER_TOKEN)
        self._lock = threading.Condition()
        self._inbox: list[Work] = []
        self._pending: dict[str, int] = {}  # samples in the inbox per stream
        self._handles: dict[str, _InProcessHandle] = {}  # streams holding state, by id
        self._numbers = itertools.count()
        self._error = ""  # why the hub stopped taking streams
        self._step_lock = threading.Lock()  # held while the stages step, so their streams are read between ticks
        self._worker = threading.Thread(target=self._run, name="voxtral-serve-hub", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        device: str = "cpu",
        delay_ms: int | None = None,
        max_streams: int | None = None,
        max_pending_s: float = DEFAULT_MAX_PENDING_S,
    ) -> InProcessHub:
        """The stage cores of a model directory on a device, the model stages batching up to `max_streams`."""
        params = {} if max_streams is None else {"max_streams": max_streams}
        stages = [
            build_stage(
                kind,
                model_dir=model_dir,
                device=device,
                delay_ms=delay_ms,
                params=params if kind in MODEL_STAGE_KINDS else None,
            )
            for kind in MODEL_CHAIN
        ]
        return cls(stages, max_pending_s=max_pending_s)

    @property
    def ready(self) -> bool:
        return not self._error

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._handles)

    async def open(self, options: StreamOptions) -> StreamHandle:
        loop = asyncio.get_running_loop()
        with self._lock:
            self.refuse_if_full(self._error, len(self._handles))
            stream_id = f"{options.label or 'stream'}#{next(self._numbers)}"
            handle = self._handles[stream_id] = _InProcessHandle(self, stream_id, options, loop)
            self._inbox.append((stream_id, StreamStart(options.delay_ms)))
            self._lock.notify()
        return handle

    def close(self) -> None:
        with self._lock:
            if not self._error:
                self._error = "shutting down"
            handles = list(self._handles.values())
            for handle in handles:
                self._inbox.append((handle.id, StreamFailed("server shutting down")))
            self._lock.notify()
        for handle in handles:
            _post(handle, handle._finish, StreamError("server_shutting_down", "the server is shutting down"))
        self._worker.join()

    def held_streams(self) -> list[str]:
        """Ids of the streams any stage holds state for, read between ticks."""
        with self._step_lock:
            return sorted({stream_id for stage in self.stages for stream_id in stage.streams()})

    def _pending_samples(self, stream_id: str) -> int:
        with self._lock:
            return self._pending.get(stream_id, 0)

    def _submit(self, stream_id: str, item: Any, offset: int) -> None:
        """Queue a stream's audio (cut at its 80 ms boundaries; it has `offset` samples before) or marker."""
        with self._lock:
            if stream_id not in self._handles:  # over already (failed in a stage, or the hub closed)
                return
            if isinstance(item, np.ndarray):
                self._inbox.extend((stream_id, piece) for piece in _aligned_pieces(item, offset))
                self._pending[stream_id] = self._pending.get(stream_id, 0) + len(item)
            else:
                self._inbox.append((stream_id, item))
            self._lock.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._inbox and not self._error:
                        self._lock.wait()
                    if not self._inbox:
                        return
                    work, self._inbox = self._inbox, []
                    woken = [self._handles[stream_id] for stream_id in self._pending if stream_id in self._handles]
                    self._pending.clear()
                for handle in woken:
                    _post(handle, handle._wake)
                with self._step_lock:
                    outputs = self._step(work)
                self._deliver(outputs)
        except Exception as error:  # a stage's own bug: no stream can be trusted to go on
            self._fail_all(f"{type(error).__name__}: {' '.join(str(error).split())}")

    def _step(self, work: list[Work]) -> list[Output]:
        """One tick: each stage's step once, over the previous stage's outputs; every stage sees each new stream's
        StreamStart (its options) before the stream's first item."""
        starts = [(stream_id, item) for stream_id, item in work if isinstance(item, StreamStart)]
        for index, stage in enumerate(self.stages):
            work = stage.step(work if index == 0 else starts + work)
        return work

    def _deliver(self, outputs: list[Output]) -> None:
        by_stream: dict[str, list[Any]] = {}
        for stream_id, item in outputs:
            by_stream.setdefault(stream_id, []).append(item)
        with self._lock:
            for stream_id, items in by_stream.items():
                handle = self._handles.get(stream_id)
                if handle is None:
                    continue
                if any(isinstance(item, (StreamEnd, StreamFailed)) for item in items):
                    del self._handles[stream_id]
                    self._pending.pop(stream_id, None)
                _post(handle, handle._receive, items)

    def _fail_all(self, why: str) -> None:
        with self._lock:
            self._error = why
            handles = list(self._handles.values())
            self._handles.clear()
            self._pending.clear()
            self._inbox.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("internal_error", f"the transcription worker failed: {why}"))


def _post(handle: _InProcessHandle, callback: Callable[..., None], *args: Any) -> None:
    """Run a handle's callback on its event loop, from any thread; a loop that is closed has no one to tell."""
    try:
        handle.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
