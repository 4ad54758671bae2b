"""One pipeline stage as an OS process: build the stage core, report ready, then receive, step, send.

Each step takes every message waiting on the input queue, many streams' interleaved, and hands them to the stage
core in one call (`Stage.step`); a stream's failure travels on as a message of its own and fails that stream only.
A stage process talks to its runner over its own control socket (loading, ready, warnings, error, the end of
its input, stats; start and stop back), apart from the data queues, so control never waits behind data.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from setproctitle import setproctitle

from voxtral_run.runner.config import SOURCE
from voxtral_run.runner.edges import LINGER_MS, EdgeReceiver, EdgeSender, EdgeSpec, Policy, add_gap
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.heartbeat import StageHeartbeat
from voxtral_run.runner.metrics import StageMetrics, StepRecord
from voxtral_run.runner.security import CurveKeys, make_client, start_authenticator
from voxtral_run.runner.wire import MAX_INPUT_CHARS, MAX_MESSAGE_CHARS, Envelope, Kind, printable_line
from voxtral_run.stages.audio.capture import FileStreams
from voxtral_run.stages.base import (
    END,
    Output,
    Source,
    Stage,
    StageError,
    StreamEnd,
    StreamFailed,
    StreamStart,
    Work,
)

PROCESS_TITLE = "voxtral-run: {name}"
LAG_WARNING_S = 1.0  # a live capture this far behind the wall clock says so
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
# Messages one step takes at most: what waits beyond them goes to the next step, so a flooded input queue still
# lets control, heartbeats and live reports through between steps.
MAX_MESSAGES_PER_STEP = 4096


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage process needs, picklable for the spawn start method."""

    name: str
    control: str  # the runner's control endpoint
    heartbeat: str  # the runner's heartbeat endpoint
    output_edge: EdgeSpec
    input_edge: EdgeSpec | None = None  # None for the capture stage
    device: str = "cpu"
    host: str | None = None  # the node a launcher places it on (Ray: a custom resource's name)
    params: dict[str, Any] = field(default_factory=dict)
    impl: str | None = None
    throttle_ms: float = 0.0
    threads: int = 1
    busy_poll: bool = False  # wait for input without sleeping while a stream is open (see StageConfig)
    gather_ms: float = 0.0  # wait for a message of every open stream before a step (see StageConfig)
    model_dir: Path | None = None
    delay_ms: int | None = None
    profile: bool = False  # also send every item's record, for the trace
    report_every_s: float | None = None  # report figures while running this often (live table, metrics endpoint)
    heartbeat_timeout_s: float = 5.0
    keys: CurveKeys | None = None  # for tcp queues (CURVE)


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def describe_exception(error: BaseException) -> str:
    """An unexpected exception on one line: type, message and the innermost source location."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {one_line(error)}{where}"


def build_core(spec: StageSpec) -> Stage | Source | FileStreams:
    """The stage core: an `impl` class if given, the capture source (or files), or a model stage from the factory."""
    if spec.impl is not None:
        module_name, _, attribute = spec.impl.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise StageError(f"impl {spec.impl}: cannot import ({one_line(error)})") from None
        try:
            return factory(**spec.params)
        except TypeError as error:  # settings that do not match the constructor
            raise StageError(f"impl {spec.impl}: {one_line(error)}") from None
    # Imports torch only for a model stage: the other processes start in a fraction of a second.
    from voxtral_run.stages.factory import build_stage

    if spec.name == SOURCE:
        source = build_stage(SOURCE, model_dir=spec.model_dir, params=spec.params)
        if spec.output_edge.policy is not Policy.BLOCK and not source.paced:
            source.close()
            raise StageError(
                f"queue {spec.output_edge.name}: policy {spec.output_edge.policy.value} needs a live capture "
                "(--input mic, or a file with --realtime)"
            )
        return source
    return build_stage(
        spec.name, model_dir=spec.model_dir, device=spec.device, delay_ms=spec.delay_ms, params=spec.params
    )


class CudaTimer:
    """GPU time of each stage call (a step), from CUDA events recorded around it on the stage's device. A step's
    time is read once the device has passed its end event (polled, never waited for), so timing adds no
    synchronisation."""

    def __init__(self, device: str, metrics: StageMetrics):
        import torch

        self._event = lambda: torch.cuda.Event(enable_timing=True)
        self._stream = lambda: torch.cuda.current_stream(torch.device(device))
        self._metrics = metrics
        self._start: Any = None
        self._pending: deque[tuple[StepRecord, Any, Any]] = deque()  # (record, start event, end event)

    def start(self) -> None:
        self._start = self._event()
        self._start.record(self._stream())

    def stop(self, record: StepRecord) -> None:
        """Mark the end of the call `record` describes; its device time arrives in the metrics later."""
        end = self._event()
        end.record(self._stream())
        self._pending.append((record, self._start, end))
        self.collect()

    def collect(self, *, wait: bool = False) -> None:
        """Read the times of the calls the device has finished (of all of them, waiting for it, when `wait`)."""
        while self._pending:
            record, start, end = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self._pending.popleft()
            self._metrics.add_device_time(record, start.elapsed_time(end) / 1000)


class _Stop(Exception):
    """The runner said stop, or the runner is gone."""


class _CaptureInterrupted(Exception):
    """SIGINT while the capture waited for audio: end the streams now."""


@dataclass
class _Stream:
    """What a stage process keeps of a stream it carries: the options to pass on with its first output, the capture
    time of its latest input (its outputs carry it), its outputs so far, audio gaps to pass on, whether its input
    is over, and the failure upstream reported for it."""

    options: dict[str, Any]
    capture_time: float
    sent: int = 0
    gaps: list[list[float]] = field(default_factory=list)
    input_over: bool = False
    upstream_failure: StreamFailed | None = None


def _single_stream(source: Source) -> Iterator[Work]:
    """A one-stream source as a capture's events: its start, its chunks, then its end, or its failure when it
    cannot be read on."""
    yield 0, StreamStart()
    try:
        for chunk in source.chunks():
            yield 0, chunk
    except StageError as error:
        yield 0, StreamFailed(str(error))
        return
    yield 0, END


class StageProcess:
    """The process loop around one stage core: handshake, data loop, end of stream, stop."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, spec.name.encode())
        self.control.setsockopt(zmq.LINGER, LINGER_MS)
        # A runner on another host (Ray placement) is reached over tcp, under the run's CURVE keys.
        remote_runner = spec.control.startswith("tcp://")
        if remote_runner:
            make_client(self.control, spec.keys)
        self.control.connect(spec.control)
        self.parent = multiprocessing.parent_process()
        self.parent_sentinel = self.parent.sentinel if self.parent is not None else None
        self.metrics = StageMetrics(keep_records=spec.profile)
        self.device_timer: CudaTimer | None = None
        self._next_report = time.monotonic() + spec.report_every_s if spec.report_every_s else None
        self.receiver: EdgeReceiver | None = None
        self.sender: EdgeSender | None = None
        self.source: Source | FileStreams | None = None
        self.stage: Stage | None = None
        self._streams: dict[str, _Stream] = {}  # streams taken and not yet ended downstream
        # Streams this stage ended or failed while their input goes on: what still comes of them is dropped, until
        # their end or failure arrives.
        self._closed_early: set[str] = set()
        self._capture_reading = False
        self._capture_interrupted = False
        # The capture's recent chunks: (stream, seq, start s, length s), to place a dropped one in its audio.
        self._recent_chunks: deque[tuple[str, int, float, float]] = deque()
        self._lag = {"max_lag_s": 0.0, "late_chunks": 0}  # capture: how far behind the wall clock a live source fell
        self.heartbeat = StageHeartbeat(
            self.context, spec.heartbeat, spec.name, spec.heartbeat_timeout_s, spec.keys if remote_runner else None
        )
        self.authenticator = None  # answers the CURVE handshakes of a tcp input queue

    def report(self, kind: str, **fields: Any) -> None:
        try:  # never wait on a runner that is gone
            self.control.send(pack({"type": kind, **fields}), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def run(self) -> int:
        """Run until stopped; the exit status (0, or 1 after reporting an error)."""
        try:
            self.report("loading")
            started = time.perf_counter()
            if self.spec.input_edge is not None and self.receiver is None:
                self.open_input()
            core = build_core(self.spec)
            if self.spec.device.startswith("cuda"):
                self.device_timer = CudaTimer(self.spec.device, self.metrics)
            watched = [self.control] + ([self.parent_sentinel] if self.parent_sentinel is not None else [])
            self.sender = EdgeSender(
                self.context,
                self.spec.output_edge,
                keys=self.spec.keys,
                interrupts=watched,
                on_interrupt=self._check_control,
                on_drop=self._on_drop,
            )
            settings = core.settings() if isinstance(core, Stage) else {}
            freeze_startup_heap()
            self.report("ready", load_s=time.perf_counter() - started, settings=settings)
            self._wait_for("start")
            if isinstance(core, Stage):
                self.stage = core
                self._serve(core)
            else:
                self.source = core
                self._capture(core)
                self._wait_for("stop")
            return 0
        except _Stop:
            return 0
        except (StageError, RunnerError, OSError) as error:
            self.report("error", message=one_line(error))
            return 1
        except Exception as error:  # noqa: BLE001 - any failure must reach the runner as one line
            self.report("error", message=describe_exception(error))
            return 1
        finally:
            self._report_stats()
            self._close()

    def open_input(self) -> str:
        """Bind the input queue (before `run`, to learn where, when the port is the OS's choice): its endpoint."""
        if self.spec.input_edge.is_tcp and self.spec.keys is not None:
            self.authenticator = start_authenticator(self.context, self.spec.keys)
        self.receiver = EdgeReceiver(self.context, self.spec.input_edge, self.spec.keys)
        return self.receiver.endpoint

    def _report_stats(self, *, final: bool = True, asked: int | None = None) -> None:
        """Send the figures so far; the final report also carries every record when profiling, and one the runner
        asked for says which request it answers."""
        if final and self.device_timer is not None:
            with suppress(RuntimeError):  # a failed device loses its last times, not the report
                self.device_timer.collect(wait=True)
        stats: dict[str, Any] = {"metrics": self.metrics.snapshot()}
        if final and self.spec.profile:
            stats["records"] = [record.as_list() for record in self.metrics.records]
        if self.sender is not None:
            edge = self.sender.spec
            stats |= {"edge": edge.name, "policy": edge.policy.value, "capacity": edge.capacity}
            stats |= {"sent": self.sender.sent, "dropped": self.sender.dropped, "peak_depth": self.sender.peak_depth}
        if self.source is not None:
            stats["overflows"] = getattr(self.source, "overflows", 0)
            stats |= self._lag
        stats["streams"] = self._stream_counts()
        if self.stage is not None:
            # What it computes in (the figures say what ran), its KV pages (what a replica router weighs) and the
            # graphs it captured while streams waited.
            reported = {
                "settings": self.stage.settings(), "kv": self.stage.kv_usage(), "graphs": self.stage.graph_captures()
            }  # fmt: skip
            stats |= {key: value for key, value in reported.items() if value}
        if asked is not None:
            stats["answers"] = asked
        self.report("stats", **stats)

    def _stream_counts(self) -> dict[str, int]:
        """How many streams each part of this process still keeps something for: the stage core (`held`), the
        process itself (`tracked`), the input queue (open streams, and ended ids it remembers), the output queue."""
        counts = {"tracked": len(self._streams) + len(self._closed_early)}
        if self.stage is not None:
            counts["held"] = len(self.stage.streams())
        if self.receiver is not None:
            counts |= {"input_open": self.receiver.open_streams, "input_remembered": self.receiver.remembered_streams}
        if self.sender is not None:
            counts["output_tracked"] = self.sender.tracked_streams
        return counts

    def _report_timeout_ms(self) -> int | None:
        """How long a wait may last before the next live report is due (None: no live reports)."""
        if self._next_report is None:
            return None
        return max(0, int((self._next_report - time.monotonic()) * 1000))

    def _end_run(self) -> None:
        """Every stream has ended: send the last message on, tell the runner, and report the figures."""
        self.sender.send_last()
        self.report("done")
        if self._next_report is not None:  # live figures complete at once, not at the next report
            self._report_stats(final=False)

    def _report_if_due(self) -> None:
        if self._next_report is not None and time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + self.spec.report_every_s
            self._report_stats(final=False)

    def _close(self) -> None:
        if self.source is not None:
            self.source.close()
        for end in (self.receiver, self.sender):
            if end is not None:
                end.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.heartbeat.close()
        self.control.close()
        self.context.term()

    def _check_control(self) -> None:
        """Handle waiting control messages without blocking: _Stop on stop or when the runner died, the figures at once
        when asked (a server checks what its stages hold); RunnerError when a queue to another invocation is lost."""
        if self.parent is not None and not self.parent.is_alive():
            raise _Stop()
        self._check_links()
        while self.control.poll(0, zmq.POLLIN):
            message = unpack(self.control.recv())
            if message["type"] == "stop":
                raise _Stop()
            if message["type"] == "report":
                self._report_stats(final=False, asked=message["asked"])

    def _wait_for(self, kind: str) -> None:
        """Block until the runner sends `kind` (stop always ends the wait with _Stop)."""
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        if self.parent_sentinel is not None:
            poller.register(self.parent_sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self.parent_sentinel in events:
                raise _Stop()
            message = unpack(self.control.recv())
            if message["type"] == "stop":
                raise _Stop()
            if message["type"] == "clock":  # the runner estimates this process's clock offset from the reply
                self.report("clock", sent=message["sent"], replied=time.time())
            if message["type"] == kind:
                return

    def _check_links(self) -> None:
        for end in (self.receiver, self.sender):
            if end is not None:
                end.check_link()

    def _wait_timeout_ms(self) -> int | None:
        """How long a wait for input may last: until the next live report, or the next link check."""
        timeouts = [self._report_timeout_ms()]
        edges = [end.spec for end in (self.receiver, self.sender) if end is not None and end.spec.remote]
        timeouts += [int(edge.check_every_s * 1000) for edge in edges]
        return min((timeout for timeout in timeouts if timeout is not None), default=None)

    def _serve(self, stage: Stage) -> None:
        poller = zmq.Poller()
        for pollable in (self.control, self.receiver.socket, self.parent_sentinel):
            if pollable is not None:
                poller.register(pollable, zmq.POLLIN)
        kept = False  # rounds kept by the stage's last call: run them, unless new work comes to join them
        while True:
            spinning = self.spec.busy_poll and bool(self._streams)  # between streams a wake-up costs nothing
            events = dict(poller.poll(0 if spinning or kept else self._wait_timeout_ms()))
            called = False
            if self.receiver.socket in events:
                held = stage.backlog  # what the stage holds counts against the bound: past it, its rounds run first
                if not kept or held < MAX_MESSAGES_PER_STEP:
                    room = max(1, MAX_MESSAGES_PER_STEP - held)
                    taken = self.receiver.receive_waiting(room)
                    if self.spec.gather_ms and not kept:
                        taken = self.receiver.gather(taken, self.spec.gather_ms / 1000, room)
                    self._step(stage, taken)
                    called = True
            if kept and not called:
                self._call(stage, [], [], time.time())
            if called or kept:  # only a call changes what the stage keeps: no scan of its streams on every spin
                kept = stage.has_work
            if any(ready is not self.receiver.socket for ready in events):
                self._check_control()
            self._check_links()
            self._report_if_due()

    def _step(self, stage: Stage, envelopes: list[Envelope]) -> None:
        """One stage call over the messages taken, each stream's as its work, its outputs sent on; then, while a
        call sees a stream leave and the stage holds others but no work it knows of, a call with no new work:
        streams the stage holds waiting for room may take the room the leaving one made. At the run's end, the
        rounds the stage kept."""
        began = time.time()
        work: list[Work] = []
        items = []  # the record's: the messages that became work
        last = False
        for envelope in envelopes:
            if envelope.kind is Kind.LAST:
                last = True
                continue
            taken = self._work_of(envelope)
            if taken:
                work += taken
                ending = envelope.kind is not Kind.DATA
                items.append([envelope.stream_id, max(0.0, began - envelope.sent_time), envelope.capture_time, ending])
        if work:
            outputs = self._call(stage, work, items, began)
            while (
                not stage.has_work
                and stage.streams()
                and any(isinstance(output, (StreamEnd, StreamFailed)) for _, output in outputs)
            ):
                outputs = self._call(stage, [], [], time.time())
        if last:
            while stage.has_work:
                self._call(stage, [], [], time.time())
            if self._streams:  # its input ended with the others', so the stage should have ended it
                stream_id = next(iter(self._streams))
                raise RunnerError(f"stage '{self.spec.name}' never ended stream {stream_id!r} after its input ended")
            self._end_run()

    def _call(self, stage: Stage, work: list[Work], items: list[list], began: float) -> list[Output]:
        """Call the stage on some work, timed (its device time too) and recorded, and send what it produced."""
        if self.device_timer is not None:
            self.device_timer.start()
        started = time.perf_counter()
        if self.spec.throttle_ms and work:  # a deliberately slow stage: the sleep counts as service time
            time.sleep(self.spec.throttle_ms / 1000)
        outputs = stage.step_round(work)
        service_s = time.perf_counter() - started
        if not (work or outputs or stage.batch_sizes):  # a call with no new work that found none: no step to tell
            return outputs
        record = StepRecord(began, service_s, batch_sizes=list(stage.batch_sizes), items=items)
        if self.device_timer is not None:
            self.device_timer.stop(record)
        record.out_bytes = sum(self._send_output(stream_id, output) for stream_id, output in outputs)
        record.send_s = time.perf_counter() - started - service_s
        self.metrics.record(record)
        return outputs

    def _work_of(self, envelope: Envelope) -> list[Work]:
        """A message as the stage's work: a StreamStart with its options first for a new stream, then its item,
        END, or the failure upstream reported; nothing for a stream this stage already ended or failed."""
        stream_id = envelope.stream_id
        ending = envelope.kind is not Kind.DATA
        if stream_id in self._closed_early:
            if ending:
                self._closed_early.discard(stream_id)
            return []
        work: list[Work] = []
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(dict(envelope.options), envelope.capture_time)
            work.append((stream_id, StreamStart(delay_ms=envelope.options.get("delay_ms"))))
        stream.capture_time = envelope.capture_time
        for gap in envelope.gaps:
            add_gap(stream.gaps, gap)
        stream.input_over = ending
        if envelope.kind is Kind.DATA:
            work.append((stream_id, envelope.item))
        elif envelope.kind is Kind.EOS:
            work.append((stream_id, END))
        else:
            stream.upstream_failure = StreamFailed(envelope.message, envelope.at_capacity)
            work.append((stream_id, stream.upstream_failure))
        return work

    def _send_output(self, stream_id: str, output: Any) -> int:
        """Send one output of a stream (an item, its END, or its failure) with the capture time of the stream's
        latest input, its options if it is the stream's first, and the audio gaps waiting; its size in bytes. A
        failure of this stage's own is named after it."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise RunnerError(
                f"stage '{self.spec.name}' gave an output for stream {stream_id!r}, which it does not hold"
            )
        kind, item, message = Kind.DATA, output, ""
        if isinstance(output, StreamEnd):
            kind, item = Kind.EOS, None
        elif isinstance(output, StreamFailed):
            kind, item = Kind.FAILED, None
            own = output != stream.upstream_failure
            message = f"stage '{self.spec.name}' failed: {output.message}" if own else output.message
            message = printable_line(message, MAX_MESSAGE_CHARS)
        envelope = Envelope(stream_id, stream.sent, stream.capture_time, kind, item, gaps=stream.gaps, message=message)
        envelope.at_capacity = isinstance(output, StreamFailed) and output.at_capacity
        if stream.sent == 0:
            envelope.options = stream.options
        stream.gaps = []
        stream.sent += 1
        if kind is not Kind.DATA:
            del self._streams[stream_id]
            if not stream.input_over:
                self._closed_early.add(stream_id)
        return self.sender.send(envelope)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Interrupt a wait for audio at once; a send in progress finishes, then the loop ends the streams.
        self._capture_interrupted = True
        if self._capture_reading:
            raise _CaptureInterrupted()

    def _on_drop(self, envelope: Envelope) -> None:
        """A chunk the capture's dropping queue left out: its place in its stream's audio, after the gaps it carried
        (audio the source lost before it), travels on as gaps, so the text after it keeps the real audio's times."""
        stream_id = envelope.stream_id
        for gap in envelope.gaps:
            self.sender.annotate(stream_id, gap)
        for stream, seq, start_s, length_s in self._recent_chunks:
            if stream == stream_id and seq == envelope.seq:
                self.sender.annotate(stream_id, [start_s, length_s])
                return

    def _note_lag(self, started: float, audio_end_s: float) -> None:
        """A paced source's chunk ending at `audio_end_s` was due at `started` plus that: note how late it is, and
        say so once when it passes LAG_WARNING_S."""
        lag_s = time.monotonic() - started - audio_end_s
        if lag_s > LAG_WARNING_S:
            if not self._lag["late_chunks"]:
                self.report(
                    "warning",
                    message=f"the capture is {lag_s:.1f} s behind real time: the pipeline is slower than the audio",
                )
            self._lag["late_chunks"] += 1
        self._lag["max_lag_s"] = max(self._lag["max_lag_s"], lag_s)

    def _capture(self, source: Source | FileStreams) -> None:
        """Send the source's streams (one, or one per file), each chunk as data and each stream's end or failure;
        on the end of the input or on SIGINT, close it, end the streams still open, pass on the warnings it found
        while reading, and send the last message. Audio the source lost (`dropped_before_s`) travels on as a gap.

        A chunk's service time is reading it (not when paced: then reading is waiting for the audio)."""
        run = uuid.uuid4().hex[:8]
        events, labels = (
            (_single_stream(source), None) if isinstance(source, Source) else (source.events(), source.labels)
        )
        # A source's warnings from opening its input the runner printed already: it inspects the input first.
        known_warnings = len(getattr(source, "warnings", []))
        signal.signal(signal.SIGINT, self._on_sigint)
        # Drops only ever concern the chunks still in the queue or at the sender: capacity of them at most.
        self._recent_chunks = deque(maxlen=self.spec.output_edge.capacity + 1)
        clocks: dict[str, list[float]] = {}  # per open stream: [monotonic start, seconds of its audio so far]
        try:
            while not self._capture_interrupted:
                self._capture_reading = True
                read_began = time.time()
                try:
                    event = next(events, None)
                finally:
                    self._capture_reading = False
                if event is None:
                    break
                self._check_control()
                index, item = event
                stream_id = f"{run}-{index}"
                if isinstance(item, StreamStart):
                    options: dict[str, Any] = {"delay_ms": self.spec.delay_ms} if self.spec.delay_ms is not None else {}
                    if labels is not None:
                        options["input"] = printable_line(labels[index], MAX_INPUT_CHARS)
                    self._streams[stream_id] = _Stream(options, time.time(), input_over=True)
                    clocks[stream_id] = [time.monotonic(), 0.0]
                elif isinstance(item, (StreamEnd, StreamFailed)):
                    del clocks[stream_id]
                    self._send_output(stream_id, item)
                else:
                    self._send_chunk(stream_id, item, clocks[stream_id], source, read_began)
        except _CaptureInterrupted:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        source.close()
        for warning in getattr(source, "warnings", [])[known_warnings:]:
            self.report("warning", message=warning)
        for stream_id in list(self._streams):  # what the interrupt cut short ends here
            self._send_output(stream_id, END)
        self._end_run()

    def _send_chunk(
        self, stream_id: str, chunk: Any, clock: list[float], source: Source | FileStreams, read_began: float
    ) -> None:
        """Send one chunk of a stream whose audio so far `clock` counts ([monotonic start, seconds]), noting how
        late a paced one is and what audio the source lost before it."""
        stream = self._streams[stream_id]
        stream.capture_time = time.time()
        began = stream.capture_time if source.paced else read_began
        if self.spec.throttle_ms:
            time.sleep(self.spec.throttle_ms / 1000)
        length_s = len(chunk["samples"]) / chunk["sample_rate"]
        dropped_s = getattr(source, "dropped_before_s", 0.0)
        if dropped_s:  # the source itself lost audio just before this chunk (a microphone's full queue)
            add_gap(stream.gaps, [clock[1], dropped_s])
            clock[1] += dropped_s
        self._recent_chunks.append((stream_id, stream.sent, clock[1], length_s))
        clock[1] += length_s
        if source.paced:
            self._note_lag(clock[0], clock[1])
        record = StepRecord(began, time.time() - began, items=[[stream_id, None, stream.capture_time, False]])
        send_started = time.perf_counter()
        record.out_bytes = self._send_output(stream_id, chunk)
        record.send_s = time.perf_counter() - send_started
        self.metrics.record(record)
        self._report_if_due()


def freeze_startup_heap() -> None:
    """Collect what starting left behind, then exempt every object still alive from the collector's later passes:
    a process that imported torch and built a model holds some 300,000 objects, which each full collection would
    walk again (about 150 ms on a CI core), holding up every stream of the process meanwhile."""
    gc.collect()
    gc.freeze()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the runner that spawned it dies, however it dies (SIGKILL too)."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the parent's sentinel and the heartbeat stop the stage
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the runner died before the request was made
        os._exit(1)


def stage_main(spec: StageSpec) -> None:
    """Entry point of a spawned stage process."""
    _die_with_parent()
    setproctitle(PROCESS_TITLE.format(name=spec.name))
    # Before anything imports torch: its thread pools read these once.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(spec.threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the runner decides
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout carries the transcript: stages print to stderr
    sys.exit(StageProcess(spec).run())
