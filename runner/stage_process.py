"""One pipeline stage as an OS process: build the stage core, report ready, then receive, call, send.

A stage process talks to its runner over its own control socket (loading, ready, warnings, error, end of
stream, stats; start and stop back), apart from the data queues, so control never waits behind data.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
import uuid
from collections import deque
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
from voxtral_run.runner.metrics import ItemRecord, StageMetrics
from voxtral_run.runner.security import CurveKeys, start_authenticator
from voxtral_run.runner.wire import Envelope, Kind
from voxtral_run.stages.base import Source, Stage, StageError

PROCESS_TITLE = "voxtral-run: {name}"
LAG_WARNING_S = 1.0  # a live capture this far behind the wall clock says so
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage process needs, picklable for the spawn start method."""

    name: str
    control: str  # the runner's control endpoint
    heartbeat: str  # the runner's heartbeat endpoint
    output_edge: EdgeSpec
    input_edge: EdgeSpec | None = None  # None for the capture stage
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)
    impl: str | None = None
    throttle_ms: float = 0.0
    threads: int = 1
    busy_poll: bool = False  # wait for input without sleeping while a stream is open (see StageConfig)
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


def build_core(spec: StageSpec) -> Stage | Source:
    """The stage core: an `impl` class if given, the capture source, or a model stage from the factory."""
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
    """GPU time of each stage call, from CUDA events recorded around it on the stage's device. An item's time is
    read once the device has passed its end event (polled, never waited for), so timing adds no synchronisation."""

    def __init__(self, device: str, metrics: StageMetrics):
        import torch

        self._event = lambda: torch.cuda.Event(enable_timing=True)
        self._stream = lambda: torch.cuda.current_stream(torch.device(device))
        self._metrics = metrics
        self._start: Any = None
        self._pending: deque[tuple[ItemRecord, Any, Any]] = deque()  # (record, start event, end event)

    def start(self) -> None:
        self._start = self._event()
        self._start.record(self._stream())

    def stop(self, record: ItemRecord) -> None:
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
    """SIGINT while the capture waited for audio: end the stream now."""


