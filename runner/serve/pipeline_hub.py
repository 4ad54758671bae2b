"""The hub of `voxtral-run serve`: the pipeline's stages started once, one process each, with this process in the
places of the capture and the output.

A worker thread feeds the queue out of the capture as the capture does (each stream's audio in chunks of the
capture's size, numbered, the stream's options on its first message, then its end or its failure) and reads the
queue into the output as the sink does, handing each stream's events to its handle. It never waits on a queue:
it sends only with a credit in hand, and reads every event as it comes, so a slow client or a full queue stalls
no one else. Streams past the stages' ceiling are refused when opened; a stage's own refusal at capacity
reaches the stream as `server_at_capacity`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from rich.console import Console

from voxtral_run.runner.config import SOURCE, Pipeline, model_stage_ceiling, place_local_stages
from voxtral_run.runner.edges import EdgeSender, Policy
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.metrics import RunFigures
from voxtral_run.runner.serve.hub import (
    ABORTED,
    DEFAULT_MAX_PENDING_S,
    HubError,
    QueuedHandle,
    StreamError,
    StreamHandle,
    StreamHub,
    StreamOptions,
)
from voxtral_run.runner.sink import check_event
from voxtral_run.runner.stage_process import MAX_MESSAGES_PER_STEP, describe_exception
from voxtral_run.runner.supervisor import Reporting, Supervisor
from voxtral_run.runner.wire import MAX_INPUT_CHARS, MAX_MESSAGE_CHARS, Envelope, Kind, printable_line
from voxtral_run.stages.audio.capture import DEFAULT_CHUNK_MS, MAX_STREAMS, frames_per_chunk
from voxtral_run.stages.audio.constants import MS_PER_TOKEN, SAMPLE_RATE, delay_tokens
from voxtral_run.stages.base import END, StreamEnd, StreamFailed
from voxtral_run.stages.text.tekken import TEKKEN_FILE, load_tekken

DEFAULT_MAX_EVENTS = 1024  # events a stream may hold unread; past them its reader is too slow and it is dropped
MAX_PENDING_S = 60.0
REPORT_TIMEOUT_S = 5.0  # how long `held_streams` waits for the stages' answers
# A model stage's refusal of a new stream at its ceiling (stages/model_stages.py), as the stage process words it.
AT_CAPACITY = re.compile(r"^stage '[^']+' failed: \w+ at capacity \(")
SHUTTING_DOWN = "shutting down"
QUIET = Reporting(quiet=True)  # a hub's reporting unless told: no start-up progress


@dataclass
class _Stream:
    """A stream between its opening and the moment no stage holds it: what waits to go into the pipeline (audio
    with its arrival time, then its end), where its input stands, and whether its output has ended."""

    handle: _PipelineHandle
    options: dict[str, Any]  # the wire options of its first message
    audio: deque[tuple[np.ndarray, float]] = field(default_factory=deque)  # (samples, wall clock of arrival)
    pending: int = 0  # samples in `audio`
    sent: int = 0  # samples put on the wire
    seq: int = 0  # the next message's sequence number
    ending: tuple[Kind, str] | None = None  # the end to send once its audio is out: EOS, or FAILED and why
    input_closed: bool = False  # its end or failure went on the wire
    output_closed: bool = False  # its end or failure came out of the last stage
    wants_room: bool = False  # its sender waits for its pending audio to go down


class _PipelineHandle(QueuedHandle):
    """One stream of a PipelineHub, used from the event loop that opened it."""

    def __init__(self, hub: PipelineHub, stream_id: str, options: StreamOptions, loop: asyncio.AbstractEventLoop):
        super().__init__(hub, stream_id, options, loop)
        self._hub = hub

    def _has_room(self) -> bool:
        return self._hub._has_room(self.id)

    async def send(self, audio: np.ndarray) -> bool:
        # A copy: the audio waits here, read by the worker, while the caller may reuse its buffer.
        samples = np.array(self._accepted(audio), dtype=np.float32)
        if not await self._wait_for_room():
            return False
        if len(samples):
            self._clock.arrived(len(samples), time.monotonic())
            self._hub._submit(self.id, samples)
        return True

    def end(self) -> None:
        if self._state == "open":
            self._state = "ended"
            self._clock.ended(time.monotonic())
            self._hub._end(self.id)

    def abort(self) -> None:
        self._give_up(StreamError(ABORTED, f"stream {self.id} aborted"), ABORTED)

    def _give_up(self, event: StreamError, why: str) -> None:
        """End the stream at once: every stage drops it, what still comes of it is dropped, `event` is its last."""
        if self._state != "over":
            self._hub._abort(self.id, why)
            self._finish(event)

    def _receive(self, items: list[Any], now: float) -> None:
        """The stream's outputs of the last stage (on the loop): events, then END or its failure in a stage."""
        for item in items:
            if self._state == "over":
                return
            if isinstance(item, StreamFailed):
                code = "server_at_capacity" if AT_CAPACITY.match(item.message) else "stream_failed"
                self._finish(StreamError(code, item.message))
            elif isinstance(item, StreamEnd):  # with no done event before it
                self._finish(StreamError("internal_error", f"stream {self.id}: the pipeline ended it without its text"))
            else:
                self._take_event(item, now)

    def _take_event(self, event: Any, now: float) -> None:
        try:
            check_event(event)
        except RunnerError as error:
            self._give_up(StreamError("internal_error", str(error)), "malformed event")
            return
        if event["type"] != "done" and self._events.qsize() >= self._hub.max_events:
            unread = f"stream {self.id}: {self._events.qsize()} events unread, the stream was dropped"
            self._give_up(StreamError("slow_reader", unread), "its events were not read")
        else:
            self._text_event(event, now)


