"""pipeline.yaml: schema, validation with one-line errors naming the bad key, overrides, and edge endpoints."""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from voxtral_run.runner.edges import DEFAULT_HEARTBEAT_TIMEOUT_S, EdgeSpec, Policy
from voxtral_run.runner.errors import RunnerError
from voxtral_run.stages.audio.capture import DEFAULT_CHUNK_MS, check_chunk_ms
from voxtral_run.stages.audio.constants import (
    MAX_DELAY_MS,
    MAX_SOURCE_CHANNELS,
    MAX_SOURCE_RATE,
    MIN_DELAY_MS,
    MS_PER_TOKEN,
    NUM_MEL_BINS,
    SAMPLES_PER_TOKEN,
)
from voxtral_run.stages.base import StageError
from voxtral_run.stages.factory import (
    AUTO_DEVICE,
    DEFAULT_MAX_STREAMS,
    MODEL_STAGE_KINDS,
    STAGE_KINDS,
    auto_device,
    cuda_device_count,
)

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
# Stage names the runner knows how to build: every built-in kind of stages.factory, capture included.
KNOWN_STAGES = STAGE_KINDS
SOURCE = "capture"  # the stage that produces audio: the only one without an input queue
SINK = "output"  # the runner's own node that receives the final events and writes the transcript
# Keys --set sets directly on a stage; others go to its params.
RUNNER_STAGE_KEYS = (
    "device", "host", "throttle_ms", "threads", "impl", "busy_poll", "gather_ms", "replicas", "devices",
)  # fmt: skip
DEFAULT_BASE_PORT = 5550
LOOPBACK = "127.0.0.1"
MAX_PORT = 65535
# Bounds on what a pipeline may ask for: beyond them a number is a mistake, and the memory or time it would
# take is not bounded by anything else.
MAX_QUEUE_CAPACITY = 4096  # messages (80 ms each by default: over 5 minutes of audio)
MAX_THROTTLE_MS = 60_000
MAX_GATHER_MS = 1000
MAX_THREADS = 1024
MAX_STARTUP_TIMEOUT_S = 86_400
MIN_HEARTBEAT_TIMEOUT_S, MAX_HEARTBEAT_TIMEOUT_S = 0.5, 600
MAX_REPLICAS = 64
ALL_DEVICES = "all"  # `devices: all`: a replica per CUDA GPU
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
MPS_AUTO, MPS_ON, MPS_OFF = "auto", "on", "off"  # `mps`: NVIDIA MPS for stage processes that share a GPU


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StageConfig(_Strict):
    """One stage: where it runs and the parameters its constructor takes. `threads` and `busy_poll` left unset
    (None) are chosen by `place_local_stages` to suit the device."""

    device: str = Field(AUTO_DEVICE, pattern=DEVICE_PATTERN)
    host: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    throttle_ms: float = Field(0.0, ge=0, le=MAX_THROTTLE_MS)
    # CPU threads of the stage's process (torch and its OpenMP pool).
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    impl: str | None = Field(None, pattern=r"^[\w.]+:[\w.]+$")
    # Wait for input by polling without sleeping while a stream is open: a core busy, for the wake-up latency
    # a sleeping process pays per message (0.1 to 0.8 ms, by host).
    busy_poll: bool | None = None
    # Before a step, wait up to this long for a message of every stream open on the input queue: streams whose
    # audio arrives at its own phase of the tick then share one batched step instead of several small ones.
    gather_ms: float = Field(0.0, ge=0, le=MAX_GATHER_MS)
    # Copies of the stages after the capture, each a chain of its own that the server routes whole streams to;
    # `devices` gives each copy its device (its length is the count), `all` a copy per CUDA GPU.
    replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)
    devices: list[str] | str | None = None

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, devices: list[str] | str | None) -> list[str] | str | None:
        if isinstance(devices, str) and devices != ALL_DEVICES:
            raise ValueError(f"a list of devices, or {ALL_DEVICES}; not {devices!r}")
        if isinstance(devices, list):
            if not 1 <= len(devices) <= MAX_REPLICAS:
                raise ValueError(f"list 1 to {MAX_REPLICAS} devices, not {len(devices)}")
            for device in devices:
                if not re.match(DEVICE_PATTERN, device):
                    raise ValueError(f"{device!r} is not a device (auto, cpu, cuda or cuda:N)")
        return devices

    def declared_replicas(self, where: str) -> int | None:
        """How many replicas this stage asks for (None: no count of its own, or `devices: all`)."""
        if "device" in self.model_fields_set and self.devices is not None:
            raise _KeyError(f"{where}.devices", "give device or devices, not both")
        if isinstance(self.devices, list):
            if self.replicas is not None and self.replicas != len(self.devices):
                raise _KeyError(f"{where}.replicas", f"{self.replicas}, but devices lists {len(self.devices)}")
            return len(self.devices)
        if self.devices == ALL_DEVICES and self.replicas is not None:
            raise _KeyError(f"{where}.replicas", "devices: all makes one replica per GPU; leave replicas out")
        return self.replicas


