"""pipeline.yaml validation: the repository's default is valid; each mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from voxtral_run.runner.config import SINK, SOURCE, load_pipeline, plan_edges
from voxtral_run.runner.edges import Policy
from voxtral_run.runner.errors import RunnerError

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
    with pytest.raises(RunnerError, match="expected stage.key=value"):
        load_pipeline(REPO_PIPELINE, ["encoder=cpu"])
    with pytest.raises(RunnerError, match=r"stages\.encoder\.device"):
        load_pipeline(REPO_PIPELINE, ["encoder.device=tpu"])


def test_busy_polling_is_on_by_default_for_gpu_stages_only():
    pipeline = load_pipeline(CPU_PIPELINE, ["encoder.device=cuda:0", "mel.busy_poll=true", "decoder.busy_poll=false"])
    stages = pipeline.stages
    assert stages["encoder"].device.startswith("cuda") and stages["encoder"].polls_busily
    assert not stages["resample"].polls_busily  # on the CPU, left to sleep unless asked
    assert stages["mel"].polls_busily and not stages["decoder"].polls_busily  # an explicit setting wins
    assert not load_pipeline(CPU_PIPELINE).stages["encoder"].polls_busily


def test_the_shipped_gpu_pipelines_poll_every_stage_after_capture():
    """A sleeping stage wakes on a cold core, whose work is several times slower: the GPU pipelines spend
    cores on their CPU stages too; the CPU pipeline leaves its few cores to the model."""
    after_capture = {"resample", "mel", "encoder", "decoder", "detokenize"}
    for path in (REPO_PIPELINE, EXAMPLES / "two-gpus.yaml"):
        stages = load_pipeline(path).stages
        assert {name for name, stage in stages.items() if stage.polls_busily} == after_capture, path
    assert not any(stage.polls_busily for stage in load_pipeline(CPU_PIPELINE).stages.values())


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
    assert edges["resample -> mel"].bind.startswith("ipc://")
    assert (edges["mel -> encoder"].bind, edges["mel -> encoder"].connect) == (
        "tcp://10.0.0.7:5552",
        "tcp://10.0.0.7:5552",
    )
    # A host name cannot be bound, so its receiver binds every interface; senders connect by name.
    assert (edges["encoder -> decoder"].bind, edges["encoder -> decoder"].connect) == (
        "tcp://*:5553",
        "tcp://gpu-box:5553",
    )
    assert edges["decoder -> detokenize"].connect == "tcp://127.0.0.1:5554"

    raw["transport"] = "tcp"
    raw["queues"][0]["port"] = 6000
    raw["queues"][1]["endpoint"] = "ipc:///tmp/custom.sock"
    pipeline = load_pipeline(write(tmp_path, raw))
    edges = plan_edges(pipeline, set(pipeline.chain()), tmp_path)
    assert edges[0].connect == "tcp://127.0.0.1:6000"
    assert edges[1].bind == edges[1].connect == "ipc:///tmp/custom.sock"
