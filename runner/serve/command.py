"""What `voxtral-run serve` does once its options are checked: bind the address, start the pipeline's stages once
(a PipelineHub), serve the app over them with uvicorn, and on Ctrl-C or SIGTERM stop taking connections, end the
open streams with their last event, stop the stages and close the connections."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from voxtral_run.runner.config import Pipeline
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.metrics import format_table
from voxtral_run.runner.prometheus import RunCollector
from voxtral_run.runner.security import CurveKeys
from voxtral_run.runner.serve.app import create_app, uvicorn_config
from voxtral_run.runner.serve.pipeline_hub import PipelineHub
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.runner.stage_process import freeze_startup_heap
from voxtral_run.runner.supervisor import EXIT_INTERRUPTED, EXIT_OK, Interrupted, Launcher, Reporting

WATCH_S = 0.1  # how often the serving loop looks for a signal, a failed pipeline or a table due
# Once the open streams have their last event, how long their sessions have to send it before the connections close.
FINAL_EVENTS_S = 0.5
SHUTDOWN_TIMEOUT_S = 5.0  # how long connections may take to close once asked, before they are cut


class _Signals:
    """SIGINT and SIGTERM, counted: the first stops the server gracefully, a second at once."""

    def __init__(self) -> None:
        self.count = 0
        self.server: uvicorn.Server | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count > 1 and self.server is not None:
            self.server.force_exit = True


class _Server(uvicorn.Server):
    """uvicorn's server with the signals left to the command: uvicorn's own handling raises a signal again once it
    has stopped, which would end this process before it stops the stages and exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything starts: an unknown host or a taken port is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as error:
        raise RunnerError(f"--host {host}: cannot resolve it ({getattr(error, 'strerror', None) or error})") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise RunnerError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror})") from None
    return listener


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    pipeline: Pipeline,
    *,
    model_dir: Path,
    host: str,
    port: int,
    console: Console,
    reporting: Reporting,
    launcher: Launcher | None = None,
    local: list[str] | None = None,
    keys: CurveKeys | None = None,
) -> int:
    """Serve until Ctrl-C or SIGTERM; the exit status. RunnerError (one line, nothing left running) when the address
    is taken, the stages cannot start, or the pipeline fails while serving. `local` names this host's stages of a
    serve split over hosts (None: every stage), which link with the other hosts' under `keys`."""
    try:
        settings = ServeSettings(model_name=pipeline.model)  # clients name the model as --model does, as vLLM's do
    except ValueError as error:
        raise RunnerError(f"model: {error}") from None
    signals = _Signals()
    previous = {signum: signal.signal(signum, signals) for signum in (signal.SIGINT, signal.SIGTERM)}
    hub: PipelineHub | None = None
    try:
        with listen(host, port) as listener:
            hub = PipelineHub(
                pipeline,
                model_dir=model_dir,
                console=console,
                reporting=reporting,
                launcher=launcher,
                local=local,
                keys=keys,
            )
            if signals.count:  # while the queues were linking
                return EXIT_INTERRUPTED
            freeze_startup_heap()  # the server's loop carries every client's audio and text
            run_loop(_serve_until_stopped(hub, listener, settings, signals, console, reporting))
        hub.close()
        if hub.failure is not None:
            raise RunnerError(hub.failure)
        hub.report()
        return EXIT_OK
    except Interrupted:
        return EXIT_INTERRUPTED
    finally:
        if hub is not None:
            hub.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """`asyncio.run(main)` on uvloop's event loop where uvloop is installed (uvicorn's `standard` extra brings it
    on Linux and macOS): its C loop spends less of the server's one core per WebSocket message than asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve_until_stopped(
    hub: PipelineHub,
    listener: socket.socket,
    settings: ServeSettings,
    signals: _Signals,
    console: Console,
    reporting: Reporting,
) -> None:
    """Serve the app over `hub` until a signal or the pipeline failing, then stop taking connections, end the open
    streams with their last event, stop the stages and close the connections."""
    app = create_app(hub, settings)
    app.state.metrics.registry.register(RunCollector(hub.figures))  # the stages' figures on the app's /metrics
    config = uvicorn_config(app, settings, host=listener.getsockname()[0], port=listener.getsockname()[1])
    config.timeout_graceful_shutdown = SHUTDOWN_TIMEOUT_S
    server = signals.server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    announced = False
    every = reporting.stats_every_s
    next_table = time.monotonic() + every if every is not None else None
    while not serving.done() and not signals.count and hub.failure is None:
        await asyncio.wait({serving}, timeout=WATCH_S)
        if server.started and not announced:
            announced = True
            if not reporting.quiet:
                stages = ", ".join(hub.stage_names) or "every stage on other hosts"
                console.print(f"voxtral-run: serving on {_url(listener)} (ready in {hub.ready_s:.1f} s: {stages})")
        if next_table is not None and time.monotonic() >= next_table:
            figures = hub.figures()
            console.print(f"voxtral-run: figures at {figures.wall_s:.1f} s", markup=False)
            console.print(format_table(figures), markup=False, soft_wrap=True)
            next_table = max(next_table + every, time.monotonic())
    if not serving.done():
        if server.started:
            for listening in server.servers:  # no new connections while the open ones end
                listening.close()
        await asyncio.to_thread(hub.close)
        await asyncio.sleep(FINAL_EVENTS_S)
        server.should_exit = True
    await serving