class OutputConfig(_Strict):
    """The runner's sink (live text and the transcript file): only its host for tcp placement."""

    host: str | None = None


class QueueConfig(_Strict):
    """An edge between two nodes: capacity in messages, policy when full, optional port or endpoint."""

    source: str = Field(alias="from")
    target: str = Field(alias="to")
    capacity: int = Field(ge=1, le=MAX_QUEUE_CAPACITY)
    policy: Policy = Policy.BLOCK
    port: int | None = Field(None, ge=1, le=MAX_PORT)
    endpoint: str | None = Field(None, pattern=r"^(ipc|tcp)://.+$")


class Pipeline(_Strict):
    """A whole pipeline.yaml: model, delay, stages, queues, transport."""

    model: str = DEFAULT_MODEL
    delay_ms: int | None = Field(None, ge=MIN_DELAY_MS, le=MAX_DELAY_MS)
    transport: Literal["auto", "tcp"] = "auto"
    mps: Literal["auto", "on", "off"] = MPS_AUTO
    base_port: int = Field(DEFAULT_BASE_PORT, ge=1, le=MAX_PORT)
    startup_timeout_s: float = Field(600.0, gt=0, le=MAX_STARTUP_TIMEOUT_S)
    # A stage, the runner, or the other end of a queue to another invocation silent this long fails the run.
    heartbeat_timeout_s: float = Field(
        DEFAULT_HEARTBEAT_TIMEOUT_S, ge=MIN_HEARTBEAT_TIMEOUT_S, le=MAX_HEARTBEAT_TIMEOUT_S
    )
    stages: dict[str, StageConfig]
    output: OutputConfig = Field(default_factory=OutputConfig)
    queues: list[QueueConfig]

    @field_validator("mps", mode="before")
    @classmethod
    def _mps_as_said(cls, value: object) -> object:
        # YAML reads a bare on / off as true / false.
        return {True: MPS_ON, False: MPS_OFF}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check_graph(self) -> Pipeline:
        for name, stage in self.stages.items():
            if name not in KNOWN_STAGES and stage.impl is None:
                raise _KeyError(f"stages.{name}", f"unknown stage (choose from {', '.join(KNOWN_STAGES)})")
        if SOURCE not in self.stages:
            raise _KeyError("stages", f"no '{SOURCE}' stage")
        counts: dict[str, int] = {}
        for name, stage in self.stages.items():
            count = stage.declared_replicas(f"stages.{name}")
            if name == SOURCE and (count is not None or stage.devices is not None):
                raise _KeyError(f"stages.{name}.replicas", "the capture is one; replicate the stages after it")
            if count is not None and counts and count not in counts.values():
                other, other_count = next(iter(counts.items()))
                raise _KeyError(f"stages.{name}.replicas", f"{count}, but stages.{other} has {other_count}")
            if count is not None:
                counts[name] = count
        try:  # the queues' message sizes follow from the chunk, so it is checked with the graph
            check_chunk_ms(self.stages[SOURCE].params.get("chunk_ms", DEFAULT_CHUNK_MS))
        except StageError as error:
            raise _KeyError(f"stages.{SOURCE}.params.chunk_ms", str(error)) from None
        nodes = [*self.stages, SINK]
        inputs: dict[str, int] = {}
        outputs: dict[str, int] = {}
        for index, queue in enumerate(self.queues):
            where = f"queues[{index}]"
            for key, node, seen in (("from", queue.source, outputs), ("to", queue.target, inputs)):
                if node not in nodes:
                    raise _KeyError(f"{where}.{key}", f"unknown stage '{node}'")
                if node in seen:
                    raise _KeyError(f"{where}.{key}", f"'{node}' already has a queue (queues[{seen[node]}])")
                seen[node] = index
            if queue.source == SINK or queue.target == SOURCE:
                raise _KeyError(where, f"queues flow from {SOURCE} to {SINK}, not {queue.source} -> {queue.target}")
            if queue.policy is not Policy.BLOCK and queue.source != SOURCE:
                raise _KeyError(f"{where}.policy", f"only the queue out of {SOURCE} may drop")
            if queue.policy is Policy.DROP_OLDEST and queue.capacity < 2:
                raise _KeyError(f"{where}.capacity", "drop_oldest needs a capacity of at least 2")
            if queue.port is None and queue.endpoint is None and self.base_port + index > MAX_PORT:
                raise _KeyError("base_port", f"{self.base_port} + {index} (queue {index}) is past port {MAX_PORT}")
        node, visited = SOURCE, {SOURCE}
        while node != SINK:
            if node not in outputs:
                raise _KeyError("queues", f"no queue out of '{node}'")
            node = self.queues[outputs[node]].target
            visited.add(node)
        for name in self.stages:
            if name not in visited:
                raise _KeyError(f"stages.{name}", f"not on the queues' path from {SOURCE} to {SINK}")
        return self

    def chain(self) -> list[str]:
        """Node names in data order, from capture to the output sink."""
        by_source = {queue.source: queue.target for queue in self.queues}
        nodes = [SOURCE]
        while nodes[-1] != SINK:
            nodes.append(by_source[nodes[-1]])
        return nodes


