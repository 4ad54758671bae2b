"""pipeline.yaml validation: the repository's default is valid; each mistake is one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from voxtral_run.runner import config
from voxtral_run.runner.config import (
    SINK,
    SOURCE,
    capture_all_graphs,
    load_pipeline,
    model_stage_ceiling,
    place_local_stages,
    plan_edges,
    replica_pipelines,
)
from voxtral_run.runner.edges import Policy
from voxtral_run.runner.errors import RunnerError
from voxtral_run.stages.factory import DEFAULT_MAX_STREAMS

REPO_PIPELINE = Path(__file__).resolve().parents[2] / "pipeline.yaml"
EXAMPLES = REPO_PIPELINE.parent / "examples"
CPU_PIPELINE = EXAMPLES / "cpu.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def default_raw() -> dict:
    return yaml.safe_load(REPO_PIPELINE.read_text())


def error_of(tmp_path: Path, raw: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(RunnerError) as caught:
        load_pipeline(write(tmp_path, raw), overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_repository_pipeline_is_a_full_chain():
    pipeline = load_pipeline(REPO_PIPELINE)
    assert pipeline.chain() == [SOURCE, "resample", "mel", "encoder", "decoder", "detokenize", SINK]
    assert all(queue.policy is Policy.BLOCK for queue in pipeline.queues)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda raw: raw["stages"]["encoder"].update(devcie="cpu"), "stages.encoder.devcie: unknown key"),
        (lambda raw: raw.update(queue=[]), "queue: unknown key"),
        (lambda raw: raw["stages"].update(transcoder={}), "stages.transcoder: unknown stage"),
        (
            lambda raw: raw["queues"][2].update(capacity=0),
            "queues[2].capacity: Input should be greater than or equal to 1",
        ),
        (
            lambda raw: raw["queues"][1].update(policy="drop_newest"),
            "queues[1].policy: only the queue out of capture may drop",
        ),
        (lambda raw: raw["queues"][0].update(policy="lossy"), "queues[0].policy: Input should be"),
        (
            lambda raw: raw["queues"][0].update(policy="drop_oldest", capacity=1),
            "queues[0].capacity: drop_oldest needs",
        ),
        (lambda raw: raw["queues"][3].update(to="decodr"), "queues[3].to: unknown stage 'decodr'"),
        (lambda raw: raw["queues"].pop(3), "queues: no queue out of 'encoder'"),
        (lambda raw: raw["stages"]["mel"].update(device="gpu0"), "stages.mel.device: String should match pattern"),
        (lambda raw: raw["stages"].pop("capture"), "stages: no 'capture' stage"),
    ],
)
def test_mistakes_name_the_key(tmp_path, mutate, expected):
    raw = default_raw()
    mutate(raw)
    message = error_of(tmp_path, raw)
    assert message.startswith(f"{tmp_path / 'pipeline.yaml'}: {expected}"), message


def test_stage_off_the_path_is_named(tmp_path):
    raw = default_raw()
    raw["stages"]["extra"] = {"impl": "tests.runner.toy_stages:Passthrough"}
    assert "stages.extra: not on the queues' path" in error_of(tmp_path, raw)


def test_invalid_yaml_gives_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  capture: {device: cpu\nqueues: []\n")
    with pytest.raises(RunnerError, match=r"invalid YAML at line \d+"):
        load_pipeline(path)


def test_set_overrides_runner_keys_and_stage_params(tmp_path):
    pipeline = load_pipeline(
        REPO_PIPELINE, ["encoder.device=cpu", "encoder.dtype=float32", "resample.throttle_ms=25", "capture.chunk_ms=40"]
    )
    assert pipeline.stages["encoder"].device == "cpu"
    assert pipeline.stages["encoder"].params == {"dtype": "float32"}
    assert pipeline.stages["resample"].throttle_ms == 25
    assert pipeline.stages["capture"].params == {"chunk_ms": 40}
    with pytest.raises(RunnerError, match="--set nope.x=1: no stage 'nope'"):
        load_pipeline(REPO_PIPELINE, ["nope.x=1"])
    with pytest.raises(RunnerError, match="expected stage.key=value, or key=value for one of model, delay_ms"):
        load_pipeline(REPO_PIPELINE, ["encoder=cpu"])
    with pytest.raises(RunnerError, match=r"stages\.encoder\.device"):
        load_pipeline(REPO_PIPELINE, ["encoder.device=tpu"])


def test_set_overrides_top_level_keys_and_mps_takes_yaml_s_on_and_off():
    pipeline = load_pipeline(REPO_PIPELINE, ["delay_ms=160", "mps=on"])
    assert (pipeline.delay_ms, pipeline.mps) == (160, "on")
    assert load_pipeline(REPO_PIPELINE, ["mps=off"]).mps == "off"
    assert load_pipeline(REPO_PIPELINE).mps == "auto"
    with pytest.raises(RunnerError, match="mps: Input should be 'auto', 'on' or 'off'"):
        load_pipeline(REPO_PIPELINE, ["mps=yes please"])


def placed(path: Path | None, overrides: list[str] = (), local: list[str] | None = None) -> dict:
    pipeline = load_pipeline(path, overrides)
    place_local_stages(pipeline, pipeline.chain() if local is None else local)
    return pipeline.stages


@pytest.fixture
def gpu_host(monkeypatch):
    """A host with two CUDA GPUs, as far as the placement can tell."""
    monkeypatch.setattr(config, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(config, "auto_device", lambda: "cuda:0")


def test_auto_places_the_model_stages_on_the_cpu_of_a_host_without_gpus():
    stages = placed(REPO_PIPELINE)
    assert {name: stage.device for name, stage in stages.items()} == dict.fromkeys(stages, "cpu")
    assert not any(stage.busy_poll for stage in stages.values())  # the cores are the model's
    model_threads = max(1, (os.cpu_count() or 1) // 2)
    assert [stages[name].threads for name in ("encoder", "decoder")] == [model_threads, model_threads]
    assert {stages[name].threads for name in ("capture", "resample", "mel", "detokenize")} == {1}


def test_auto_places_the_model_stages_on_the_first_gpu_and_every_stage_polls(gpu_host):
    stages = placed(REPO_PIPELINE)
    assert stages["encoder"].device == stages["decoder"].device == "cuda:0"
    assert stages["mel"].device == "cpu"
    assert all(stage.busy_poll and stage.threads == 1 for stage in stages.values())
    explicit = placed(REPO_PIPELINE, ["mel.busy_poll=false", "decoder.threads=3"])
    assert not explicit["mel"].busy_poll and explicit["decoder"].threads == 3  # an explicit setting wins
    two_gpus = placed(EXAMPLES / "two-gpus.yaml")
    assert (two_gpus["encoder"].device, two_gpus["decoder"].device) == ("cuda:0", "cuda:1")


def test_placement_only_touches_this_hosts_stages(gpu_host):
    stages = placed(REPO_PIPELINE, local=["capture", "resample", "mel", "output"])
    assert stages["encoder"].device == "auto" and stages["encoder"].busy_poll is None  # its own host decides
    assert not stages["mel"].busy_poll  # no model stage on a GPU here


def test_a_missing_gpu_is_one_line_with_what_to_do():
    with pytest.raises(RunnerError) as caught:
        placed(REPO_PIPELINE, ["encoder.device=cuda:1"])
    assert str(caught.value) == (
        "stages.encoder.device: cuda:1 does not exist on this host (0 CUDA devices); "
        "use device: auto, or --set encoder.device=cpu"
    )


def test_the_default_pipeline_is_the_repository_pipeline():
    """`voxtral-run talk.wav` runs what pipeline.yaml spells out (whose delay is the model's default)."""
    shipped = load_pipeline(REPO_PIPELINE).model_dump(exclude={"delay_ms"})
    assert load_pipeline(None).model_dump(exclude={"delay_ms"}) == shipped
    assert load_pipeline(None, ["encoder.device=cpu"]).stages["encoder"].device == "cpu"


def test_transport_follows_placement(tmp_path):
    raw = default_raw()
    raw["stages"]["encoder"]["host"] = "10.0.0.7"
    raw["stages"]["decoder"]["host"] = "gpu-box"
    pipeline = load_pipeline(write(tmp_path, raw))
    everything = set(pipeline.chain())
    assert all(
        edge.bind.startswith("ipc://") and edge.bind == edge.connect
        for edge in plan_edges(pipeline, everything, tmp_path)
    )

    here = {"capture", "resample", "mel", "detokenize", SINK}
    edges = {edge.name: edge for edge in plan_edges(pipeline, here, tmp_path)}
    assert edges["resample -> mel"].bind.startswith("ipc://") and not edges["resample -> mel"].remote
    # A queue another invocation receives is connected to, by the receiver's host name, never bound here.
    assert (edges["mel -> encoder"].bind, edges["mel -> encoder"].connect) == ("", "tcp://10.0.0.7:5552")
    assert (edges["encoder -> decoder"].bind, edges["encoder -> decoder"].connect) == ("", "tcp://gpu-box:5553")
    assert edges["mel -> encoder"].remote and edges["decoder -> detokenize"].remote
    assert edges["decoder -> detokenize"].connect == "tcp://127.0.0.1:5554"
    # The receiving invocation binds the address its host name resolves to, never every interface.
    raw["stages"]["decoder"]["host"] = "localhost"
    pipeline = load_pipeline(write(tmp_path, raw))
    edges = {edge.name: edge for edge in plan_edges(pipeline, {"decoder"}, tmp_path)}
    assert edges["encoder -> decoder"].bind == "tcp://127.0.0.1:5553"
    raw["stages"]["decoder"]["host"] = "no-such-host.invalid"
    pipeline = load_pipeline(write(tmp_path, raw))
    with pytest.raises(RunnerError, match="stages.decoder.host: cannot resolve host 'no-such-host.invalid'"):
        plan_edges(pipeline, {"decoder"}, tmp_path)
    del raw["stages"]["decoder"]["host"]

    raw["transport"] = "tcp"
    raw["queues"][0]["port"] = 6000
    raw["queues"][1]["endpoint"] = "ipc:///tmp/custom.sock"
    pipeline = load_pipeline(write(tmp_path, raw))
    edges = plan_edges(pipeline, set(pipeline.chain()), tmp_path)
    assert edges[0].connect == "tcp://127.0.0.1:6000"
    assert edges[1].bind == edges[1].connect == "ipc:///tmp/custom.sock"


def test_a_server_captures_every_graph_at_start_unless_the_pipeline_says_otherwise():
    pipeline = load_pipeline(REPO_PIPELINE, ["decoder.capture_all=false"])
    capture_all_graphs(pipeline)
    assert pipeline.stages["encoder"].params["capture_all"] is True
    assert pipeline.stages["decoder"].params["capture_all"] is False
    assert "capture_all" not in pipeline.stages["mel"].params
    custom = load_pipeline(REPO_PIPELINE, ["encoder.impl=tests.runner.toy_stages:Passthrough"])
    capture_all_graphs(custom)  # a stage of one's own takes its own settings only
    assert "capture_all" not in custom.stages["encoder"].params


def test_the_model_stages_ceiling_is_the_smaller_max_streams_where_it_is_known():
    """How many inputs a run starts at once by default: what the encoder and decoder take at once."""
    on_cpu = ["encoder.device=cpu", "decoder.device=cpu"]
    assert model_stage_ceiling(load_pipeline(REPO_PIPELINE, on_cpu)) == DEFAULT_MAX_STREAMS["cpu"]
    assert model_stage_ceiling(load_pipeline(REPO_PIPELINE, [*on_cpu, "decoder.max_streams=3"])) == 3
    assert model_stage_ceiling(load_pipeline(REPO_PIPELINE, ["decoder.device=cuda:1"])) == DEFAULT_MAX_STREAMS["cuda"]
    assert model_stage_ceiling(load_pipeline(REPO_PIPELINE)) is None  # device auto, resolved where the stage runs
    unplaced = load_pipeline(REPO_PIPELINE)
    place_local_stages(unplaced, ["encoder"])  # this host's encoder: on its CPU (no GPU in the tests)
    assert model_stage_ceiling(unplaced) == DEFAULT_MAX_STREAMS[unplaced.stages["encoder"].device.partition(":")[0]]


@pytest.mark.parametrize(
    "settings, expected",
    [
        (["encoder.devices=[cpu, cpu]", "decoder.replicas=3"], "stages.decoder.replicas: 3, but stages.encoder has 2"),
        (["capture.replicas=2"], "stages.capture.replicas: the capture is one; replicate the stages after it"),
        (["encoder.device=cpu", "encoder.devices=[cpu]"], "stages.encoder.devices: give device or devices, not both"),
        (["encoder.devices=[gpu]"], "stages.encoder.devices: 'gpu' is not a device (auto, cpu, cuda or cuda:N)"),
        (["encoder.devices=some"], "stages.encoder.devices: a list of devices, or all; not 'some'"),
        (["encoder.replicas=65"], "stages.encoder.replicas: Input should be less than or equal to 64"),
        (["encoder.devices=all", "encoder.replicas=2"], "stages.encoder.replicas: devices: all makes one replica"),
    ],
)
def test_bad_replicas_name_the_key(settings, expected):
    with pytest.raises(RunnerError) as error:
        load_pipeline(None, settings)
    assert str(error.value).startswith(f"the default pipeline: {expected}")


def test_replicas_are_chains_each_on_its_device_with_ports_of_their_own():
    pipeline = load_pipeline(None, ["encoder.devices=[cuda:0, cuda:1]", "decoder.devices=all", "mel.host=a"])
    chains = replica_pipelines(pipeline, gpu_count=lambda: 2)
    assert [(chain.stages["encoder"].device, chain.stages["decoder"].device) for chain in chains] == [
        ("cuda:0", "cuda:0"),
        ("cuda:1", "cuda:1"),
    ]
    assert [chain.base_port for chain in chains] == [5550, 5550 + len(pipeline.queues)]
    assert all(chain.stages["mel"].host == "a" and chain.stages["encoder"].replicas is None for chain in chains)
    assert replica_pipelines(load_pipeline(None)) == [load_pipeline(None)]
    with pytest.raises(RunnerError, match=r"^stages.decoder.devices: all, but there is no CUDA GPU"):
        replica_pipelines(pipeline, gpu_count=lambda: 0)