class StageProcess:
    """The process loop around one stage core: handshake, data loop, end of stream, stop."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.DEALER)
        self.control.setsockopt(zmq.IDENTITY, spec.name.encode())
        self.control.setsockopt(zmq.LINGER, LINGER_MS)
        self.control.connect(spec.control)
        self.parent = multiprocessing.parent_process()
        self.parent_sentinel = self.parent.sentinel if self.parent is not None else None
        self.metrics = StageMetrics(keep_records=spec.profile)
        self.device_timer: CudaTimer | None = None
        self._next_report = time.monotonic() + spec.report_every_s if spec.report_every_s else None
        self.receiver: EdgeReceiver | None = None
        self.sender: EdgeSender | None = None
        self.source: Source | None = None
        self._output_seq: dict[str, int] = {}
        self._open_streams: set[str] = set()  # streams with data taken and no end of stream yet
        self._capture_reading = False
        self._capture_interrupted = False
        self._gaps: dict[str, list[list[float]]] = {}  # audio gaps to pass on with a stream's next output
        self._recent_chunks: deque[tuple[int, float, float]] = deque()  # capture: (seq, start s, length s)
        self._lag = {"max_lag_s": 0.0, "late_chunks": 0}  # capture: how far behind the wall clock a live source fell
        self.heartbeat = StageHeartbeat(self.context, spec.heartbeat, spec.name, spec.heartbeat_timeout_s)
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
            if self.spec.input_edge is not None:
                if self.spec.input_edge.is_tcp and self.spec.keys is not None:
                    self.authenticator = start_authenticator(self.context, self.spec.keys)
                self.receiver = EdgeReceiver(self.context, self.spec.input_edge, self.spec.keys)
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
            self.report("ready", load_s=time.perf_counter() - started)
            self._wait_for("start")
            if isinstance(core, Source):
                self.source = core
                self._capture(core, paced=core.paced)
                self._wait_for("stop")
            else:
                self._serve(core)
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

    def _report_stats(self, *, final: bool = True) -> None:
        """Send the figures so far; the final report also carries every record when profiling."""
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
        self.report("stats", **stats)

    def _report_timeout_ms(self) -> int | None:
        """How long a wait may last before the next live report is due (None: no live reports)."""
        if self._next_report is None:
            return None
        return max(0, int((self._next_report - time.monotonic()) * 1000))

    def _report_at_end_of_stream(self) -> None:
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
        """Handle waiting control messages without blocking; raise _Stop on stop or when the runner died, and
        RunnerError when a queue to another invocation lost its link."""
        if self.parent is not None and not self.parent.is_alive():
            raise _Stop()
        self._check_links()
        while self.control.poll(0, zmq.POLLIN):
            if unpack(self.control.recv())["type"] == "stop":
                raise _Stop()

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

    def _send(self, stream_id: str, capture_time: float, kind: Kind, item: Any = None) -> int:
        seq = self._output_seq.get(stream_id, 0)
        self._output_seq[stream_id] = seq + 1
        gaps = self._gaps.pop(stream_id, [])
        return self.sender.send(Envelope(stream_id, seq, capture_time, kind, item, gaps=gaps))

    def _serve(self, stage: Stage) -> None:
        poller = zmq.Poller()
        for pollable in (self.control, self.receiver.socket, self.parent_sentinel):
            if pollable is not None:
                poller.register(pollable, zmq.POLLIN)
        while True:
            spinning = self.spec.busy_poll and bool(self._open_streams)  # between streams a wake-up costs nothing
            events = dict(poller.poll(0 if spinning else self._wait_timeout_ms()))
            if self.receiver.socket in events:
                envelope = self.receiver.receive()
                if envelope is not None:
                    self._handle(stage, envelope)
            if any(ready is not self.receiver.socket for ready in events):
                self._check_control()
            self._check_links()
            self._report_if_due()

    def _handle(self, stage: Stage, envelope: Envelope) -> None:
        began = time.time()
        wait_s = max(0.0, began - envelope.sent_time)
        for gap in envelope.gaps:
            add_gap(self._gaps.setdefault(envelope.stream_id, []), gap)
        if self.device_timer is not None:
            self.device_timer.start()
        started = time.perf_counter()
        if self.spec.throttle_ms:  # a deliberately slow stage: the sleep counts as service time
            time.sleep(self.spec.throttle_ms / 1000)
        if envelope.kind is Kind.DATA:
            self._open_streams.add(envelope.stream_id)
            outputs = stage.push(envelope.stream_id, envelope.item)
        else:
            outputs = stage.finish(envelope.stream_id)
        service_s = time.perf_counter() - started
        end_of_stream = envelope.kind is Kind.EOS
        record = ItemRecord(began, wait_s, service_s, capture_time=envelope.capture_time, end_of_stream=end_of_stream)
        if self.device_timer is not None:
            self.device_timer.stop(record)
        record.out_bytes = sum(
            self._send(envelope.stream_id, envelope.capture_time, Kind.DATA, item) for item in outputs
        )
        record.send_s = time.perf_counter() - started - service_s
        self.metrics.record(record)
        if envelope.kind is Kind.EOS:
            self._send(envelope.stream_id, envelope.capture_time, Kind.EOS)
            self._output_seq.pop(envelope.stream_id, None)
            self._open_streams.discard(envelope.stream_id)
            self.report("eos", stream=envelope.stream_id)
            self._report_at_end_of_stream()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Interrupt a wait for audio at once; a send in progress finishes, then the loop ends the stream.
        self._capture_interrupted = True
        if self._capture_reading:
            raise _CaptureInterrupted()

    def _on_drop(self, envelope: Envelope) -> None:
        """A chunk the capture's dropping queue left out: its place in the audio, after the gaps it carried (audio
        the source lost before it), travels on as gaps, so the text after it keeps the real audio's times."""
        for gap in envelope.gaps:
            self.sender.annotate(gap)
        for seq, start_s, length_s in self._recent_chunks:
            if seq == envelope.seq:
                self.sender.annotate([start_s, length_s])
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

    def _capture(self, source: Source, *, paced: bool) -> None:
        """Send the source's chunks as one stream; on its end or on SIGINT, close it, pass on the warnings it found
        while reading, and send end of stream. Audio the source lost (`dropped_before_s`) travels on as a gap.

        Its service time is reading a chunk (not when `paced`: then reading is waiting for the audio)."""
        stream_id = uuid.uuid4().hex[:8]
        # A source's warnings from opening its input the runner printed already: it inspects the input first.
        known_warnings = len(getattr(source, "warnings", []))
        signal.signal(signal.SIGINT, self._on_sigint)
        # Drops only ever concern the chunks still in the queue or at the sender: capacity of them at most.
        self._recent_chunks = deque(maxlen=self.spec.output_edge.capacity + 1)
        started = time.monotonic()
        chunks = iter(source.chunks())
        capture_time = time.time()
        position_s = 0.0
        try:
            while not self._capture_interrupted:
                self._capture_reading = True
                read_began = time.time()
                try:
                    chunk = next(chunks, None)
                finally:
                    self._capture_reading = False
                if chunk is None:
                    break
                capture_time = time.time()
                began = capture_time if paced else read_began
                self._check_control()
                if self.spec.throttle_ms:
                    time.sleep(self.spec.throttle_ms / 1000)
                length_s = len(chunk["samples"]) / chunk["sample_rate"]
                dropped_s = getattr(source, "dropped_before_s", 0.0)
                if dropped_s:  # the source itself lost audio just before this chunk (a microphone's full queue)
                    add_gap(self._gaps.setdefault(stream_id, []), [position_s, dropped_s])
                    position_s += dropped_s
                self._recent_chunks.append((self._output_seq.get(stream_id, 0), position_s, length_s))
                position_s += length_s
                if paced:
                    self._note_lag(started, position_s)
                record = ItemRecord(began, None, time.time() - began, capture_time=capture_time)
                send_started = time.perf_counter()
                record.out_bytes = self._send(stream_id, capture_time, Kind.DATA, chunk)
                record.send_s = time.perf_counter() - send_started
                self.metrics.record(record)
                self._report_if_due()
        except _CaptureInterrupted:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        source.close()
        for warning in getattr(source, "warnings", [])[known_warnings:]:
            self.report("warning", message=warning)
        self._send(stream_id, capture_time, Kind.EOS)
        self.report("eos", stream=stream_id)
        self._report_at_end_of_stream()


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