# Top-level keys --set sets (key=value): the settings; the stages, queues and output are structure, which a file
# says better.
TOP_LEVEL_SET_KEYS = tuple(name for name in Pipeline.model_fields if name not in ("stages", "output", "queues"))


class _KeyError(ValueError):
    """A graph problem found after field validation, reported under `key`."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _format_location(location: tuple) -> str:
    parts: list[str] = []
    for part in location:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
    return ".".join(parts)


def _one_line_validation_error(source: str, error: ValidationError) -> RunnerError:
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _KeyError):
        key, message = cause.key, str(cause)
    else:
        key = _format_location(first["loc"]) or "(top level)"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    more = error.error_count() - 1
    return RunnerError(f"{source}: {key}: {message}" + (f" (and {more} more problems)" if more else ""))


# Each stage's output queue in the default chain, in 80 ms messages; pipeline.yaml spells out the same.
# One message per stream per 80 ms crosses each edge, and a stage steps over the messages waiting: an edge holds
# a tick of many streams (a queue smaller than the streams in flight would split the model stages' batches).
DEFAULT_QUEUE_CAPACITIES = {kind: 512 for kind in ("capture", "resample", "mel", "encoder", "decoder")}
DEFAULT_QUEUE_CAPACITIES["detokenize"] = 1024


def default_pipeline_raw() -> dict:
    """The pipeline a run without a YAML uses, as a raw mapping: every built-in stage in order, `device: auto`."""
    nodes = [*STAGE_KINDS, SINK]
    queues = [{"from": a, "to": b, "capacity": DEFAULT_QUEUE_CAPACITIES[a]} for a, b in itertools.pairwise(nodes)]
    return {"stages": {kind: {} for kind in STAGE_KINDS}, "queues": queues}


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set stage.key=value` (or `--set key=value` for a top-level key) to the raw YAML mapping (value
    parsed as YAML: 5, true, cuda:1)."""
    target, sep, text = assignment.partition("=")
    stage, dot, key = target.partition(".")
    if sep and not dot and target in TOP_LEVEL_SET_KEYS:
        raw[target] = yaml.safe_load(text) if text else None
        return
    if not sep or not dot or not key:
        keys = ", ".join(TOP_LEVEL_SET_KEYS)
        raise RunnerError(f"--set {assignment}: expected stage.key=value, or key=value for one of {keys}")
    stages = raw.get("stages")
    if not isinstance(stages, dict) or stage not in stages:
        raise RunnerError(f"--set {assignment}: no stage '{stage}' in the pipeline")
    value = yaml.safe_load(text) if text else None
    entry = stages[stage] if isinstance(stages[stage], dict) else {}
    stages[stage] = entry
    if key in RUNNER_STAGE_KEYS:
        entry[key] = value
    else:
        entry.setdefault("params", {})[key] = value


