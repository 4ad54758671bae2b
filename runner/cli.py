"""The `voxtral-run` command: run a pipeline.yaml, each stage in its own process, and write the transcript."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from voxtral_run.runner.config import (
    LOOPBACK,
    MPS_OFF,
    MPS_ON,
    SINK,
    SOURCE,
    Pipeline,
    capture_all_graphs,
    load_pipeline,
    model_stage_ceiling,
    place_local_stages,
    replica_pipelines,
)
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.mps import mps_for
from voxtral_run.runner.ray_placement import LOCAL_CLUSTER, RayPlacement
from voxtral_run.runner.security import KEYS_VARIABLE, CurveKeys, default_key_file, load_or_create_key_file
from voxtral_run.runner.sink import LiveText, StreamTranscripts, TranscriptSink, transcript_name
from voxtral_run.runner.supervisor import EXIT_FAILED, Launcher, Reporting, Supervisor
from voxtral_run.runner.wire import MAX_INPUT_CHARS, printable_line
from voxtral_run.stages.audio.capture import MAX_STREAMS, expand_inputs, inspect_capture
from voxtral_run.stages.audio.constants import MAX_DELAY_MS, MIN_DELAY_MS
from voxtral_run.stages.base import StageError
from voxtral_run.stages.model.hub import resolve_model
from voxtral_run.stages.text.writers import FORMATS, open_writer

# Stages that read the model directory (weights or tekken.json); a host running none of them needs no model.
MODEL_READING_STAGES = ("mel", "encoder", "decoder", "detokenize")
TEXT_FORMAT = "text"
PIPELINE_SUFFIXES = (".yaml", ".yml")
OUTPUT_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".srt": "srt", ".vtt": "vtt"}

HELP = """Transcribe speech with Voxtral Mini 4B Realtime, each pipeline stage running as its own process.

PIPELINE is a YAML file naming the model, the stages (device, host, parameters) and the queues between them;
the repository's pipeline.yaml is the default (built in: an audio file in its place runs it) and documents every
key.

\b
Examples:
  voxtral-run talk.wav                                        the default pipeline: live text in the terminal
  voxtral-run talk.m4a -o talk.srt                            subtitles (format from the extension), progress bar
  voxtral-run pipeline.yaml --input talk.wav                  the same, the pipeline spelled out
  voxtral-run a.wav b.wav c.wav -o transcripts/               several files at once: a transcript each
  voxtral-run pipeline.yaml --input calls/ --streams 8        a folder's audio files, 8 at a time
  arecord -f S16_LE -r 16000 | voxtral-run pipeline.yaml --input - --rate 16000
  voxtral-run pipeline.yaml --input mic                       (see --list-devices)
  voxtral-run pipeline.yaml --set encoder.device=cuda:1 --set decoder.dtype=float32
  voxtral-run pipeline.yaml --stages encoder,decoder          this host's part of a multi-host run
  voxtral-run pipeline.yaml --input talk.wav --profile trace.json --stats-json stats.json
  voxtral-run serve pipeline.yaml --port 8000                 serve many clients at once (voxtral-run serve --help)

After every run a per-stage table goes to stderr: items, service and queue-wait percentiles, utilisation, queue
peaks, drops, end-to-end latency and the bottleneck stage. Ctrl-C stops the capture and writes what was
transcribed so far; a second Ctrl-C stops at once.
"""
MAX_PORT = 65535
MIN_STATS_EVERY_S = 0.1
RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")

KeysOption = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="CURVE key file shared by the invocations of a split run or serve (--stages); created on first use. "
        f"Default: ${KEYS_VARIABLE}, else ~/.config/voxtral-run/curve.key.",
    ),
]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Start every stage as an actor of a Ray cluster (pip install 'voxtral-run[ray]'): at ADDRESS "
        "(host:port, ray://..., auto), or Ray's default without one. `host` names a node's custom resource.",
    ),
]

app = typer.Typer(add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]})


def _list_devices() -> None:
    from voxtral_run.stages.audio.capture import list_input_devices

    for device in list_input_devices():
        print(f"{device['index']:3d}  {device['name']}  ({device['channels']} ch, {device['default_rate']} Hz)")


def _local_nodes(stages: str | None, nodes: list[str]) -> list[str]:
    if stages is None:
        return nodes
    chosen = [name.strip() for name in stages.split(",") if name.strip()]
    for name in chosen:
        if name not in nodes:
            raise RunnerError(f"--stages: unknown stage '{name}' (this pipeline has {', '.join(nodes)})")
    if not chosen:
        raise RunnerError("--stages: give at least one stage name")
    return chosen


def _model_dir(pipeline: Pipeline, local: list[str]) -> Path | None:
    """The model directory, where this host runs a stage that reads it."""
    needs_model = any(name in MODEL_READING_STAGES and pipeline.stages[name].impl is None for name in local)
    return resolve_model(pipeline.model) if needs_model else None


def _deployment_keys(keys: Path | None) -> CurveKeys:
    """The key every invocation of a split run shares: --keys, else $VOXTRAL_RUN_KEYS, else the user's default
    key file; created (0600) on first use."""
    if keys is not None:
        return load_or_create_key_file(keys, "--keys")
    if os.environ.get(KEYS_VARIABLE):
        return load_or_create_key_file(Path(os.environ[KEYS_VARIABLE]), KEYS_VARIABLE)
    return load_or_create_key_file(default_key_file(), "key file")


def _print_version(value: bool) -> None:
    if value:
        print(f"voxtral-run {importlib.metadata.version('voxtral-run')}")
        raise typer.Exit()


def _pipeline_and_input(paths: list[Path], inputs: list[str]) -> tuple[Path | None, str | list[str] | None]:
    """The pipeline file and the input (a list for several): an audio file where PIPELINE goes (the whisper
    habit) is the input of the default pipeline, and the arguments after PIPELINE or after --input's file are more
    inputs."""
    pipeline, audio = None, [str(path) for path in paths]
    if paths and paths[0].suffix.lower() in PIPELINE_SUFFIXES:
        pipeline, audio = paths[0], audio[1:]
    elif paths and inputs:
        raise RunnerError(
            f"{paths[0]} is not a pipeline YAML (.yaml or .yml) and --input is given too: "
            f"voxtral-run pipeline.yaml --input {inputs[0]}"
        )
    given = [*inputs, *audio]
    if not given:
        if pipeline is None:
            raise RunnerError("missing PIPELINE and --input: try voxtral-run talk.wav, or see --help")
        return pipeline, None
    return pipeline, given[0] if len(given) == 1 else given


def _several_inputs(value: object) -> bool:
    """Whether the input is several streams: a list of files, or a directory."""
    return isinstance(value, list) or (isinstance(value, str) and Path(value).is_dir())


def _stream_outputs(format: str | None, output: Path | None, inputs: object) -> str:
    """For several inputs: --format (text unless given), and --output a writable folder in which no two inputs'
    transcripts would have the same name; without it, a format that can share stdout."""
    format = format or TEXT_FORMAT
    if format not in FORMATS:
        raise RunnerError(f"--format: unknown format '{format}' (choose from {', '.join(FORMATS)})")
    if output is None:
        if format not in (TEXT_FORMAT, "jsonl"):
            raise RunnerError(f"--format {format} with several inputs needs --output FOLDER (a file per input)")
        return format
    if not output.is_dir():
        raise RunnerError(f"--output {output}: with several inputs, give an existing folder (a transcript per input)")
    if not os.access(output, os.W_OK):
        raise RunnerError(f"--output {output}: the folder is not writable")
    owners: dict[str, str] = {}
    for name in inputs if isinstance(inputs, list) else []:
        transcript = transcript_name(printable_line(name, MAX_INPUT_CHARS), format)
        if transcript in owners:
            raise RunnerError(f"--output {output}: {owners[transcript]} and {name} would both write {transcript}")
        owners[transcript] = name
    return format


def _transcript_format(format: str | None, output: Path | None) -> str:
    """--format, else the format --output's extension names, else text; the output's folder checked writable."""
    if format is None:
        format = OUTPUT_SUFFIXES.get(output.suffix.lower(), TEXT_FORMAT) if output is not None else TEXT_FORMAT
    if format not in FORMATS:
        raise RunnerError(f"--format: unknown format '{format}' (choose from {', '.join(FORMATS)})")
    if output is not None:
        folder = output.parent
        if output.is_dir():
            raise RunnerError(f"--output {output}: is a directory; give a file name")
        if not folder.is_dir():
            raise RunnerError(f"--output {output}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise RunnerError(f"--output {output}: the folder {folder} is not writable")
    return format


def _check_capture(params: dict) -> float | None:
    """The capture's settings and inputs checked before any process starts (warnings printed), a directory
    replaced by its audio files; the input files' duration in seconds where every file says."""
    if params.get("input") is not None:
        params["input"] = expand_inputs(params["input"])
    sources = inspect_capture(params)
    for source in sources:
        for warning in source.warnings:
            print(f"voxtral-run: warning: {warning}", file=sys.stderr)
    durations = [source.duration_s for source in sources]
    return sum(durations) if durations and None not in durations else None


