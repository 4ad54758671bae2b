"""Runs this host's part of a pipeline: one spawned process per stage, the sink in this process.

The supervisor owns a control ROUTER socket (one DEALER per stage), watches every stage process by its
sentinel, performs the startup handshake, receives the final events, and always shuts every process down.
It also gathers the stages' figures: the table after every run, and on request a live table, the figures as
JSON, a Chrome trace and a Prometheus endpoint. `run` is one run from start to end; a server keeps the stages
running instead (`start`, then `poll` and `check` in its own loop, then `stop`), feeding the queue out of the
capture and reading the one into the output itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import zmq
from rich.console import Console
from rich.markup import escape

from voxtral_run.runner.config import LOOPBACK, SINK, SOURCE, Pipeline, launched_edges, plan_edges
from voxtral_run.runner.edges import EdgeReceiver, EdgeSpec, Policy
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.heartbeat import RunnerHeartbeat
from voxtral_run.runner.metrics import (
    LogHistogram,
    RunFigures,
    chrome_trace,
    estimate_clock_offset,
    format_table,
)
from voxtral_run.runner.progress import AudioProgress
from voxtral_run.runner.prometheus import REPORT_EVERY_S, MetricsEndpoint
from voxtral_run.runner.security import CurveKeys, make_server, start_authenticator
from voxtral_run.runner.sink import StreamTranscripts, TranscriptSink
from voxtral_run.runner.stage_process import (
    LAG_WARNING_S,
    MAX_MESSAGES_PER_STEP,
    StageSpec,
    freeze_startup_heap,
    pack,
    stage_main,
    unpack,
)
from voxtral_run.runner.wire import Envelope, Kind
from voxtral_run.stages.audio.constants import SECONDS_PER_TOKEN, token_aligned_delay_ms
from voxtral_run.stages.base import StageError

DRAIN_TIMEOUT_S = 3.0  # after Ctrl-C, how long the streams' ends may take to pass every stage
STOP_GRACE_S = 1.0  # how long a stage may take to exit after "stop" before it is terminated
TERMINATE_GRACE_S = 1.0  # and after SIGTERM before SIGKILL
PROGRESS_REFRESH_S = 0.25
PROGRESS_REPORT_S = 0.5  # how often stages report while a progress bar is shown
# The stages whose items are tokens (one per 80 ms of audio), last first: the progress bar counts their items.
TOKEN_STAGES = ("detokenize", "decoder")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's convention for a run ended by SIGINT
CLOCK_PINGS = 4  # control round trips per stage before the start; the shortest gives its clock offset
RUN_DIR_PREFIX = "voxtral-run-"
OWNER_FILE = "owner"  # in a run folder: the runner's pid and start time, so a later run can remove it once dead


@dataclass(frozen=True)
class Reporting:
    """What a run reports besides the table printed at its end: a Chrome trace, a live table, the figures as
    JSON, a Prometheus endpoint."""

    trace: Path | None = None
    stats_every_s: float | None = None
    stats_json: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = LOOPBACK
    quiet: bool = False  # no start-up line and no table (the JSON figures and the trace are still written)
    progress_total_s: float | None = None  # a progress bar through this many seconds of audio
    live_figures: bool = False  # stages report as often as for --metrics-port (a server's own /metrics)

    @property
    def report_every_s(self) -> float | None:
        """How often stages report while running (None: only at the end)."""
        intervals = [self.stats_every_s] if self.stats_every_s is not None else []
        intervals += [REPORT_EVERY_S] if self.metrics_port is not None or self.live_figures else []
        intervals += [PROGRESS_REPORT_S] if self.progress_total_s is not None else []
        return min(intervals, default=None)


class Interrupted(Exception):
    """Ctrl-C before audio started flowing."""


Sink = TranscriptSink | StreamTranscripts  # one transcript, or one per stream of a run of several inputs


class StageHandle(Protocol):
    """A stage process as the supervisor watches and stops it: spawned here, or a Ray actor (`Launcher`)."""

    pid: int | None
    sentinel: int | None  # readable once the process ended (None: watch `is_alive` instead)

    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def describe_exit(self) -> str: ...


class LocalStage:
    """A stage process spawned on this host."""

    def __init__(self, process: multiprocessing.Process):
        self._process = process
        self.pid = process.pid
        self.sentinel = process.sentinel

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()

    def join(self, timeout: float | None = None) -> None:
        self._process.join(timeout)

    def describe_exit(self) -> str:
        exitcode = self._process.exitcode
        if exitcode is not None and exitcode < 0:
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"exit code {exitcode}"


class Launcher(ABC):
    """Starts stage processes on other machines (Ray actors) instead of spawning them here; every queue and the
    control sockets are then tcp, with the endpoints of the queues into the stages learnt from the stages."""

    @abstractmethod
    def runner_host(self) -> str:
        """The address of this process that the stages reach its sockets at."""

    @abstractmethod
    def gpu_count(self) -> int:
        """The GPUs `devices: all` means."""

    @abstractmethod
    def place(self, pipeline: Pipeline) -> None:
        """Make the stages' settings concrete where they will run (`device: auto`, unset threads)."""

    @abstractmethod
    def launch(self, specs: list[StageSpec]) -> tuple[dict[str, StageHandle], dict[str, str]]:
        """Start the stages whole (or none: RunnerError): their handles, and the endpoint each binds its input queue
        at, by stage name. A spec's output queue connects to an empty endpoint: the launcher fills it in."""

    @abstractmethod
    def release(self, handles: dict[str, StageHandle]) -> None:
        """Free what `launch` took for these stages, once they are stopped."""


