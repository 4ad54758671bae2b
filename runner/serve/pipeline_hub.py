"""The hub of `voxtral-run serve`: the pipeline's stages started once, one process each, with this process in the
places of the capture and the output.

A worker thread feeds the queue out of the capture as the capture does (each stream's audio in chunks of the
capture's size, numbered, the stream's options on its first message, then its end or its failure) and reads the
queue into the output as the sink does, handing each stream's events to its handle. It never waits on a queue:
it sends only with a credit in hand, and reads every event as it comes, so a slow client or a full queue stalls
no one else. Streams past the stages' ceiling are refused when opened; a stage's own refusal at capacity
reaches the stream as `server_at_capacity`.

A pipeline with replicas (`replicas`, `devices` in pipeline.yaml) runs as several chains of the stages after the
capture, each with its own processes and queues; each new stream goes to the least loaded chain (by its streams and
its KV memory in use), for its whole life. A chain that breaks fails its own streams only, and is replaced while the
others serve on.

A serve split over hosts runs here only this host's stages (`local`), the others being worker invocations
(`voxtral-run serve --stages`) linked over tcp; it is one chain. When a worker goes, the open streams fail and the
chain is started again, taking streams once the worker is back and linked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from rich.console import Console

from voxtral_run.runner.config import (
    MPS_OFF,
    SOURCE,
    Pipeline,
    model_stage_ceiling,
    place_local_stages,
    replica_pipelines,
)
from voxtral_run.runner.edges import EdgeSender, Policy
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.metrics import LogHistogram, RunFigures
from voxtral_run.runner.mps import MpsDaemon, start_mps, with_mps_hint
from voxtral_run.runner.security import CurveKeys
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
from voxtral_run.runner.supervisor import Interrupted, Launcher, Reporting, StageState, Supervisor, report_figures
from voxtral_run.runner.wire import MAX_INPUT_CHARS, MAX_MESSAGE_CHARS, Envelope, Kind, printable_line
from voxtral_run.stages.audio.capture import DEFAULT_CHUNK_MS, MAX_STREAMS, frames_per_chunk
from voxtral_run.stages.audio.constants import SAMPLE_RATE, token_aligned_delay_ms
from voxtral_run.stages.base import END, StreamEnd, StreamFailed
from voxtral_run.stages.factory import cuda_device_count
from voxtral_run.stages.text.tekken import TEKKEN_FILE, load_tekken

DEFAULT_MAX_EVENTS = 1024  # events a stream may hold unread; past them its reader is too slow and it is dropped
MAX_PENDING_S = 60.0
REPORT_TIMEOUT_S = 5.0  # how long `held_streams` waits for the stages' answers
SHUTTING_DOWN = "shutting down"
RELINKING = "waiting for the stages to be linked again"
QUIET = Reporting(quiet=True)  # a hub's reporting unless told: no start-up progress


@dataclass
class _Stream:
    """A stream between its opening and the moment no stage holds it: what waits to go into the pipeline (audio
    with its arrival time, then its end), where its input stands, and whether its output has ended."""

    handle: _PipelineHandle
    options: dict[str, Any]  # the wire options of its first message
    chain: _Chain  # the replica it goes through, for its whole life
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
                code = "server_at_capacity" if item.at_capacity else "stream_failed"
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


@dataclass
class _Chain:
    """One replica of the stages after the capture: its own processes (a supervisor) and queues, its streams, and
    the streams whose turn to send it is."""

    index: int
    pipeline: Pipeline
    capacity: int
    supervisor: Supervisor | None = None
    sender: EdgeSender | None = None  # the queue into its first stage, the worker's once the chain is up
    state: str = "starting"  # then "up" (its queues linked: it takes streams) or "out" (broken, being replaced)
    streams: set[str] = field(default_factory=set)
    turns: deque[str] = field(default_factory=deque)  # its streams with a chunk or an end to send, taking turns
    queued: set[str] = field(default_factory=set)  # the streams in `turns`

    @property
    def name(self) -> str:
        return f"replica {self.index}"

    def load(self) -> float:
        """How full the chain is, 0 to 1: the larger of its share of streams and of KV memory in use (the model
        stages' latest reports, a second old at most: a chain of long streams has pages for fewer new ones)."""
        supervisor = self.supervisor
        states = list(supervisor.stages.values()) if supervisor is not None else []
        kv = [state.stats.get("kv") for state in states]
        used = [usage["pages_in_use"] / usage["pages"] for usage in kv if usage and usage.get("pages")]
        return max([len(self.streams) / self.capacity, *used])


class PipelineHub(StreamHub):
    """A pipeline's stages (from its pipeline.yaml, settings applied) started once, each in its own process (one set
    per replica), with this process feeding the queue out of the capture and reading the one into the output."""

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
        launcher: Launcher | None = None,
        local: list[str] | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        """Start the stages; return once each is ready and the queues linked (else RunnerError, nothing left running;
        Interrupted on Ctrl-C). `capacity` (default: the model stages' max_streams) is each replica's: past theirs a
        stream waits or is refused. `launcher` starts the stage processes elsewhere (Ray) instead of here. `local`
        names the stages of a serve split over hosts that run here (None: all), linked to the others under `keys`."""
        source_queue = next(queue for queue in pipeline.queues if queue.source == SOURCE)
        if source_queue.policy is not Policy.BLOCK:
            raise RunnerError(
                f"queue {SOURCE} -> {source_queue.target}: policy {source_queue.policy.value} drops audio; serve "
                "holds its clients back instead (policy block)"
            )
        chains = replica_pipelines(pipeline, launcher.gpu_count if launcher is not None else cuda_device_count)
        for chain in chains:
            if launcher is None:
                place_local_stages(chain, local or chain.chain())
            else:
                launcher.place(chain)
        if capacity is None:
            capacity = min(model_stage_ceiling(chains[0]) or MAX_STREAMS, MAX_STREAMS)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_STREAMS:
            raise HubError("invalid_setting", f"capacity must be 1..{MAX_STREAMS}, got {capacity!r}")
        if not 0 < max_pending_s <= MAX_PENDING_S:
            raise HubError("invalid_setting", f"max_pending_s must be in (0, {MAX_PENDING_S:g}], got {max_pending_s!r}")
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise HubError("invalid_setting", f"max_events must be a whole number >= 1, got {max_events!r}")
        self.max_pending_samples = round(max_pending_s * SAMPLE_RATE)
        self.max_events = max_events
        delay_ms = pipeline.delay_ms
        if delay_ms is None:
            delay_ms = load_tekken(Path(model_dir) / TEKKEN_FILE).audio.transcription_delay_ms
        self._default_delay_ms = token_aligned_delay_ms(delay_ms)
        self._chunk = frames_per_chunk(SAMPLE_RATE, pipeline.stages[SOURCE].params.get("chunk_ms", DEFAULT_CHUNK_MS))
        self._model_dir = Path(model_dir)
        self._console = console or Console(stderr=True)
        self._reporting = dataclasses.replace(reporting, live_figures=True)
        self._launcher = launcher
        self._local = local
        self._keys = keys
        self._check_s = pipeline.heartbeat_timeout_s / 4
        self._lock = threading.Condition()
        self._chains = [_Chain(index, chain, capacity) for index, chain in enumerate(chains)]
        self._started: deque[_Chain] = deque()  # chains started again, for the worker to take in
        self._launches: deque[tuple[Supervisor, Future[None]]] = deque()  # replacements for the worker to spawn
        self._restarts: list[threading.Thread] = []
        self._streams: dict[str, _Stream] = {}  # from opening until no stage holds it
        self._numbers = itertools.count()
        self._run = uuid.uuid4().hex[:8]  # stream ids are this hub's own: the queues refuse an id reused
        self._error = ""  # why no stream is taken: the hub failed or is shutting down
        self.failure: str | None = None  # why the hub failed (a stage died, a queue broke), for its owner
        self._asked = 0  # the latest request for the stages' reports (`held_streams`)
        self._answered = 0  # the latest request every stage answered
        self._linked = threading.Event()  # every chain's queues are up: ready
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_waiting = False  # a wake-up byte is on its way to the worker, which has not drained it yet
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._mps: MpsDaemon | None = None
        try:
            # For the hub's life: the stage processes of chains started again inherit it too.
            mps_mode = pipeline.mps if launcher is None else MPS_OFF
            self._mps = start_mps(mps_mode, chains, local or pipeline.chain(), self._console, quiet=reporting.quiet)
            for chain in self._chains:  # every chain's processes load at once; then each is waited for
                chain.supervisor = self._supervisor(chain)
                chain.supervisor.launch()
            for chain in self._chains:
                with chain.supervisor.counting_signals():
                    chain.supervisor.await_ready()
        except BaseException as error:
            for chain in self._chains:
                if chain.supervisor is not None:
                    chain.supervisor.stop()
            self._close_wake()
            daemon = self._mps
            self._close_mps()
            if isinstance(error, RunnerError):
                raise with_mps_hint(error, daemon) from None
            raise
        self._worker = threading.Thread(target=self._serve, name="voxtral-serve-pipeline", daemon=True)
        self._worker.start()
        try:
            self._wait_linked(pipeline.startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def _supervisor(self, chain: _Chain) -> Supervisor:
        return Supervisor(
            chain.pipeline,
            local=self._local or chain.pipeline.chain(),
            model_dir=self._model_dir,
            sink=None,
            console=self._console,
            reporting=self._reporting,
            keys=self._keys,
            serve=True,
            launcher=self._launcher,
        )

    def _wait_linked(self, timeout_s: float) -> None:
        # A queue's own link timeout began before this one and names the queue (the other host's, in a split
        # serve): it has a check's time to come first.
        deadline = time.monotonic() + timeout_s + self._check_s
        while not self._linked.wait(0.05):
            if self.failure is not None or self._stopped.is_set():
                raise RunnerError(self.failure or "the stages stopped while starting")
            if time.monotonic() > deadline:
                raise RunnerError(f"the stages' queues not linked after {timeout_s:g} s (startup_timeout_s)")

    # --- the StreamHub interface ---

    @property
    def ready(self) -> bool:
        return self._linked.is_set() and not self._error and any(chain.state == "up" for chain in self._chains)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def capacity(self) -> int:
        """The most streams open at once: every replica's that takes streams now."""
        return sum(chain.capacity for chain in self._chains if chain.state == "up")

    @property
    def _capacity(self) -> int:
        return self.capacity

    async def open(self, options: StreamOptions) -> StreamHandle:
        loop = asyncio.get_running_loop()
        with self._lock:
            up = [chain for chain in self._chains if chain.state == "up"]
            self.refuse_if_full(self._error or ("" if up else RELINKING), sum(len(chain.streams) for chain in up))
            # The least loaded replica, by streams and KV memory (each batches only its own streams).
            chain = min(up, key=lambda chain: (chain.load(), len(chain.streams)))
            stream_id = f"{self._run}-{next(self._numbers)}"
            handle = _PipelineHandle(self, stream_id, options, loop)
            wire_options: dict[str, Any] = {} if options.delay_ms is None else {"delay_ms": options.delay_ms}
            if options.label:
                wire_options["input"] = printable_line(options.label, MAX_INPUT_CHARS)
            self._streams[stream_id] = _Stream(handle, wire_options, chain)
            chain.streams.add(stream_id)
        return handle

    def close(self) -> None:
        """Stop taking streams, end the open ones with StreamError(server_shutting_down), stop the stages."""
        with self._lock:
            self._error = self._error or SHUTTING_DOWN
            handles = [stream.handle for stream in self._streams.values()]
            self._streams.clear()
            for chain in self._chains:
                chain.streams.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("server_shutting_down", "the server is shutting down"))
        self._stopping.set()
        self._wake()
        self._worker.join()

    # --- what the command and the tests read ---

    @property
    def replicas(self) -> int:
        """How many chains of the stages this hub runs."""
        return len(self._chains)

    def replica_of(self, stream_id: str) -> int | None:
        """The replica a stream was routed to (None once it is over)."""
        with self._lock:
            stream = self._streams.get(stream_id)
            return stream.chain.index if stream is not None else None

    def stage_processes(self, replica: int = 0) -> dict[str, StageState]:
        """The stage processes of one replica, by stage name."""
        supervisor = self._chains[replica].supervisor
        return dict(supervisor.stages) if supervisor is not None else {}

    @property
    def ready_s(self) -> float:
        """How long the stages took to be ready (the slowest replica)."""
        return max(chain.supervisor.ready_s or 0.0 for chain in self._chains if chain.supervisor is not None)

    @property
    def stage_names(self) -> list[str]:
        """The stages started, in data order (with their replica, where there are several)."""
        return [name for chain in self._chains for name in self._named(chain, chain.supervisor.stages)]

    def _named(self, chain: _Chain, values: dict[str, Any]) -> dict[str, Any]:
        """A replica's stages by name, the name carrying the replica's number where there are several."""
        if len(self._chains) == 1:
            return dict(values)
        return {f"{name}/{chain.index}": value for name, value in values.items()}

    def figures(self) -> RunFigures:
        """The stages' latest figures, every replica's, and the latency of text at this end (for /metrics and the
        tables)."""
        parts = [(chain, chain.supervisor.figures()) for chain in self._chains if chain.supervisor is not None]
        e2e = LogHistogram()
        for _, part in parts:
            e2e.merge(part.e2e)
        return RunFigures(
            stages={name: report for chain, part in parts for name, report in self._named(chain, part.stages).items()},
            wall_s=max(part.wall_s for _, part in parts),
            e2e=e2e,
            delay_ms=parts[0][1].delay_ms,
            clock_offsets={
                name: offset for chain, part in parts for name, offset in self._named(chain, part.clock_offsets).items()
            },
        )

    def report(self) -> None:
        """Once closed: the table of figures (unless quiet) and the JSON figures where asked for."""
        report_figures(self.figures(), self._reporting, self._console)

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
                self._forget(stream_id, stream)
                return
            self._end_input(stream_id, stream, why)
        self._wake()

    def _forget(self, stream_id: str, stream: _Stream) -> None:
        """(Locked.) No stage holds the stream any more."""
        del self._streams[stream_id]
        stream.chain.streams.discard(stream_id)

    def _end_input(self, stream_id: str, stream: _Stream, why: str) -> None:
        """(Locked.) Replace what waits of a stream's input by its failure, sent before the other streams' turns."""
        if stream.input_closed:
            return
        stream.audio.clear()
        stream.pending = 0
        stream.ending = (Kind.FAILED, printable_line(why, MAX_MESSAGE_CHARS))
        chain = stream.chain
        if stream_id in chain.queued:
            chain.turns.remove(stream_id)
        chain.queued.add(stream_id)
        chain.turns.appendleft(stream_id)

    def _queue(self, stream_id: str, stream: _Stream) -> bool:
        """(Locked.) Give the stream a turn if it has something to send and none yet; whether it got one."""
        chain = stream.chain
        if stream_id in chain.queued or not self._has_output(stream):
            return False
        chain.queued.add(stream_id)
        chain.turns.append(stream_id)
        return True

    def _has_output(self, stream: _Stream) -> bool:
        """Whether a stream has a message to send: its audio up to its next chunk boundary, or its end."""
        if stream.input_closed:
            return False
        return stream.pending >= self._chunk - stream.sent % self._chunk or stream.ending is not None

    def _wake(self) -> None:
        """Wake the worker, unless a wake-up waits for it already: with many clients, most of the audio's thousands
        of appends a second then cost no system call, and the worker no loop of its own."""
        with self._lock:
            if self._wake_waiting:
                return
            self._wake_waiting = True
        try:
            self._wake_write.send(b"\0")
        except OSError:  # full, or closed with the hub
            pass

    def _close_wake(self) -> None:
        self._wake_read.close()
        self._wake_write.close()

    # --- the worker ---

    def _serve(self) -> None:
        """The worker: watch every replica's stages, send what waits while its queue gives credit, route what comes
        out; a broken replica fails its streams and is replaced (with one replica, the hub fails)."""
        asked = 0  # the latest request passed on to the stages
        poller = zmq.Poller()
        try:
            for chain in self._chains:
                self._take_in(chain)
            poller = self._poller()
            while not self._stopping.is_set():
                events = dict(poller.poll(int(self._check_s * 1000)))
                if self._wake_read.fileno() in events:
                    self._drain_wake()
                self._launch_waiting()
                changed = self._take_started()
                with self._lock:
                    wanted = self._asked
                for chain in self._chains:
                    if chain.state == "out":
                        continue
                    try:
                        chain.supervisor.check(events)
                        chain.sender.check_link()  # its first stage may be another host's
                        if wanted > asked:
                            chain.supervisor.ask_reports(wanted)
                        receiver = chain.supervisor.sink_receiver
                        if receiver.socket in events:
                            self._route(receiver.receive_waiting(MAX_MESSAGES_PER_STEP))
                        while chain.sender.can_send() and (envelope := self._next_envelope(chain)) is not None:
                            chain.sender.send(envelope)
                        if chain.state == "starting" and receiver.linked and chain.sender.can_send():
                            chain.state = "up"
                    except RunnerError as error:
                        self._chain_failed(chain, str(error))
                        changed = True
                asked = max(asked, wanted)
                self._note_answers()
                if not self._linked.is_set() and all(chain.state == "up" for chain in self._chains):
                    self._linked.set()
                if changed:
                    poller = self._poller()
        except RunnerError as error:
            self._fail(str(error))
        except Exception as error:  # noqa: BLE001 - a bug here must still fail the streams and stop the stages
            self._fail(describe_exception(error))
        finally:
            for thread in self._restarts:
                thread.join()
            self._take_started()
            for chain in self._chains:
                self._stop_chain(chain)
            self._close_mps()
            with self._lock:
                self._stopped.set()
                self._lock.notify_all()
            self._close_wake()

    def _close_mps(self) -> None:
        """Quit the MPS daemon once no stage process is left."""
        daemon, self._mps = self._mps, None
        if daemon is not None:
            daemon.close(self._console)

    def _take_in(self, chain: _Chain) -> None:
        """(Worker.) A chain whose stages are ready: open the queue into it; it takes streams once linked."""
        chain.sender = EdgeSender(chain.supervisor.context, chain.supervisor.source_edge, keys=chain.supervisor.keys)

    def _take_started(self) -> bool:
        """(Worker.) Take in the chains started again since the last look; whether there were any."""
        with self._lock:
            started = list(self._started)
            self._started.clear()
        for chain in started:
            if self._stopping.is_set():
                chain.supervisor.stop()
                continue
            chain.state = "starting"
            self._take_in(chain)
        return bool(started)

    def _poller(self) -> zmq.Poller:
        """(Worker.) One poller over every live chain's sockets and processes, and the wake-up."""
        poller = zmq.Poller()
        poller.register(self._wake_read.fileno(), zmq.POLLIN)
        for chain in self._chains:
            if chain.state != "out":
                for pollable, flags in chain.supervisor.poller.sockets:
                    poller.register(pollable, flags)
                poller.register(chain.sender.socket, zmq.POLLIN)
        return poller

    def _chain_failed(self, chain: _Chain, why: str) -> None:
        """(Worker.) A replica broke: its streams fail; with others, it is replaced in the background while they
        serve on; alone, the hub fails, unless it is split over hosts and was linked once: then it is replaced,
        and serves again once the other hosts' stages (restarted) link again."""
        if len(self._chains) == 1 and not (self._local is not None and self._linked.is_set()):
            raise RunnerError(why)
        message = f"{chain.name} failed: {why}" if len(self._chains) > 1 else why
        self._console.print(f"voxtral-run: {message}; starting it again", markup=False, highlight=False)
        with self._lock:
            chain.state = "out"
            handles = [self._streams.pop(stream_id).handle for stream_id in chain.streams]
            chain.streams.clear()
            chain.turns.clear()
            chain.queued.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("stream_failed", message))
        chain.sender.close()
        chain.sender = None
        thread = threading.Thread(target=self._replace, args=(chain,), name=f"voxtral-serve {chain.name}", daemon=True)
        self._restarts.append(thread)
        thread.start()

    def _replace(self, chain: _Chain) -> None:
        """(A thread of its own.) Stop a broken replica's processes, have the worker start them again, and wait until
        they are ready; then the worker takes the replica in. One that cannot start again stays out, and with none
        left the hub fails."""
        chain.supervisor.stop()
        if self._stopping.is_set():
            return
        supervisor = self._supervisor(chain)
        launched: Future[None] = Future()
        if self._launcher is None:
            with self._lock:
                # The worker spawns them: a stage process dies with the thread that spawned it (PR_SET_PDEATHSIG).
                self._launches.append((supervisor, launched))
            self._wake()
        else:  # a launcher's actors outlive this thread, and placing them takes a while: not the worker's time
            self._launch(supervisor, launched)
        try:
            while not self._launched(launched):
                if self._stopping.is_set() and launched.cancel():  # else it was launched: stopped with the others
                    return
            supervisor.await_ready()
        except (RunnerError, Interrupted) as error:
            supervisor.stop()
            self._console.print(f"voxtral-run: {chain.name} did not start again: {error}", markup=False)
            if all(other.state == "out" for other in self._chains):
                self._fail(f"every replica failed ({chain.name}: {error})")
                self._stopping.set()
                self._wake()
            return
        chain.supervisor = supervisor
        with self._lock:
            self._started.append(chain)
        self._wake()

    def _launch_waiting(self) -> None:
        """(Worker.) Spawn the processes of the replicas being replaced; a failure reaches `_replace` as theirs."""
        with self._lock:
            launches = list(self._launches)
            self._launches.clear()
        for supervisor, launched in launches:
            self._launch(supervisor, launched)

    @staticmethod
    def _launch(supervisor: Supervisor, launched: Future[None]) -> None:
        """Start a replacement's processes, telling `launched` how it went (unless the hub stopped and cancelled it)."""
        if not launched.set_running_or_notify_cancel():
            return
        try:
            supervisor.launch()
        except RunnerError as error:
            launched.set_exception(error)
        else:
            launched.set_result(None)

    @staticmethod
    def _launched(launched: Future[None]) -> bool:
        """Whether the worker spawned a replacement's processes (waiting a moment for it); RunnerError if it could
        not."""
        try:
            launched.result(timeout=0.1)
        except FuturesTimeout:
            return False
        return True

    def _stop_chain(self, chain: _Chain) -> None:
        if chain.sender is not None:
            chain.sender.close()
            chain.sender = None
        if chain.supervisor is not None and chain.state != "out":
            chain.supervisor.stream_ended = time.time()
            chain.supervisor.stop()

    def _drain_wake(self) -> None:
        """(Worker.) Take the wake-ups, before the work they announce: what is queued after this wakes it again."""
        with self._lock:
            self._wake_waiting = False
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _note_answers(self) -> None:
        """Note the latest request for reports every stage has answered, waking `held_streams`."""
        live = [chain.supervisor for chain in self._chains if chain.state != "out"]
        answered = min((state.answered for supervisor in live for state in supervisor.stages.values()), default=0)
        if answered > self._answered:
            with self._lock:
                self._answered = answered
                self._lock.notify_all()

    def _next_envelope(self, chain: _Chain) -> Envelope | None:
        """The next message into a chain: one of the stream whose turn it is (a chunk, or its end), which then goes
        to the back if it has more; None when nothing waits."""
        with self._lock:
            while chain.turns:
                stream_id = chain.turns.popleft()
                chain.queued.discard(stream_id)
                stream = self._streams.get(stream_id)
                if stream is None or not self._has_output(stream):
                    continue
                envelope = self._envelope(stream_id, stream)
                if stream_id in self._streams:
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
                self._forget(stream_id, stream)
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
        """Hand what came out of a chain's last stage to the streams' handles: events, then each stream's end or its
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
                    stream.chain.supervisor.note_arrival(envelope)
                    continue
                stream.output_closed = True
                if envelope.kind is Kind.FAILED:
                    items.append(StreamFailed(envelope.message, envelope.at_capacity))
                    self._end_input(stream_id, stream, envelope.message)
                    woken = True
                else:
                    items.append(END)
                if stream.input_closed:
                    self._forget(stream_id, stream)
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
            for chain in self._chains:
                chain.streams.clear()
        for handle in handles:
            _post(handle, handle._finish, StreamError("internal_error", f"the pipeline failed: {why}"))


def _post(handle: _PipelineHandle, callback: Callable[..., None], *args: Any) -> None:
    """Run a handle's callback on its event loop, from any thread; a loop that is closed has no one to tell."""
    try:
        handle.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass
