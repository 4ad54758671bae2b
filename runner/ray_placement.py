"""Ray placement (`--ray`): every stage process a Ray actor, placed by its resources, the pipeline gang-placed.

Ray only places and watches the processes; the data still flows over the stages' own ZeroMQ queues, tcp under the
run's CURVE keys (Ray's out-of-band pattern). Each actor binds its input queue at a port its host's OS picks and
returns the endpoint through an actor call, which its sender then connects to. A stage's resources come from
pipeline.yaml: a GPU from its device (the stages of one host and GPU share that GPU's bundle), CPUs from
`threads`, and its node from `host`, the name of a custom resource the node offers (`ray start --resources
'{"gpu-node-1": 1}'`). One placement group holds every stage, so a pipeline starts whole or not at all. Ray is
imported only here, and only when asked for.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from typing import Any

from setproctitle import setproctitle

from voxtral_run.runner.config import SINK, SOURCE, Pipeline
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.stage_process import PROCESS_TITLE, StageProcess, StageSpec
from voxtral_run.runner.supervisor import Launcher, StageHandle
from voxtral_run.stages.factory import AUTO_DEVICE, MODEL_STAGE_KINDS

RAY_EXTRA = "pip install 'voxtral-run[ray]'"
LOCAL_CLUSTER = "local"  # `--ray` without an address: Ray's own choice (RAY_ADDRESS, else a cluster of this host)
# A stage takes this much of its node's custom resource, so every stage of a pipeline (and its replicas) fits on a
# node offering 1 of it.
HOST_SHARE = 0.001
CPU_MODEL_THREADS = 2  # a model stage on a CPU with no `threads` of its own: the node's cores are not known here


def import_ray() -> Any:
    """The ray module; a one-line RunnerError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise RunnerError(f"--ray needs Ray: {RAY_EXTRA}") from None
    return ray


def place_launched_stages(pipeline: Pipeline, gpus: int) -> None:
    """Make the stages' settings concrete for Ray: `device: auto` a GPU where the cluster has any (the model stages;
    the others compute on the CPU), unset `threads` 1 (a model stage on a CPU, CPU_MODEL_THREADS), unset
    `busy_poll` on only beside a GPU."""
    for name, stage in pipeline.stages.items():
        model = name in MODEL_STAGE_KINDS and stage.impl is None
        if stage.device == AUTO_DEVICE:
            stage.device = "cuda" if model and gpus else "cpu"
        if stage.threads is None:
            stage.threads = CPU_MODEL_THREADS if model and stage.device == "cpu" else 1
        if stage.busy_poll is None:
            stage.busy_poll = stage.device.startswith("cuda")


class StageActor:
    """A Ray actor running one stage process: first its input queue bound (`open_input`), then the stage (`run`)."""

    def __init__(self) -> None:
        self._process: StageProcess | None = None

    def where(self) -> tuple[int, str]:
        """This actor's process id and Ray node id."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def open_input(self, spec: StageSpec) -> str:
        """Bind the stage's input queue on this node, at a port the OS picks: the endpoint its sender connects to."""
        self._process = StageProcess(self._placed(spec))
        return self._process.open_input()

    def run(self, spec: StageSpec) -> int:
        """Run the stage until it is stopped (its output queue's endpoint now filled in): its exit status."""
        if self._process is None:
            self._process = StageProcess(self._placed(spec))
        else:
            self._process.spec = self._placed(spec)
        setproctitle(PROCESS_TITLE.format(name=spec.name))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides what Ctrl-C means (the capture's own)
        return self._process.run()

    @staticmethod
    def _placed(spec: StageSpec) -> StageSpec:
        """The spec as this node runs it: its input bound on this node's address, its GPU the one Ray gave it (Ray
        makes it the only one visible), its threads set before torch starts."""
        import ray

        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[variable] = str(spec.threads)
        if spec.input_edge is not None:
            bind = spec.input_edge.bind.format(host=ray.util.get_node_ip_address())
            spec = replace(spec, input_edge=replace(spec.input_edge, bind=bind))
        if spec.device.startswith("cuda"):
            spec = replace(spec, device="cuda:0")
        return spec


class RayStage:
    """A stage's actor as the supervisor watches it: alive while its `run` call has not returned."""

    sentinel = None

    def __init__(self, ray: Any, actor: Any, run: Any, where: tuple[int, str], group: Any) -> None:
        self._ray = ray
        self.actor = actor
        self._run = run
        self.pid, self.node_id = where  # the process id is this host's only for a stage on this host (the capture)
        self.group = group

    def is_alive(self) -> bool:
        done, _ = self._ray.wait([self._run], timeout=0)
        return not done

    def terminate(self) -> None:
        self._ray.kill(self.actor)

    def kill(self) -> None:
        self._ray.kill(self.actor)

    def join(self, timeout: float | None = None) -> None:
        self._ray.wait([self._run], timeout=timeout)

    def describe_exit(self) -> str:
        try:
            return f"exit code {self._ray.get(self._run, timeout=0)}"
        except self._ray.exceptions.RayActorError:
            return "its Ray actor died"
        except self._ray.exceptions.GetTimeoutError:
            return "still running"


class RayPlacement(Launcher):
    """Stage processes as Ray actors of the cluster at `address` (LOCAL_CLUSTER: Ray's default), each launch one
    placement group that must be placed within `timeout_s`."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self._ray = import_ray()
        self._timeout_s = timeout_s
        if not self._ray.is_initialized():
            try:
                self._ray.init(address=None if address == LOCAL_CLUSTER else address, include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise RunnerError(f"--ray {address}: cannot connect to the Ray cluster ({error})") from None
        self._resources = self._ray.cluster_resources()

    def runner_host(self) -> str:
        return self._ray.util.get_node_ip_address()

    def gpu_count(self) -> int:
        return int(self._resources.get("GPU", 0))

    def place(self, pipeline: Pipeline) -> None:
        place_launched_stages(pipeline, self.gpu_count())

    def launch(self, specs: list[StageSpec]) -> tuple[dict[str, StageHandle], dict[str, str]]:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles, where = self._bundles(specs)
        group = placement_group(bundles, strategy="PACK")
        ready, _ = self._ray.wait([group.ready()], timeout=self._timeout_s)
        if not ready:
            remove_placement_group(group)
            raise RunnerError(
                f"the Ray cluster could not place the pipeline whole within {self._timeout_s:g} s (startup_timeout_s): "
                f"it needs {', '.join(map(str, bundles))} (CPU, GPU, and each host's custom resource)"
            )
        actor_class = self._ray.remote(StageActor)
        actors = {}
        for spec in specs:
            bundle, gpus = where[spec.name]
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
            options = {"num_cpus": spec.threads, "num_gpus": gpus, "scheduling_strategy": strategy}
            actors[spec.name] = actor_class.options(name=None, **options).remote()
        try:
            inputs = [spec for spec in specs if spec.input_edge is not None]
            bound = self._ray.get([actors[spec.name].open_input.remote(spec) for spec in inputs])
            endpoints = {spec.name: endpoint for spec, endpoint in zip(inputs, bound, strict=True)}
            places = self._ray.get([actors[spec.name].where.remote() for spec in specs])
        except self._ray.exceptions.RayError as error:
            self._remove(actors.values(), group)
            raise RunnerError(f"a stage's Ray actor failed to start: {' '.join(str(error).split())[:300]}") from None
        handles: dict[str, StageHandle] = {}
        for spec, where_run in zip(specs, places, strict=True):
            target = spec.output_edge.target
            if target != SINK:  # the output's receiver is the runner's own, bound before
                spec = replace(spec, output_edge=replace(spec.output_edge, connect=endpoints[target]))
            run = actors[spec.name].run.remote(spec)
            handles[spec.name] = RayStage(self._ray, actors[spec.name], run, where_run, group)
        return handles, endpoints

    def release(self, handles: dict[str, StageHandle]) -> None:
        groups = {id(handle.group): handle.group for handle in handles.values()}
        for handle in handles.values():
            handle.kill()
        for group in groups.values():
            self._remove([], group)

    def _remove(self, actors: Any, group: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in actors:
            self._ray.kill(actor)
        remove_placement_group(group)

    def _bundles(self, specs: list[StageSpec]) -> tuple[list[dict[str, float]], dict[str, tuple[int, float]]]:
        """The placement group's bundles, one per host and device (the stages of one GPU share it, each a fraction
        of it), and each stage's bundle index and GPU share. The capture reads this host's files: it runs here."""
        keys: dict[str, tuple[str | None, str]] = {}
        for spec in specs:
            host = f"node:{self.runner_host()}" if spec.name == SOURCE else spec.host
            if host is not None and host not in self._resources:
                raise RunnerError(
                    f"stages.{spec.name}.host: no Ray node offers the resource '{host}' "
                    f"(ray start --resources '{{\"{host}\": 1}}')"
                )
            keys[spec.name] = (host, spec.device)
        groups = list(dict.fromkeys(keys.values()))
        bundles: list[dict[str, float]] = [{"CPU": 0.0} for _ in groups]
        sharing = {key: sum(1 for other in keys.values() if other == key) for key in groups}
        where: dict[str, tuple[int, float]] = {}
        for spec in specs:
            key = keys[spec.name]
            index = groups.index(key)
            bundle = bundles[index]
            bundle["CPU"] += spec.threads
            host, device = key
            if host is not None:
                bundle[host] = bundle.get(host, 0.0) + HOST_SHARE
            gpus = 1 / sharing[key] if device.startswith("cuda") else 0.0
            if gpus:
                bundle["GPU"] = 1.0
            where[spec.name] = (index, gpus)
        return bundles, where