@app.command(help=HELP)
def run(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="PIPELINE [AUDIO]...",
            help="Pipeline YAML file, then more audio files; an audio file first is transcribed with the default "
            "pipeline.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model directory or Hugging Face repo id (overrides the YAML's model).")
    ] = None,
    input: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            help="Audio file (WAV, FLAC, OGG), a folder of them, '-' for stdin (raw s16le or WAV), or 'mic'. Several "
            "files (repeated, or after it) or a folder are transcribed at once, each its own stream.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the transcript to this file (live text still shows); with several inputs, a folder that "
            "gets one per input (its name, the format's extension).",
        ),
    ] = None,
    streams: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="With several inputs, how many are transcribed at once (default: as many as the encoder and "
            f"decoder take at once, their max_streams; all, up to {MAX_STREAMS}, where that is not known here).",
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="Transcript format: text, jsonl, srt or vtt (default: from --output's extension)."
        ),
    ] = None,
    delay_ms: Annotated[
        int | None, typer.Option(help="Transcription delay in ms (80..2400; default: the YAML's, else the model's).")
    ] = None,
    rate: Annotated[int | None, typer.Option(help="Sample rate of raw stdin audio, or the microphone's rate.")] = None,
    channels: Annotated[int | None, typer.Option(help="Channels of raw stdin audio or of the microphone.")] = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="Feed an audio file at real-time pace, as if it were live.")
    ] = False,
    mic_device: Annotated[
        str | None, typer.Option(help="Microphone to use with --input mic: index or name (see --list-devices).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="STAGE.KEY=VALUE",
            help="Override a stage setting, stage.key=value, or a top-level one, key=value (repeatable): "
            "encoder.device=cuda:1, mps=off.",
        ),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            metavar="A,B", help="Run only these stages (comma-separated; 'output' is the transcript sink) on this host."
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Write a Chrome trace to FILE (open in Perfetto or chrome://tracing): a track per stage, a slice "
            "per step with its batch sizes, each 80 ms frame followed across stages; tools/profile_report.py draws "
            "it as a PNG.",
        ),
    ] = None,
    stats_every: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Also print the per-stage table every SECONDS while the run goes on."),
    ] = None,
    stats_json: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Write the end-of-run figures (per stage and end to end) to FILE as JSON."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Serve the same figures as Prometheus metrics on http://HOST:N/metrics during the run "
            "(HOST: --metrics-host).",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(metavar="HOST", help="Address the metrics endpoint listens on.")
    ] = LOOPBACK,
    keys: KeysOption = None,
    ray: RayOption = None,
    list_devices: Annotated[bool, typer.Option("--list-devices", help="List microphones and exit.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No start-up line, progress bar or table of figures.")
    ] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if list_devices:
            _list_devices()
            return
        pipeline, input = _pipeline_and_input(paths or [], input or [])
        if stats_every is not None and not stats_every >= MIN_STATS_EVERY_S:
            raise RunnerError(f"--stats-every: give at least {MIN_STATS_EVERY_S:g} seconds, not {stats_every:g}")
        if metrics_port is not None and not 1 <= metrics_port <= MAX_PORT:
            raise RunnerError(f"--metrics-port: give a port from 1 to {MAX_PORT}, not {metrics_port}")
        if delay_ms is not None and not MIN_DELAY_MS <= delay_ms <= MAX_DELAY_MS:
            raise RunnerError(f"--delay-ms: {delay_ms} is outside {MIN_DELAY_MS}..{MAX_DELAY_MS} ms")
        config = load_pipeline(pipeline, set_ or [])
        capture_params = {
            "input": input,
            "rate": rate,
            "channels": channels,
            "realtime": realtime or None,
            "mic_device": int(mic_device) if mic_device and mic_device.isdigit() else mic_device,
            "streams": streams,
        }
        config.stages[SOURCE].params.update({key: value for key, value in capture_params.items() if value is not None})
        if model is not None:
            config.model = model
        if delay_ms is not None:
            config.delay_ms = delay_ms
        if ray is not None and stages is not None:
            raise RunnerError("--ray places every stage itself; leave out --stages")
        if len(replica_pipelines(config)) > 1:
            raise RunnerError("replicas: a run of files uses one chain; voxtral-run serve routes streams to replicas")
        local = _local_nodes(stages, config.chain())
        capture = config.stages[SOURCE].params
        several = _several_inputs(capture.get("input"))
        if SINK in local and not several:
            format = _transcript_format(format, output)
        duration_s = _check_capture(capture) if SOURCE in local else None
        if SINK in local and several:
            format = _stream_outputs(format, output, capture.get("input"))
        launcher = _ray_launcher(ray, config)
        if launcher is None:
            place_local_stages(config, local)
        else:
            launcher.place(config)
        if several and "streams" not in capture and (ceiling := model_stage_ceiling(config)) is not None:
            # Past the model stages' ceiling a stream waits there with its input held: start no more at once.
            capture["streams"] = min(ceiling, MAX_STREAMS)
        model_dir = _model_dir(config, local)
        # With --output, a terminal shows a progress bar through a file instead of the live text.
        progress = duration_s is not None and not quiet and console.is_terminal
        progress = progress and (output is not None or not sys.stdout.isatty())
        sink = None
        if SINK in local and several:
            report = functools.partial(console.print, markup=False)
            sink = StreamTranscripts(format, output, sys.stdout, report, show_text=not progress)
        elif SINK in local:
            if output is None and format == TEXT_FORMAT:
                sink = TranscriptSink(None, live=LiveText(sys.stdout))  # the live text is the transcript
            elif output is None:
                sink = TranscriptSink(open_writer(format, None, sys.stdout))
            else:
                live = None if progress else LiveText(sys.stdout)
                sink = TranscriptSink(open_writer(format, output), live=live)
        reporting = Reporting(
            profile, stats_every, stats_json, metrics_port, metrics_host, quiet, duration_s if progress else None
        )
        # Queues to other invocations authenticate with the deployment's key; a run all here makes its own.
        deployment_keys = _deployment_keys(keys) if set(local) != set(config.chain()) else None
        supervisor = Supervisor(
            config,
            local=local,
            model_dir=model_dir,
            sink=sink,
            console=console,
            reporting=reporting,
            keys=deployment_keys,
            launcher=launcher,
        )
        with mps_for(config.mps if launcher is None else MPS_OFF, [config], local, console, quiet=quiet):
            status = supervisor.run()
    except (RunnerError, StageError) as error:
        console.print(f"voxtral-run: error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    raise typer.Exit(status)


SERVE_HELP = """Serve transcription to many clients at once: start the pipeline's stages once and keep them, this
process taking the places of the capture and the output.

PIPELINE is a pipeline YAML as for a run (default: the built-in pipeline.yaml); its capture stage is not started.
Clients connect over WebSocket (/v1/realtime, in vLLM's or OpenAI's realtime dialect) and HTTP
(/v1/audio/transcriptions, /v1/models, /health, /metrics, and a page at /).

\b
Examples:
  voxtral-run serve                                           the default pipeline on http://127.0.0.1:8000
  voxtral-run serve pipeline.yaml --model DIR --host 0.0.0.0 --port 9000
  voxtral-run serve pipeline.yaml --set encoder.max_streams=64 --set decoder.max_streams=64
  voxtral-run serve pipeline.yaml --stages capture,resample,mel,output --host 0.0.0.0    split: the server's host
  voxtral-run serve pipeline.yaml --stages encoder,decoder,detokenize    a worker host's stages (serve until stopped)

One line says where it serves once every stage is ready. Ctrl-C or SIGTERM stops taking connections, ends the
open streams with an error event (server_shutting_down), stops the stages and exits 0; a second stops at once.
"""
DEFAULT_SERVE_PORT = 8000

serve_app = typer.Typer(
    add_completion=False, rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]}
)