class PipelineHub(StreamHub):
    """A pipeline's stages (from its pipeline.yaml, settings applied) started once, each in its own process, with
    this process feeding the queue out of the capture and reading the one into the output."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        model_dir: Path,
        console: Console | None = None,
        reporting: Reporting = QUIET,
        capacity: int | None = None,
        max_pending_s: float = DEFAULT_MAX_PENDING_S,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        """Start the stages; return once each is ready and the queues linked (else RunnerError, nothing left running;
        Interrupted on Ctrl-C). `capacity` (default: the model stages' max_streams) past theirs waits or is refused."""
        source_queue = next(queue for queue in pipeline.queues if queue.source == SOURCE)
        if source_queue.policy is not Policy.BLOCK:
            raise RunnerError(
                f"queue {SOURCE} -> {source_queue.target}: policy {source_queue.policy.value} drops audio; serve "
                "holds its clients back instead (policy block)"
            )
        place_local_stages(pipeline, pipeline.chain())
        if capacity is None:
            capacity = min(model_stage_ceiling(pipeline) or MAX_STREAMS, MAX_STREAMS)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_STREAMS:
            raise HubError("invalid_setting", f"capacity must be 1..{MAX_STREAMS}, got {capacity!r}")
        if not 0 < max_pending_s <= MAX_PENDING_S:
            raise HubError("invalid_setting", f"max_pending_s must be in (0, {MAX_PENDING_S:g}], got {max_pending_s!r}")
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise HubError("invalid_setting", f"max_events must be a whole number >= 1, got {max_events!r}")
        self._capacity = capacity
        self.max_pending_samples = round(max_pending_s * SAMPLE_RATE)
        self.max_events = max_events
        delay_ms = pipeline.delay_ms
        if delay_ms is None:
            delay_ms = load_tekken(Path(model_dir) / TEKKEN_FILE).audio.transcription_delay_ms
        self._default_delay_ms = round(delay_tokens(delay_ms) * MS_PER_TOKEN)
        self._chunk = frames_per_chunk(SAMPLE_RATE, pipeline.stages[SOURCE].params.get("chunk_ms", DEFAULT_CHUNK_MS))
        self._supervisor = Supervisor(
            pipeline,
            local=pipeline.chain(),
            model_dir=Path(model_dir),
            sink=None,
            console=console or Console(stderr=True),
            reporting=dataclasses.replace(reporting, live_figures=True),
            serve=True,
        )
        self._lock = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # from opening until no stage holds it
        self._turns: deque[str] = deque()  # streams with a chunk or an end to send, taking turns
        self._queued: set[str] = set()  # the streams in _turns
        self._numbers = itertools.count()
        self._run = uuid.uuid4().hex[:8]  # stream ids are this hub's own: the queues refuse an id reused
        self._error = ""  # why no stream is taken: the hub failed or is shutting down
        self.failure: str | None = None  # why the hub failed (a stage died, a queue broke), for its owner
        self._asked = 0  # the latest request for the stages' reports (`held_streams`)
        self._answered = 0  # the latest request every stage answered
        self._linked = threading.Event()  # both queues of this process are up: ready
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        try:
            with self._supervisor.counting_signals():
                self._supervisor.start()
        except BaseException:
            self._supervisor.stop()
            self._close_wake()
            raise
        self._worker = threading.Thread(target=self._serve, name="voxtral-serve-pipeline", daemon=True)
        self._worker.start()
        try:
            self._wait_linked(pipeline.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_linked(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._linked.wait(0.05):
            if self._stopped.is_set():
                raise RunnerError(self.failure or "the stages stopped while starting")
            if time.monotonic() > deadline:
                raise RunnerError(f"the stages' queues not linked after {timeout_s:g} s (startup_timeout_s)")

    # --- the StreamHub interface ---

    @property
    def ready(self) -> bool:
        return self._linked.is_set() and not self._error

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._streams)

    async def open(self, options: StreamOptions) -> StreamHandle:
        loop = asyncio.get_running_loop()
        with self._lock:
            self.refuse_if_full(self._error, len(self._streams))
            stream_id = f"{self._run}-{next(self._numbers)}"
            handle = _PipelineHandle(self, stream_id, options, loop)
            wire_options: dict[str, Any] = {} if options.delay_ms is None else {"delay_ms": options.delay_ms}
            if options.label:
                wire_options["input"] = printable_line(options.label, MAX_INPUT_CHARS)
            self._streams[stream_id] = _Stream(handle, wire_options)
        return handle

    def close(self) -> None:
        """Stop taking streams, end the open ones with StreamError(server_shutting_down), stop the stages."""
        with self._lock:
            self._error = self._error or SHUTTING_DOWN
            handles = [stream.handle for stream in self._streams.values()]
            self._streams.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("server_shutting_down", "the server is shutting down"))
        self._stopping.set()
        self._wake()
        self._worker.join()

    # --- what the command and the tests read ---

    @property
    def ready_s(self) -> float:
        """How long the stages took to be ready."""
        return self._supervisor.ready_s or 0.0

    @property
    def stage_names(self) -> list[str]:
        """The stages started, in data order."""
        return list(self._supervisor.stages)

    def figures(self) -> RunFigures:
        """The stages' latest figures and the latency of text at this end (for /metrics and the tables)."""
        return self._supervisor.figures()

    def report(self) -> None:
        """Once closed: the table of figures (unless quiet) and the JSON figures where asked for."""
        self._supervisor.report()

    def held_streams(self) -> list[str]:
        """What the stage processes keep of any stream now, from reports they send when asked: a line 'STAGE: PART
        N' per part holding N streams (the core, the process, its queues); [] when nothing, or once stopped."""
        with self._lock:
            if self._stopped.is_set():
                return []
            self._asked += 1
            asked = self._asked
        self._wake()
        with self._lock:
            answered = self._lock.wait_for(lambda: self._answered >= asked or self._stopped.is_set(), REPORT_TIMEOUT_S)
        if self._stopped.is_set():
            return []
        if not answered:
            return [f"no answer from every stage within {REPORT_TIMEOUT_S:g} s"]
        stages = self.figures().stages
        return [
            f"{name}: {part} {count}"
            for name, report in stages.items()
            for part, count in report.get("streams", {}).items()
            if count and part != "input_remembered"  # ended ids a queue remembers to refuse them: no state
        ]

    # --- the event loops' side ---

    def _has_room(self, stream_id: str) -> bool:
        """Whether the stream may queue more audio; if not, its sender is woken once it may."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.pending <= self.max_pending_samples:
                return True
            stream.wants_room = True
            return False

    def _submit(self, stream_id: str, samples: np.ndarray) -> None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.ending is not None:  # over already (failed, or the hub closed)
                return
            stream.audio.append((samples, time.time()))
            stream.pending += len(samples)
            queued = self._queue(stream_id, stream)
        if queued:
            self._wake()

    def _end(self, stream_id: str) -> None:
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or stream.ending is not None:
                return
            stream.ending = (Kind.EOS, "")
            self._queue(stream_id, stream)
        self._wake()

    def _abort(self, stream_id: str, why: str) -> None:
        """End a stream's input now, its audio still waiting dropped: the stages drop it as they take the failure."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            if stream.seq == 0 and not stream.input_closed:  # nothing of it went into the pipeline
                del self._streams[stream_id]
                return
            self._end_input(stream_id, stream, why)
        self._wake()

    def _end_input(self, stream_id: str, stream: _Stream, why: str) -> None:
        """(Locked.) Replace what waits of a stream's input by its failure, sent before the other streams' turns."""
        if stream.input_closed:
            return
        stream.audio.clear()
        stream.pending = 0
        stream.ending = (Kind.FAILED, printable_line(why, MAX_MESSAGE_CHARS))
        if stream_id in self._queued:
            self._turns.remove(stream_id)
        self._queued.add(stream_id)
        self._turns.appendleft(stream_id)

    def _queue(self, stream_id: str, stream: _Stream) -> bool:
        """(Locked.) Give the stream a turn if it has something to send and none yet; whether it got one."""
        if stream_id in self._queued or not self._has_output(stream):
            return False
        self._queued.add(stream_id)
        self._turns.append(stream_id)
        return True

    def _has_output(self, stream: _Stream) -> bool:
        """Whether a stream has a message to send: its audio up to its next chunk boundary, or its end."""
        if stream.input_closed:
            return False
        return stream.pending >= self._chunk - stream.sent % self._chunk or stream.ending is not None

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except OSError:  # full (a wake-up is waiting already), or closed with the hub
            pass

    def _close_wake(self) -> None:
        self._wake_read.close()
        self._wake_write.close()

    # --- the worker ---

    def _serve(self) -> None:
        """The worker: watch the stages, send what waits while the queue gives credit, route what comes out."""
        supervisor = self._supervisor
        sender = EdgeSender(supervisor.context, supervisor.source_edge, keys=supervisor.keys)
        receiver = supervisor.sink_receiver
        supervisor.poller.register(sender.socket, zmq.POLLIN)
        supervisor.poller.register(self._wake_read.fileno(), zmq.POLLIN)
        asked = 0  # the latest request passed on to the stages
        try:
            while not self._stopping.is_set():
                events = supervisor.poll(None)
                supervisor.check(events)
                if self._wake_read.fileno() in events:
                    self._drain_wake()
                with self._lock:
                    wanted = self._asked
                if wanted > asked:
                    asked = wanted
                    supervisor.ask_reports(asked)
                self._note_answers()
                if receiver.socket in events:
                    self._route(receiver.receive_waiting(MAX_MESSAGES_PER_STEP))
                while sender.can_send() and (envelope := self._next_envelope()) is not None:
                    sender.send(envelope)
                if not self._linked.is_set() and receiver.linked and sender.can_send():
                    self._linked.set()
        except RunnerError as error:
            self._fail(str(error))
        except Exception as error:  # noqa: BLE001 - a bug here must still fail the streams and stop the stages
            self._fail(describe_exception(error))
        finally:
            sender.close()
            supervisor.stream_ended = time.time()
            supervisor.stop()
            with self._lock:
                self._stopped.set()
                self._lock.notify_all()
            self._close_wake()

    def _drain_wake(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _note_answers(self) -> None:
        """Note the latest request for reports every stage has answered, waking `held_streams`."""
        answered = min((state.answered for state in self._supervisor.stages.values()), default=self._asked)
        if answered > self._answered:
            with self._lock:
                self._answered = answered
                self._lock.notify_all()

    def _next_envelope(self) -> Envelope | None:
        """The next message to send: one of the stream whose turn it is (a chunk, or its end), which then goes to
        the back if it has more; None when nothing waits."""
        with self._lock:
            while self._turns:
                stream_id = self._turns.popleft()
                self._queued.discard(stream_id)
                stream = self._streams.get(stream_id)
                if stream is None or not self._has_output(stream):
                    continue
                envelope = self._envelope(stream_id, stream)
                self._queue(stream_id, stream)
                return envelope
            return None

    def _envelope(self, stream_id: str, stream: _Stream) -> Envelope:
        """(Locked.) A stream's next message: its audio up to its next chunk boundary (all of it once it ends), or
        its end."""
        boundary = self._chunk - stream.sent % self._chunk
        if stream.pending and (stream.pending >= boundary or stream.ending is not None):
            samples, arrived = self._take(stream, min(boundary, stream.pending))
            item = {"samples": samples.reshape(-1, 1), "sample_rate": SAMPLE_RATE}  # the capture's [n, channels]
            envelope = Envelope(stream_id, stream.seq, arrived, Kind.DATA, item)
        else:
            kind, message = stream.ending
            envelope = Envelope(stream_id, stream.seq, time.time(), kind, message=message)
            stream.input_closed = True
            if stream.output_closed:
                del self._streams[stream_id]
        if stream.seq == 0:
            envelope.options = stream.options
        stream.seq += 1
        return envelope

    def _take(self, stream: _Stream, count: int) -> tuple[np.ndarray, float]:
        """(Locked.) The stream's next `count` samples, and when the last of them arrived; its sender is woken
        when it waits for room and now has some."""
        parts = []
        left = count
        arrived = 0.0
        while left:
            samples, arrived = stream.audio[0]
            if len(samples) <= left:
                stream.audio.popleft()
                parts.append(samples)
                left -= len(samples)
            else:
                parts.append(samples[:left])
                stream.audio[0] = (samples[left:], arrived)
                left = 0
        stream.pending -= count
        stream.sent += count
        if stream.wants_room and stream.pending <= self.max_pending_samples:
            stream.wants_room = False
            _post(stream.handle, stream.handle._wake)
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), arrived

    def _route(self, envelopes: list[Envelope]) -> None:
        """Hand what came out of the last stage to the streams' handles: events, then each stream's end or its
        failure (whose input, if still open, then ends too); what comes for a stream given up on is dropped."""
        now = time.monotonic()
        outputs: dict[str, tuple[_PipelineHandle, list[Any]]] = {}
        woken = False
        with self._lock:
            for envelope in envelopes:
                stream_id = envelope.stream_id
                stream = self._streams.get(stream_id)
                if stream is None or stream.output_closed:
                    continue
                items = outputs.setdefault(stream_id, (stream.handle, []))[1]
                if envelope.kind is Kind.DATA:
                    items.append(envelope.item)
                    self._supervisor.note_arrival(envelope)
                    continue
                stream.output_closed = True
                if envelope.kind is Kind.FAILED:
                    items.append(StreamFailed(envelope.message))
                    self._end_input(stream_id, stream, envelope.message)
                    woken = True
                else:
                    items.append(END)
                if stream.input_closed:
                    del self._streams[stream_id]
        for handle, items in outputs.values():
            _post(handle, handle._receive, items, now)
        if woken:
            self._wake()

    def _fail(self, why: str) -> None:
        """The pipeline broke (a stage died or failed, a queue carried something wrong): no stream can go on."""
        with self._lock:
            self.failure = why
            self._error = why
            handles = [stream.handle for stream in self._streams.values()]
            self._streams.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("internal_error", f"the pipeline failed: {why}"))


def _post(handle: _PipelineHandle, callback: Callable[..., None], *args: Any) -> None:
    """Run a handle's callback on its event loop, from any thread; a loop that is closed has no one to tell."""
    try:
        handle.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