def load_pipeline(path: Path | None, overrides: list[str] = ()) -> Pipeline:
    """Read and validate a pipeline file (None: the default pipeline), applying `--set` overrides first;
    RunnerError on any problem."""
    if path is None:
        return _validated(default_pipeline_raw(), overrides, "the default pipeline")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise RunnerError(f"{path}: cannot read the pipeline ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise RunnerError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise RunnerError(f"{path}: expected a mapping of pipeline keys at the top level")
    return _validated(raw, overrides, str(path))


def _validated(raw: dict, overrides: list[str], source: str) -> Pipeline:
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as error:
        raise _one_line_validation_error(source, error) from None


def place_local_stages(pipeline: Pipeline, local: Iterable[str]) -> None:
    """Make the settings of the stages this host runs concrete: `device: auto` becomes the first GPU, else the
    CPU (for the model stages; the others compute on the CPU), a named GPU is checked to exist, and unset
    `threads` and `busy_poll` get what suits the placement."""
    stages = {name: pipeline.stages[name] for name in local if name in pipeline.stages}
    models = {name: stage for name, stage in stages.items() if name in MODEL_STAGE_KINDS and stage.impl is None}
    for name, stage in stages.items():
        if stage.device == AUTO_DEVICE:
            stage.device = auto_device() if name in models else "cpu"
    named_gpus = {name: stage.device for name, stage in models.items() if stage.device.startswith("cuda")}
    count = cuda_device_count() if named_gpus else 0
    for name, device in named_gpus.items():
        if int(device.partition(":")[2] or 0) >= count:
            raise RunnerError(
                f"stages.{name}.device: {device} does not exist on this host ({count} CUDA devices); "
                f"use device: auto, or --set {name}.device=cpu"
            )
    on_cpu = [name for name, stage in models.items() if stage.device == "cpu"]
    for name, stage in stages.items():
        if stage.threads is None:
            # A model stage on the CPU gets its share of the cores; every other stage moves little data, and
            # thread pools of several processes fighting over the same cores slow every one of them.
            stage.threads = max(1, (os.cpu_count() or 1) // len(on_cpu)) if name in on_cpu else 1
        if stage.busy_poll is None:
            # A host whose model stages run on GPUs has cores to spare, and every wake-up sits on each token's
            # path; on a CPU-only host the cores are the model's.
            stage.busy_poll = bool(named_gpus)


def replica_pipelines(pipeline: Pipeline, gpu_count: Callable[[], int] = cuda_device_count) -> list[Pipeline]:
    """The pipeline as one chain per replica (`replicas`, `devices`): a stage with `devices` on the i-th in chain i
    (`all`: cuda:i, one chain per GPU `gpu_count` counts), every other stage as configured, and chain i's tcp ports
    after those of the chains before it. Without replicas, the pipeline itself."""
    counts = {name: stage.declared_replicas(f"stages.{name}") for name, stage in pipeline.stages.items()}
    if any(stage.devices == ALL_DEVICES for stage in pipeline.stages.values()):
        gpus = gpu_count()
        if gpus < 1:
            name = next(name for name, stage in pipeline.stages.items() if stage.devices == ALL_DEVICES)
            raise RunnerError(f"stages.{name}.devices: all, but there is no CUDA GPU; give replicas: N instead")
        counts |= {name: gpus for name, stage in pipeline.stages.items() if stage.devices == ALL_DEVICES}
    declared = {count for count in counts.values() if count is not None}
    if len(declared) > 1:
        raise RunnerError(f"stages: replicas disagree ({', '.join(f'{n}: {c}' for n, c in counts.items() if c)})")
    replicas = declared.pop() if declared else 1
    if replicas == 1:
        return [pipeline]
    for index, queue in enumerate(pipeline.queues):
        if queue.port is not None or queue.endpoint is not None:
            raise RunnerError(f"queues[{index}]: a fixed port or endpoint cannot serve {replicas} replicas")
    last_port = pipeline.base_port + replicas * len(pipeline.queues) - 1
    if pipeline.transport == "tcp" and last_port > MAX_PORT:
        raise RunnerError(f"base_port: {replicas} replicas of {len(pipeline.queues)} queues pass port {MAX_PORT}")
    chains = []
    for index in range(replicas):
        chain = pipeline.model_copy(deep=True)
        chain.base_port = pipeline.base_port + index * len(pipeline.queues)
        for stage in chain.stages.values():
            if stage.devices is not None:
                stage.device = f"cuda:{index}" if stage.devices == ALL_DEVICES else stage.devices[index]
            stage.replicas = stage.devices = None
        chains.append(chain)
    return chains


def capture_all_graphs(pipeline: Pipeline) -> None:
    """A server's built-in encoder and decoder capture the CUDA graphs of every batch size and cache span at
    start (`capture_all`), unless the pipeline says otherwise: a client's stream never waits for a capture."""
    for name in MODEL_STAGE_KINDS:
        stage = pipeline.stages.get(name)
        if stage is not None and stage.impl is None:
            stage.params.setdefault("capture_all", True)


def model_stage_ceiling(pipeline: Pipeline) -> int | None:
    """How many streams the built-in encoder and decoder take at once: the smaller of their `max_streams`, or
    their device's default where this invocation knows the device (None when it knows neither)."""
    ceilings = []
    for name in MODEL_STAGE_KINDS:
        stage = pipeline.stages.get(name)
        if stage is None or stage.impl is not None:
            continue
        ceiling = stage.params.get("max_streams")
        if ceiling is None and stage.device != AUTO_DEVICE:
            ceiling = DEFAULT_MAX_STREAMS[stage.device.partition(":")[0]]
        if isinstance(ceiling, int) and not isinstance(ceiling, bool) and ceiling >= 1:  # else the stage's error
            ceilings.append(ceiling)
    return min(ceilings, default=None)


def _bind_address(host: str, where: str) -> str:
    """ZeroMQ binds interfaces, not names: an IP literal binds that address, a host name the address it resolves
    to (never every interface)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, UnicodeError) as error:
            raise RunnerError(f"{where}: cannot resolve host '{host}' ({error})") from None
        return f"[{address}]" if ":" in address else address
    return f"[{host}]" if ":" in host else host


# Bytes per 80 ms of audio in the arrays each built-in stage sends: the capture's raw chunk at the highest rate
# and channel count it accepts (float32), 16 kHz mono samples, 8 mel frames, 4 encoder frames of up to 8192
# float32 (Voxtral's are 1280 wide), token ids.
_BYTES_PER_TOKEN = {
    SOURCE: math.ceil(MAX_SOURCE_RATE * MS_PER_TOKEN / 1000) * MAX_SOURCE_CHANNELS * 4,
    "resample": SAMPLES_PER_TOKEN * 4,
    "mel": 8 * NUM_MEL_BINS * 4,
    "encoder": 4 * 8192 * 4,
    "decoder": 16,
}
# Messages also carry a stream's padding (the mel stage's left pad of 32 tokens, the right pad up to the longest
# delay and its buffer) on top of one chunk.
_PAD_TOKENS = 128
_MESSAGE_SLACK_BYTES = 64 << 10  # the msgpack header, the CURVE box, a small item's whole size
# The last stage's done event carries every token id and the whole text: over a day of audio fits.
_TRANSCRIPT_MAX_BYTES = 32 << 20


def max_message_bytes(source_kind: str, chunk_ms: float) -> int:
    """The largest frame an edge out of a stage of `source_kind` accepts (ZMQ_MAXMSGSIZE): twice what the stage
    can legitimately send for one chunk of `chunk_ms`; an unknown (impl) stage gets the capture's bound."""
    if source_kind == "detokenize":
        return _TRANSCRIPT_MAX_BYTES
    chunk_tokens = math.ceil(chunk_ms / MS_PER_TOKEN)
    per_token = _BYTES_PER_TOKEN.get(source_kind, _BYTES_PER_TOKEN[SOURCE])
    tokens = chunk_tokens if source_kind == SOURCE else chunk_tokens + _PAD_TOKENS
    return 2 * tokens * per_token + _MESSAGE_SLACK_BYTES


def launched_edges(pipeline: Pipeline, runner_host: str) -> list[EdgeSpec]:
    """The queues of stages a launcher places (Ray): every one tcp and watched. A queue into a stage binds where the
    stage lands, at a port the OS picks, and the launcher tells its sender; the queue into the output binds on
    `runner_host`."""
    chunk_ms = pipeline.stages[SOURCE].params.get("chunk_ms", DEFAULT_CHUNK_MS)
    specs = []
    for queue in pipeline.queues:
        kind = queue.source if pipeline.stages[queue.source].impl is None else "impl"
        bind = f"tcp://{_bind_address(runner_host, 'the runner')}:*" if queue.target == SINK else "tcp://{host}:*"
        specs.append(
            EdgeSpec(
                queue.source,
                queue.target,
                bind,
                connect="tcp://",  # filled in by the launcher once the receiving end is bound
                capacity=queue.capacity,
                policy=queue.policy,
                max_message_bytes=max_message_bytes(kind, chunk_ms),
                remote=True,
                heartbeat_timeout_s=pipeline.heartbeat_timeout_s,
                link_timeout_s=pipeline.startup_timeout_s,
            )
        )
    return specs


def plan_edges(pipeline: Pipeline, local: set[str], run_dir: Path) -> list[EdgeSpec]:
    """Endpoints for every queue: ipc:// in `run_dir` when this invocation runs both ends (transport auto),
    otherwise tcp:// at the receiving node's host; a queue's `endpoint` overrides both. A queue with one end
    elsewhere is `remote`: its link is watched."""
    hosts = {name: stage.host for name, stage in pipeline.stages.items()} | {SINK: pipeline.output.host}
    chunk_ms = pipeline.stages[SOURCE].params.get("chunk_ms", DEFAULT_CHUNK_MS)
    specs = []
    for index, queue in enumerate(pipeline.queues):
        if queue.endpoint is not None:
            bind = connect = queue.endpoint
        elif pipeline.transport == "auto" and {queue.source, queue.target} <= local:
            bind = connect = f"ipc://{run_dir / f'{index}-{queue.source}-{queue.target}'}"
        else:
            host = hosts[queue.target] or LOOPBACK
            port = queue.port or pipeline.base_port + index
            where = "output.host" if queue.target == SINK else f"stages.{queue.target}.host"
            bind = f"tcp://{_bind_address(host, where)}:{port}" if queue.target in local else ""
            connect = f"tcp://{host}:{port}"
        kind = queue.source if pipeline.stages[queue.source].impl is None else "impl"
        specs.append(
            EdgeSpec(
                queue.source,
                queue.target,
                bind,
                connect,
                queue.capacity,
                queue.policy,
                max_message_bytes=max_message_bytes(kind, chunk_ms),
                remote=not {queue.source, queue.target} <= local,
                heartbeat_timeout_s=pipeline.heartbeat_timeout_s,
                link_timeout_s=pipeline.startup_timeout_s,
            )
        )
    return specs