@serve_app.command(help=SERVE_HELP)
def serve(
    pipeline: Annotated[
        Path | None,
        typer.Argument(
            metavar="PIPELINE", help="Pipeline YAML file (default: the built-in pipeline.yaml).", show_default=False
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(metavar="HOST", help=f"Address to listen on (default {LOOPBACK}).", show_default=False)
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help=f"Port to listen on (default {DEFAULT_SERVE_PORT}; 0: a free one, named in the ready line).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model directory or Hugging Face repo id (overrides the YAML's); clients name it so."),
    ] = None,
    delay_ms: Annotated[
        int | None,
        typer.Option(help="Default transcription delay in ms (80..2400; a client may ask for its own)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="STAGE.KEY=VALUE",
            help="Override a stage setting, stage.key=value, or a top-level one, key=value (repeatable): "
            "encoder.max_streams=64, mps=off.",
        ),
    ] = None,
    stats_every: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Also print the per-stage table every SECONDS while serving."),
    ] = None,
    stats_json: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="Write the figures (per stage and end to end) to FILE as JSON on exit."),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            metavar="A,B",
            help="Run only these stages on this host: with capture and output, the server (the other stages on "
            "worker hosts); without them, a worker host's stages, serving the server's streams until stopped.",
        ),
    ] = None,
    keys: KeysOption = None,
    ray: RayOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No start-up progress, ready line or table of figures.")
    ] = False,
) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if port is not None and not 0 <= port <= MAX_PORT:
            raise RunnerError(f"--port: give a port from 0 to {MAX_PORT}, not {port}")
        if stats_every is not None and not stats_every >= MIN_STATS_EVERY_S:
            raise RunnerError(f"--stats-every: give at least {MIN_STATS_EVERY_S:g} seconds, not {stats_every:g}")
        if delay_ms is not None and not MIN_DELAY_MS <= delay_ms <= MAX_DELAY_MS:
            raise RunnerError(f"--delay-ms: {delay_ms} is outside {MIN_DELAY_MS}..{MAX_DELAY_MS} ms")
        if stats_json is not None and not stats_json.parent.is_dir():
            raise RunnerError(f"--stats-json {stats_json}: the folder {stats_json.parent} does not exist")
        config = load_pipeline(pipeline, set_ or [])
        capture_all_graphs(config)
        if model is not None:
            config.model = model
        if delay_ms is not None:
            config.delay_ms = delay_ms
        if ray is not None and stages is not None:
            raise RunnerError("--ray places every stage itself; leave out --stages")
        local = _local_nodes(stages, config.chain())
        split = set(local) != set(config.chain())
        if split:
            _check_split_serve(config, local, address_given=host is not None or port is not None)
        deployment_keys = _deployment_keys(keys) if split else None
        reporting = Reporting(stats_every_s=stats_every, stats_json=stats_json, quiet=quiet)
        if SOURCE not in local:
            raise typer.Exit(_serve_worker(config, local, deployment_keys, console, reporting))
        try:  # the server's libraries come with the serve extra, which a plain run does without
            from voxtral_run.runner.serve.command import serve as serve_pipeline
        except ImportError as error:
            raise RunnerError(f"serve needs the serve extra (pip install 'voxtral-run[serve]'): {error}") from None
        status = serve_pipeline(
            config,
            model_dir=resolve_model(config.model),
            host=LOOPBACK if host is None else host,
            port=DEFAULT_SERVE_PORT if port is None else port,
            console=console,
            reporting=reporting,
            launcher=_ray_launcher(ray, config),
            local=local if split else None,
            keys=deployment_keys,
        )
    except (RunnerError, StageError) as error:
        console.print(f"voxtral-run: error: {error}", soft_wrap=True, markup=False)
        raise typer.Exit(EXIT_FAILED) from None
    raise typer.Exit(status)