def settings_note(settings: dict) -> str:
    """A stage's settings for the start-up line (console markup): ` [dtype bfloat16, kv_dtype fp8, ...]`, or
    nothing."""
    return escape(f" [{', '.join(f'{key} {value}' for key, value in settings.items())}]") if settings else ""


@dataclass
class StageState:
    """What the supervisor knows about one stage process."""

    process: StageHandle
    status: str = "starting"
    started: float = field(default_factory=time.monotonic)
    load_s: float | None = None
    settings: dict = field(default_factory=dict)  # what its core computes in (a model stage's number formats)
    stats: dict = field(default_factory=dict)  # the stage's last report: queue counts, drops, metrics
    answered: int = 0  # the latest request for its figures it answered (`ask_reports`)
    clock_samples: list[tuple[float, float, float]] = field(default_factory=list)  # (sent, replied, received)

    @property
    def clock_offset(self) -> float:
        """The stage's wall clock minus the runner's, in seconds."""
        return estimate_clock_offset(self.clock_samples) if self.clock_samples else 0.0


class Supervisor:
    """Starts the stages of `local` (names from the pipeline), runs the streams through (one, or one per input), stops
    everything; with `serve`, the capture is not started: the caller feeds `source_edge` and reads `sink_receiver`.
    A `launcher` places the stage processes elsewhere (Ray) instead of spawning them here. A `long_lived` run is a
    worker host of a server: its stages take stream after stream until a signal, which stops them at once."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        local: list[str],
        model_dir: Path | None,
        sink: Sink | None,
        console: Console,
        reporting: Reporting = Reporting(),
        keys: CurveKeys | None = None,
        serve: bool = False,
        launcher: Launcher | None = None,
        long_lived: bool = False,
    ):
        self.pipeline = pipeline
        self.launcher = launcher
        self.serve = serve
        self.long_lived = long_lived
        started_here = [name for name in local if name != SINK and not (serve and name == SOURCE)]
        self.local_stages = [name for name in pipeline.chain() if name in started_here]
        self.sink = sink if SINK in local else None
        self.sink_here = SINK in local and (self.sink is not None or serve)  # the output's queue ends here
        self.model_dir = model_dir
        self.console = console
        self.reporting = reporting
        self.keys = keys  # the deployment's, for queues to other invocations; else made per run when tcp is used
        self.stages: dict[str, StageState] = {}
        self.heartbeat: RunnerHeartbeat | None = None
        self.authenticator = None  # answers CURVE handshakes when the sink's queue is tcp
        self.e2e = LogHistogram() if self.sink_here else None  # latency of each delta at the sink
        self.sink_arrivals: list[list[float]] = []  # [arrival, capture time] per delta, for the trace
        self.stream_started: float | None = None  # wall clock, when the stages were told to start
        self.stream_ended: float | None = None
        self.ready_s: float | None = None  # how long the stages took to be ready
        self._figures_lock = threading.Lock()  # the metrics endpoint reads the figures from its own thread
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.interrupts = 0  # SIGINT/SIGTERM received during the run
        self._stopping = False
        self.run_dir: Path | None = None
        self.context: zmq.Context | None = None
        self.control: zmq.Socket | None = None  # ROUTER: one DEALER per local stage, identified by name
        self.sink_receiver: EdgeReceiver | None = None
        self.source_edge: EdgeSpec | None = None  # with `serve`: the queue out of the capture, which the caller feeds
        self.poller = zmq.Poller()
        self._wake_read: socket.socket | None = None  # readable when a signal arrived (set_wakeup_fd)

    # --- setup ---

    def _spawn(self, run_dir: Path, control_endpoint: str, heartbeat_endpoint: str) -> None:
        local = set(self.local_stages) | ({SINK} if self.sink_here else set()) | ({SOURCE} if self.serve else set())
        if self.launcher is None:
            edges = plan_edges(self.pipeline, local, run_dir)
        else:
            edges = launched_edges(self.pipeline, self.launcher.runner_host())
        inputs = {edge.target: edge for edge in edges}
        outputs = {edge.source: edge for edge in edges}
        if self.keys is None and any(edge.is_tcp for edge in edges):
            self.keys = CurveKeys.generate()  # this invocation runs both ends of every queue
        if self.serve:
            self.source_edge = outputs[SOURCE]
        if self.sink_here:
            if inputs[SINK].is_tcp and self.authenticator is None:
                self.authenticator = start_authenticator(self.context, self.keys)
            self.sink_receiver = EdgeReceiver(self.context, inputs[SINK], self.keys)
            if self.launcher is not None:  # the last stage connects to where the receiver bound
                last = inputs[SINK].source
                outputs[last] = replace(outputs[last], connect=self.sink_receiver.endpoint)
        specs = []
        for name in self.local_stages:
            config = self.pipeline.stages[name]
            specs.append(
                StageSpec(
                    name=name,
                    host=config.host,
                    control=control_endpoint,
                    heartbeat=heartbeat_endpoint,
                    output_edge=outputs[name],
                    input_edge=inputs.get(name),
                    device=config.device,
                    params=config.params,
                    impl=config.impl,
                    throttle_ms=config.throttle_ms,
                    threads=config.threads or 1,
                    busy_poll=bool(config.busy_poll),
                    gather_ms=config.gather_ms,
                    model_dir=self.model_dir,
                    delay_ms=self.pipeline.delay_ms,
                    profile=self.reporting.trace is not None,
                    report_every_s=self.reporting.report_every_s,
                    heartbeat_timeout_s=self.pipeline.heartbeat_timeout_s,
                    keys=self.keys,
                )
            )
        if self.launcher is not None:
            handles, endpoints = self.launcher.launch(specs)
            if self.serve:
                self.source_edge = replace(self.source_edge, connect=endpoints[self.source_edge.target])
            with self._figures_lock:
                self.stages = {spec.name: StageState(handles[spec.name]) for spec in specs}
            return
        spawn = multiprocessing.get_context("spawn")
        # Children start with SIGINT ignored (kept across exec) so Ctrl-C during their imports cannot kill them;
        # only the main thread can set it (elsewhere the children ignore it from their first line).
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            for spec in specs:
                process = spawn.Process(target=stage_main, args=(spec,), name=f"voxtral-run: {spec.name}")
                process.start()
                with self._figures_lock:
                    self.stages[spec.name] = StageState(LocalStage(process))
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupts += 1

    # --- the run ---

    def run(self) -> int:
        """Run this host's stages until every stream has ended or failed; the process exit status (a failed
        stream of several fails it too)."""
        status = EXIT_FAILED
        streamed = False
        failed = True  # until the run gets to its end or is interrupted
        output_error: StageError | RunnerError | None = None  # the transcript could not be finished
        with self.counting_signals():
            try:
                if self.reporting.metrics_port is not None:
                    self.metrics_endpoint = MetricsEndpoint(
                        self.reporting.metrics_host, self.reporting.metrics_port, self.figures
                    )
                self.start()
                freeze_startup_heap()  # this process receives every delta and times it: no long collection
                if self.stages and not self.reporting.quiet:
                    names = ", ".join(name + settings_note(state.settings) for name, state in self.stages.items())
                    self.console.print(f"voxtral-run: ready in {self.ready_s:.1f} s ({names})", highlight=False)
                status = self._stream()
                self.stream_ended = time.time()
                streamed = True
                failed = False
            except Interrupted:
                status = EXIT_INTERRUPTED
                failed = False
            finally:
                self._shutdown()
                if self.metrics_endpoint is not None:
                    self.metrics_endpoint.close()
                if self.sink is not None:
                    try:
                        partials = self.sink.close(complete=not failed)
                    except (StageError, RunnerError) as error:  # reported once the processes are cleaned up
                        output_error, partials = error, []
                    for partial in partials:
                        self.console.print(f"voxtral-run: the transcript up to the failure is in {partial}")
                self._report_losses()
                self._release()
        if output_error is not None:
            raise output_error
        if streamed:  # a run that failed says so in one line, without figures
            self.report()
        return status

    @contextmanager
    def counting_signals(self) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM only count in `interrupts` and wake the poll: the loops decide what
        they mean at each point. Outside the main thread, where no handler can be set, signals are left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        self._wake_read, wake_write = socket.socketpair()
        wake_write.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for signum in old_handlers:
            signal.signal(signum, self._on_signal)
        self.poller.register(self._wake_read.fileno(), zmq.POLLIN)
        try:
            yield
        finally:
            self.poller.unregister(self._wake_read.fileno())
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            self._wake_read.close()
            self._wake_read = None
            wake_write.close()

    def start(self) -> None:
        """Start this host's stages and let them run once each is ready (its clock offset measured): RunnerError when
        one fails or the wait times out, Interrupted on a signal counted; `stop` cleans up after it, come what may."""
        self.launch()
        self.await_ready()

    def launch(self) -> None:
        """Start this host's stage processes (or have the launcher place them), without waiting for them."""
        remove_stale_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
        (self.run_dir / OWNER_FILE).write_text(_process_identity(os.getpid()) or "")
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        if self.launcher is None:
            control_endpoint = f"ipc://{self.run_dir / 'control'}"
            heartbeat_endpoint = f"ipc://{self.run_dir / 'heartbeat'}"
            self.control.bind(control_endpoint)
        else:  # stages elsewhere reach the runner over tcp, at ports the OS picks, under the run's CURVE keys
            self.keys = self.keys or CurveKeys.generate()
            self.authenticator = start_authenticator(self.context, self.keys)
            make_server(self.control, self.keys)
            heartbeat_endpoint = control_endpoint = f"tcp://{self.launcher.runner_host()}:*"
            self.control.bind(control_endpoint)
            control_endpoint = self.control.getsockopt_string(zmq.LAST_ENDPOINT)
        self.heartbeat = RunnerHeartbeat(
            self.context, heartbeat_endpoint, self.pipeline.heartbeat_timeout_s, self.keys if self.launcher else None
        )
        self._spawn(self.run_dir, control_endpoint, self.heartbeat.endpoint)
        self.heartbeat.watch(self.stages)
        pollables = [self.control, *(state.process.sentinel for state in self.stages.values())]
        if self.sink_receiver is not None:
            pollables.append(self.sink_receiver.socket)
        for pollable in pollables:
            if pollable is not None:
                self.poller.register(pollable, zmq.POLLIN)

    def await_ready(self) -> None:
        """Wait until every stage launched is ready, then let them run (see `start`)."""
        self._handshake()
        self.stream_started = time.time()
        for name in self.stages:
            self._send_control(name, "start")

    def check(self, events: dict) -> None:
        """Take the control messages waiting (figures, warnings) and fail, naming the stage, when one reported an
        error, died or stopped beating: a server's loop calls it after each `poll`."""
        self._drain_control()
        self._check_processes(events)
        self._check_liveness()

    def ask_reports(self, asked: int) -> None:
        """Ask every stage for its figures now; each answers with a report, and notes `asked` as answered."""
        for name in self.stages:
            self._send_control(name, "report", asked=asked)

    def stop(self) -> None:
        """Stop every stage (collecting its last figures) and release the sockets and the run folder."""
        self._shutdown()
        self._release()

    def _release(self) -> None:
        """Close this process's sockets and remove the run folder (what `start` got as far as making)."""
        if self.sink_receiver is not None:
            self.sink_receiver.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.heartbeat is not None:
            self.heartbeat.close()
        if self.control is not None:
            self.control.close()
        if self.context is not None:
            self.context.term()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _send_control(self, name: str, kind: str, **fields: object) -> None:
        self.control.send_multipart([name.encode(), pack({"type": kind, **fields})])

    def _ping(self, name: str) -> None:
        self._send_control(name, "clock", sent=time.time())

    def poll(self, timeout_s: float | None) -> dict:
        """Wait for events at most `timeout_s`, and never past the next heartbeat check."""
        check_s = self.pipeline.heartbeat_timeout_s / 4
        timeout_s = check_s if timeout_s is None else min(timeout_s, check_s)
        return dict(self.poller.poll(max(0, int(timeout_s * 1000))))

    def _check_liveness(self) -> None:
        """Fail the run, naming it, when a stage stopped beating (stopped or frozen: it is killed at once), or
        when the sink's queue from another invocation lost its link."""
        for name in self.heartbeat.silent():
            state = self.stages[name]
            if state.process.is_alive():
                state.process.kill()  # SIGKILL ends a stopped process too
            raise RunnerError(
                f"stage '{name}' stopped responding: no heartbeat for {self.pipeline.heartbeat_timeout_s:g} s "
                "(heartbeat_timeout_s)"
            )
        if self.sink_receiver is not None:
            self.sink_receiver.check_link()

    def _drain_control(self) -> None:
        """Take every waiting control message; an error report fails the run at once."""
        while self.control.poll(0, zmq.POLLIN):
            identity, payload = self.control.recv_multipart()
            name = identity.decode()
            message = unpack(payload)
            state = self.stages[name]
            kind = message["type"]
            if kind == "error":
                if not self._stopping:
                    raise RunnerError(f"stage '{name}' failed: {message['message']}")
            elif kind == "warning":
                self.console.print(f"voxtral-run: warning: {name}: {message['message']}", highlight=False)
            elif kind == "stats":
                state.stats = message
                state.answered = max(state.answered, message.get("answers", 0))
            elif kind == "clock":
                state.clock_samples.append((message["sent"], message["replied"], time.time()))
                if len(state.clock_samples) < CLOCK_PINGS:
                    self._ping(name)
            else:
                state.status = kind
                if kind == "ready":
                    state.load_s = message["load_s"]
                    state.settings = message.get("settings", {})
                    self._ping(name)

    def _check_processes(self, events: dict) -> None:
        """Fail the run, naming the stage, if any stage process ended on its own."""
        for name, state in self.stages.items():
            sentinel = state.process.sentinel
            if (sentinel in events) if sentinel is not None else not state.process.is_alive():
                self._drain_control()  # an error report sent just before exiting names the cause
                state.process.join()
                raise RunnerError(f"stage '{name}' died ({state.process.describe_exit()})")

    def _take_signals(self, events: dict) -> None:
        if self._wake_read is not None and self._wake_read.fileno() in events:
            self._wake_read.recv(4096)

    def _progress_line(self) -> str:
        now = time.monotonic()
        parts = []
        for name, state in self.stages.items():
            if state.status == "ready":
                parts.append(f"[green]{name} ready[/]")
            else:
                parts.append(f"{name} {state.status} {now - state.started:.1f} s")
        return "starting stages: " + ", ".join(parts)

    @staticmethod
    def _started_up(state: StageState) -> bool:
        """Ready, and its clock offset measured."""
        return state.status == "ready" and len(state.clock_samples) >= CLOCK_PINGS

    def _handshake(self) -> None:
        """Wait until every local stage is ready and its clock offset measured (progress on a terminal), failing on
        error or timeout."""
        started = time.monotonic()
        deadline = started + self.pipeline.startup_timeout_s
        with self.console.status(self._progress_line()) if not self.reporting.quiet else nullcontext() as status:
            while waiting := [name for name, state in self.stages.items() if not self._started_up(state)]:
                now = time.monotonic()
                if now >= deadline:
                    raise RunnerError(
                        f"stages not ready after {self.pipeline.startup_timeout_s:g} s "
                        f"(startup_timeout_s): {', '.join(waiting)}"
                    )
                events = self.poll(min(PROGRESS_REFRESH_S, deadline - now))
                self._take_signals(events)
                if self.interrupts:
                    raise Interrupted()
                self._drain_control()
                self._check_processes(events)
                self._check_liveness()
                if status is not None:
                    status.update(self._progress_line())
        self.ready_s = time.monotonic() - started

    def _stream(self) -> int:
        """Receive events until every local stage and the sink have seen the last message: every stream ended."""
        waiting = set(self.stages) | ({SINK} if self.sink is not None else set())
        progress = self._progress_bar()
        try:
            return self._receive_until_done(waiting, progress)
        finally:
            if progress is not None:
                progress.close()

    def _progress_bar(self) -> AudioProgress | None:
        """A progress bar when one was asked for and a token stage runs here to count the audio done."""
        total_s = self.reporting.progress_total_s
        if total_s is None or self.reporting.quiet or not any(name in self.stages for name in TOKEN_STAGES):
            return None
        return AudioProgress(self.console, total_s)

    def _audio_done_s(self) -> float:
        """Seconds of audio the last local token stage has turned into tokens: its messages but streams' ends."""
        name = next(name for name in TOKEN_STAGES if name in self.stages)
        metrics = self.stages[name].stats.get("metrics", {})
        return (metrics.get("items", 0) - metrics.get("ends", 0)) * SECONDS_PER_TOKEN

    def _receive_until_done(self, waiting: set[str], progress: AudioProgress | None) -> int:
        drain_deadline: float | None = None
        every = self.reporting.stats_every_s
        next_table = time.monotonic() + every if every is not None else None
        handled_interrupts = 0
        while waiting:
            now = time.monotonic()
            if drain_deadline is not None and drain_deadline <= now:
                self.console.print("voxtral-run: stopped before the end of the stream was drained", highlight=False)
                return EXIT_INTERRUPTED
            if next_table is not None and next_table <= now:
                figures = self.figures()
                self.console.print(f"voxtral-run: figures at {figures.wall_s:.1f} s", highlight=False)
                self._print_table(figures)
                next_table = max(next_table + every, now)
            deadlines = [deadline for deadline in (drain_deadline, next_table) if deadline is not None]
            if progress is not None:
                progress.update(self._audio_done_s())
                deadlines.append(now + PROGRESS_REFRESH_S)
            events = self.poll(min(deadlines) - now if deadlines else None)
            self._take_signals(events)
            if self.interrupts > handled_interrupts:
                handled_interrupts = self.interrupts
                if self.long_lived:  # a server's streams have no end to drain towards: stopping is the normal end
                    return EXIT_OK
                if handled_interrupts > 1:
                    return EXIT_INTERRUPTED
                drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
                self._stop_capture()
            self._drain_control()
            waiting -= {name for name, state in self.stages.items() if state.status == "done"}
            self._check_processes(events)
            self._check_liveness()
            if self.sink_receiver is not None and self.sink_receiver.socket in events:
                for envelope in self.sink_receiver.receive_waiting(MAX_MESSAGES_PER_STEP):
                    if envelope.kind is Kind.LAST:
                        waiting.discard(SINK)
                        continue
                    self.sink.take(envelope)
                    if envelope.kind is Kind.DATA:
                        self.note_arrival(envelope)
        if handled_interrupts:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if isinstance(self.sink, StreamTranscripts) and self.sink.failures else EXIT_OK

    def note_arrival(self, envelope: Envelope) -> None:
        """Count a delta's end-to-end latency: its arrival here minus the capture time of the audio chunk whose
        processing emitted it. The token a chunk triggers describes audio captured `delay` before that chunk, so
        this is the latency beyond the configured delay, as intended."""
        if not isinstance(envelope.item, dict) or envelope.item.get("type") != "delta":
            return
        arrival = time.time()
        with self._figures_lock:
            self.e2e.add(arrival - envelope.capture_time)
        if self.reporting.trace is not None:
            self.sink_arrivals.append([arrival, envelope.capture_time])

    def _stop_capture(self) -> None:
        """Ctrl-C: the capture stops reading and ends its streams, which then drain through the stages."""
        capture = self.stages.get(SOURCE)
        self.console.print("voxtral-run: stopping (Ctrl-C again to stop at once)", highlight=False)
        if capture is not None and capture.process.is_alive():
            os.kill(capture.process.pid, signal.SIGINT)

    # --- teardown ---

    def _shutdown(self) -> None:
        """Stop every stage: ask, then SIGTERM, then SIGKILL; collect their last stats."""
        self._stopping = True
        for name, state in self.stages.items():
            if state.process.is_alive():
                self._send_control(name, "stop")
        for grace, escalate in ((STOP_GRACE_S, "terminate"), (TERMINATE_GRACE_S, "kill")):
            deadline = time.monotonic() + grace
            for state in self.stages.values():
                state.process.join(max(0.0, deadline - time.monotonic()))
            alive = [state.process for state in self.stages.values() if state.process.is_alive()]
            for process in alive:
                getattr(process, escalate)()
        for state in self.stages.values():
            state.process.join()
        if self.launcher is not None and self.stages:
            self.launcher.release({name: state.process for name, state in self.stages.items()})
        if self.control is not None:  # else the run failed before it had any stage
            self._drain_control()

    # --- figures ---

    def figures(self) -> RunFigures:
        """The run's figures now: the stages' last reports, the sink's latencies, the stream's wall time."""
        with self._figures_lock:
            started = self.stream_started
            wall_s = (self.stream_ended or time.time()) - started if started is not None else 0.0
            return RunFigures(
                stages={name: state.stats for name, state in self.stages.items()},
                wall_s=wall_s,
                e2e=self.e2e.copy() if self.e2e is not None else None,
                # The delay the model runs: the pipeline's in whole 80 ms tokens, None for the model's own.
                delay_ms=None if self.pipeline.delay_ms is None else token_aligned_delay_ms(self.pipeline.delay_ms),
                clock_offsets={name: state.clock_offset for name, state in self.stages.items()},
            )

    def _print_table(self, figures: RunFigures) -> None:
        self.console.print(format_table(figures), highlight=False, markup=False, soft_wrap=True)

    def report(self) -> None:
        """After the stream: the table on stderr, and the JSON figures and the trace where asked for."""
        figures = self.figures()
        report_figures(figures, self.reporting, self.console)
        if self.reporting.trace is not None:
            trace = chrome_trace(
                {name: state.stats.get("records", []) for name, state in self.stages.items()},
                origin=self.stream_started,
                clock_offsets=figures.clock_offsets,
                sink=self.sink_arrivals if self.sink is not None else None,
                metadata={"delay_ms": figures.delay_ms},
            )
            _write(self.reporting.trace, "--profile", json.dumps(trace))
            self.console.print(f"voxtral-run: trace written to {self.reporting.trace} (open it in Perfetto)")

    def _report_losses(self) -> None:
        """Print the drops of every drop-policy queue and the capture's input overflows."""
        for state in self.stages.values():
            stats = state.stats
            if stats.get("policy", Policy.BLOCK.value) != Policy.BLOCK.value:
                self.console.print(
                    f"voxtral-run: queue {stats['edge']} ({stats['policy']}) dropped {stats['dropped']} of "
                    f"{stats['dropped'] + stats['sent']} messages",
                    highlight=False,
                )
            if stats.get("overflows"):
                self.console.print(f"voxtral-run: capture input overflows: {stats['overflows']}", highlight=False)
            if stats.get("late_chunks"):
                self.console.print(
                    f"voxtral-run: the capture fell behind real time by up to {stats['max_lag_s']:.1f} s "
                    f"({stats['late_chunks']} chunks over {LAG_WARNING_S:g} s late)",
                    highlight=False,
                )


