"""Runs this host's part of a pipeline: one spawned process per stage, the sink in this process.

The supervisor owns a control ROUTER socket (one DEALER per stage), watches every stage process by its
sentinel, performs the startup handshake, receives the final events, and always shuts every process down.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from rich.console import Console

from runner.config import SINK, SOURCE, Pipeline, plan_edges
from runner.edges import EdgeReceiver, Policy
from runner.errors import RunnerError
from runner.metrics import format_table, write_chrome_trace
from runner.sink import TranscriptSink
from runner.stage_process import StageSpec, pack, stage_main, unpack
from runner.wire import Kind

DRAIN_TIMEOUT_S = 3.0  # after Ctrl-C, how long the end of stream may take to pass every stage
STOP_GRACE_S = 1.0  # how long a stage may take to exit after "stop" before it is terminated
TERMINATE_GRACE_S = 1.0  # and after SIGTERM before SIGKILL
PROGRESS_REFRESH_S = 0.25
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # the shell's convention for a run ended by SIGINT


class Interrupted(Exception):
    """Ctrl-C before audio started flowing."""


@dataclass
class StageState:
    """What the supervisor knows about one local stage process."""

    process: multiprocessing.Process
    status: str = "starting"
    started: float = field(default_factory=time.monotonic)
    load_s: float | None = None
    stats: dict = field(default_factory=dict)  # the stage's last report: queue counts, drops, metrics


def _exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class Supervisor:
    """Starts the stages of `local` (names from the pipeline), runs one stream through, stops everything."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        local: list[str],
        model_dir: Path | None,
        sink: TranscriptSink | None,
        console: Console,
        profile: Path | None = None,
    ):
        self.pipeline = pipeline
        self.local_stages = [name for name in pipeline.chain() if name in local and name != SINK]
        self.sink = sink if SINK in local else None
        self.model_dir = model_dir
        self.console = console
        self.profile = profile
        self.stages: dict[str, StageState] = {}
        self.interrupts = 0  # SIGINT/SIGTERM received during the run
        self._stopping = False
        self.context: zmq.Context | None = None
        self.control: zmq.Socket | None = None  # ROUTER: one DEALER per local stage, identified by name
        self.sink_receiver: EdgeReceiver | None = None
        self.poller = zmq.Poller()
        self._wake_read: socket.socket | None = None  # readable when a signal arrived (set_wakeup_fd)

    # --- setup ---

    def _spawn(self, run_dir: Path, control_endpoint: str) -> None:
        local = set(self.local_stages) | ({SINK} if self.sink is not None else set())
        edges = plan_edges(self.pipeline, local, run_dir)
        inputs = {edge.target: edge for edge in edges}
        outputs = {edge.source: edge for edge in edges}
        if self.sink is not None:
            self.sink_receiver = EdgeReceiver(self.context, inputs[SINK])
        spawn = multiprocessing.get_context("spawn")
        # Children start with SIGINT ignored (kept across exec) so Ctrl-C during their imports cannot kill them.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for name in self.local_stages:
                config = self.pipeline.stages[name]
                spec = StageSpec(
                    name=name,
                    control=control_endpoint,
                    output_edge=outputs[name],
                    input_edge=inputs.get(name),
                    device=config.device,
                    params=config.params,
                    impl=config.impl,
                    throttle_ms=config.throttle_ms,
                    model_dir=self.model_dir,
                    delay_ms=self.pipeline.delay_ms,
                    profile=self.profile is not None,
                )
                process = spawn.Process(target=stage_main, args=(spec,), name=f"voxtral-run: {name}")
                process.start()
                self.stages[name] = StageState(process)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupts += 1

    # --- the run ---

    def run(self) -> int:
        """Run this host's stages to the end of the stream; the process exit status."""
        run_dir = Path(tempfile.mkdtemp(prefix="voxtral-run-"))
        self.context = zmq.Context()
        self.control = self.context.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        control_endpoint = f"ipc://{run_dir / 'control'}"
        self.control.bind(control_endpoint)
        # Signals only count and wake the poll; the loops decide what they mean at each point of the run.
        old_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        self._wake_read, wake_write = socket.socketpair()
        wake_write.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for signum in old_handlers:
            signal.signal(signum, self._on_signal)
        status = EXIT_FAILED
        try:
            self._spawn(run_dir, control_endpoint)
            pollables = [self.control, self._wake_read.fileno(), *(s.process.sentinel for s in self.stages.values())]
            if self.sink_receiver is not None:
                pollables.append(self.sink_receiver.socket)
            for pollable in pollables:
                self.poller.register(pollable, zmq.POLLIN)
            self._handshake()
            for name in self.stages:
                self._send_control(name, "start")
            status = self._stream()
        except Interrupted:
            status = EXIT_INTERRUPTED
        finally:
            self._shutdown()
            if self.sink is not None:
                self.sink.close()
            self._report_losses()
            if self.profile is not None:
                self._write_profile()
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            self._wake_read.close()
            wake_write.close()
            if self.sink_receiver is not None:
                self.sink_receiver.close()
            self.control.close()
            self.context.term()
            shutil.rmtree(run_dir, ignore_errors=True)
        return status

    def _send_control(self, name: str, kind: str) -> None:
        self.control.send_multipart([name.encode(), pack({"type": kind})])

    def _poll(self, timeout_s: float | None) -> dict:
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        return dict(self.poller.poll(timeout_ms))

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
            elif kind == "stats":
                state.stats = message
            else:
                state.status = kind
                if kind == "ready":
                    state.load_s = message["load_s"]

    def _check_processes(self, events: dict) -> None:
        """Fail the run, naming the stage, if any stage process ended on its own."""
        for name, state in self.stages.items():
            if state.process.sentinel in events:
                self._drain_control()  # an error report sent just before exiting names the cause
                state.process.join()
                raise RunnerError(f"stage '{name}' died ({_exit_description(state.process.exitcode)})")

    def _take_signals(self, events: dict) -> None:
        if self._wake_read.fileno() in events:
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

    def _handshake(self) -> None:
        """Wait until every local stage reports ready (progress on a terminal), failing on error or timeout."""
        started = time.monotonic()
        deadline = started + self.pipeline.startup_timeout_s
        with self.console.status(self._progress_line()) as status:
            while any(state.status != "ready" for state in self.stages.values()):
                now = time.monotonic()
                if now >= deadline:
                    waiting = [name for name, state in self.stages.items() if state.status != "ready"]
                    raise RunnerError(
                        f"stages not ready after {self.pipeline.startup_timeout_s:g} s "
                        f"(startup_timeout_s): {', '.join(waiting)}"
                    )
                events = self._poll(min(PROGRESS_REFRESH_S, deadline - now))
                self._take_signals(events)
                if self.interrupts:
                    raise Interrupted()
                self._drain_control()
                self._check_processes(events)
                status.update(self._progress_line())
        if self.stages:
            names = ", ".join(self.stages)
            self.console.print(f"voxtral-run: ready in {time.monotonic() - started:.1f} s ({names})", highlight=False)

    def _stream(self) -> int:
        """Receive events until every local stage and the sink have seen the end of the stream."""
        waiting = set(self.stages) | ({SINK} if self.sink is not None else set())
        drain_deadline: float | None = None
        handled_interrupts = 0
        while waiting:
            timeout = None if drain_deadline is None else drain_deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self.console.print("voxtral-run: stopped before the end of the stream was drained", highlight=False)
                return EXIT_INTERRUPTED
            events = self._poll(timeout)
            self._take_signals(events)
            if self.interrupts > handled_interrupts:
                handled_interrupts = self.interrupts
                if handled_interrupts > 1:
                    return EXIT_INTERRUPTED
                drain_deadline = time.monotonic() + DRAIN_TIMEOUT_S
                self._stop_capture()
            self._drain_control()
            waiting -= {name for name, state in self.stages.items() if state.status == "eos"}
            self._check_processes(events)
            if self.sink_receiver is not None and self.sink_receiver.socket in events:
                envelope = self.sink_receiver.receive()
                if envelope is not None and envelope.kind is Kind.DATA:
                    self.sink.write(envelope.item)
                elif envelope is not None:
                    waiting.discard(SINK)
        return EXIT_INTERRUPTED if handled_interrupts else EXIT_OK

    def _stop_capture(self) -> None:
        """Ctrl-C: the capture stops reading and ends the stream, which then drains through the stages."""
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
        self._drain_control()

    def _write_profile(self) -> None:
        """The per-stage table on stderr and the Chrome trace file."""
        stats = {name: state.stats for name, state in self.stages.items()}
        self.console.print(format_table(stats), highlight=False, markup=False, soft_wrap=True)
        write_chrome_trace(self.profile, {name: report.get("records", []) for name, report in stats.items()})
        self.console.print(f"voxtral-run: trace written to {self.profile} (open it in Perfetto)", highlight=False)

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