def _serve_worker(pipeline: Pipeline, local: list[str], keys: CurveKeys, console: Console, reporting: Reporting) -> int:
    """A worker host's stages of a split serve: the --stages path of a run, kept serving the server's streams
    until a signal (or until a link to the server's host is lost, in one line); the exit status."""
    place_local_stages(pipeline, local)
    worker = Supervisor(
        pipeline,
        local=local,
        model_dir=_model_dir(pipeline, local),
        sink=None,
        console=console,
        reporting=reporting,
        keys=keys,
        long_lived=True,
    )
    with mps_for(pipeline.mps, [pipeline], local, console, quiet=reporting.quiet):
        return worker.run()


def _check_split_serve(pipeline: Pipeline, local: list[str], *, address_given: bool) -> None:
    """One host's part of a serve split over hosts: the server takes capture and output together, a worker host
    listens for no client, and the pipeline is one chain."""
    if (SOURCE in local) != (SINK in local):
        raise RunnerError(
            f"--stages: the server takes the places of {SOURCE} and {SINK}: name both on the server's host, neither "
            "on a worker host"
        )
    if SOURCE not in local and address_given:
        raise RunnerError(
            "--host, --port: a worker host (--stages without capture and output) serves no clients; give them to "
            "the server's host"
        )
    if len(replica_pipelines(pipeline)) > 1:
        raise RunnerError("replicas: a serve split over hosts (--stages) runs one chain; leave out replicas, devices")