def report_figures(figures: RunFigures, reporting: Reporting, console: Console) -> None:
    """The table of a run's figures on stderr (unless quiet), and the figures as JSON where asked for."""
    if not reporting.quiet:
        console.print(format_table(figures), highlight=False, markup=False, soft_wrap=True)
    if reporting.stats_json is not None:
        _write(reporting.stats_json, "--stats-json", json.dumps(figures.to_json(), indent=2))


def _process_identity(pid: int) -> str | None:
    """A process's pid and start time (so a reused pid is not taken for it), or None if it is not running."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:  # no /proc: the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        start = "?"
    return f"{pid} {start}"


def remove_stale_run_dirs() -> None:
    """Remove the run folders of runners that died without cleaning up (SIGKILL): those whose owner is gone."""
    for run_dir in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            if run_dir.stat().st_uid != os.getuid():
                continue
            owner = (run_dir / OWNER_FILE).read_text().split()
        except OSError:  # not ours, being created, or already gone
            continue
        if len(owner) == 2 and owner[0].isdigit() and _process_identity(int(owner[0])) != " ".join(owner):
            shutil.rmtree(run_dir, ignore_errors=True)


def _write(path: Path, flag: str, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise RunnerError(f"{flag} {path}: cannot write ({error.strerror})") from None