def _ray_launcher(address: str | None, pipeline: Pipeline) -> Launcher | None:
    """With --ray, the stages' launcher on that cluster (Ray imported only then)."""
    if address is None:
        return None
    if pipeline.mps == MPS_ON:
        raise RunnerError("mps: on starts NVIDIA MPS for the stages spawned here; with --ray, run it on the Ray nodes")
    return RayPlacement(address, pipeline.startup_timeout_s)


def _with_ray_address(args: list[str]) -> list[str]:
    """`--ray` takes an optional address: a bare `--ray` (nothing after it that looks like one) means Ray's default."""
    args = list(args)
    for index, arg in enumerate(args):
        if arg == "--ray" and not (index + 1 < len(args) and RAY_ADDRESS.match(args[index + 1])):
            args[index] = f"--ray={LOCAL_CLUSTER}"
    return args


def declare_package_main() -> None:
    """Make the running script count as `python -m voxtral_run.runner` for the stage processes it spawns.

    A spawned child first re-runs its parent's main script unless that is a package's `__main__` module, so under
    the console script every stage process would import this CLI again (about a second of CPU each) before its own
    work; the script does what that module does."""
    script = sys.modules["__main__"]
    if getattr(script, "__spec__", None) is None:
        script.__spec__ = importlib.util.find_spec("voxtral_run.runner.__main__")


def main() -> None:
    """Console-script entry point: `voxtral-run serve ...` serves, anything else is a run."""
    declare_package_main()
    if sys.argv[1:2] == ["serve"]:
        serve_app(args=_with_ray_address(sys.argv[2:]), prog_name="voxtral-run serve")
    else:
        app(args=_with_ray_address(sys.argv[1:]))
