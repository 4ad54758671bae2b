"""Ray placement on a two-node cluster of this machine (custom resources `host_a` and `host_b` standing for hosts):
every stage lands on the node its `host` names and the transcripts equal the stages' own in one process; killing
one replica's actor mid-stream fails its streams within 5 s while the other replica's finish, and the replica is
replaced; a host no node offers, and `--ray` without Ray, are one line."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import speechlike_audio
from tests.runner.conftest import write_noise_wav, write_toy_pipeline
from tests.runner.serve.conftest import wait_for, write_wav
from tests.runner.serve.test_pipeline_hub import check_transcript, events_of, send_all, toy_ids
from tests.runner.serve.test_replicas import transcribe_all
from tests.runner.test_cli import one_error_line
from voxtral_run.runner.config import load_pipeline
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.serve.hub import StreamError, StreamOptions
from voxtral_run.runner.serve.pipeline_hub import PipelineHub
from voxtral_run.stages.transcribe import transcribe_audio

ray = pytest.importorskip("ray")
from voxtral_run.runner.ray_placement import RayPlacement  # noqa: E402 - after the skip without Ray

PLACED = {"resample": "host_a", "mel": "host_a", "encoder": "host_b", "decoder": "host_b", "detokenize": "host_a"}
DEATH_NOTICED_S = 5.0


def node_resource(node_id: str) -> str:
    """The custom host resource the node offers."""
    [node] = [node for node in ray.nodes() if node["NodeID"] == node_id]
    return next(name for name in node["Resources"] if name.startswith("host_"))


def test_every_stage_lands_on_its_host_and_the_transcripts_are_the_single_process_ones(ray_cluster, tiny_model_dir):
    pipeline = load_pipeline(None, [f"{stage}.host={host}" for stage, host in PLACED.items()])
    hub = PipelineHub(pipeline, model_dir=tiny_model_dir, launcher=RayPlacement(ray_cluster, 60))
    try:
        stages = hub.stage_processes()
        assert {name: node_resource(state.process.node_id) for name, state in stages.items()} == PLACED
        audios = [speechlike_audio(1.2, seed=700), speechlike_audio(0.9, seed=701)]
        _, results = asyncio.run(transcribe_all(hub, audios))
        for audio, events in zip(audios, results, strict=True):
            check_transcript(events, audio, tiny_model_dir)
    finally:
        hub.close()
    assert wait_for(lambda: not any(state.process.is_alive() for state in stages.values()))


def test_a_killed_replica_actor_fails_its_streams_and_is_replaced(ray_cluster, tmp_path, tiny_model_dir):
    pipeline = load_pipeline(
        write_toy_pipeline(tmp_path / "toy.yaml", relay={"replicas": 2, "host": "host_b"}), ["detokenize.host=host_a"]
    )
    hub = PipelineHub(pipeline, model_dir=tiny_model_dir, launcher=RayPlacement(ray_cluster, 60))
    capacity = hub.capacity
    audios = [speechlike_audio(1.0, seed=710 + index) for index in range(2)]

    async def killed_midway() -> tuple[list, list, float]:
        handles = [await hub.open(StreamOptions()) for _ in audios]
        assert sorted(hub.replica_of(handle.id) for handle in handles) == [0, 1]
        victim, survivor = sorted(handles, key=lambda handle: hub.replica_of(handle.id))
        for handle, audio in zip(handles, audios, strict=True):
            await send_all(handle, audio[: len(audio) // 2])
        killed = time.monotonic()
        ray.kill(hub.stage_processes(0)["relay"].process.actor)
        failed = await events_of(victim)
        waited = time.monotonic() - killed
        survivor_audio = audios[handles.index(survivor)]
        await send_all(survivor, survivor_audio[len(survivor_audio) // 2 :])
        survivor.end()
        return failed, await events_of(survivor), waited

    try:
        failed, finished, waited = asyncio.run(killed_midway())
        assert isinstance(failed[-1], StreamError) and failed[-1].code == "stream_failed"
        assert failed[-1].message.startswith("replica 0 failed: stage 'relay' died")
        assert waited < DEATH_NOTICED_S
        assert list(finished[-1].token_ids) == toy_ids(audios[1])
        assert wait_for(lambda: hub.capacity == capacity, 60)  # the replica was replaced
    finally:
        hub.close()


def test_a_host_no_node_offers_is_one_line(ray_cluster, tiny_model_dir):
    pipeline = load_pipeline(None, ["encoder.host=host_z"])
    with pytest.raises(RunnerError, match=r"^stages.encoder.host: no Ray node offers the resource 'host_z'"):
        PipelineHub(pipeline, model_dir=tiny_model_dir, launcher=RayPlacement(ray_cluster, 60))


def test_the_ray_option_runs_a_file_through_actors(ray_cluster, runner, tmp_path: Path, tiny_model_dir):
    audio = speechlike_audio(1.0, seed=720)
    wav = write_wav(tmp_path / "talk.wav", audio)
    result = runner.run(
        "pipeline.yaml",
        "--ray",
        ray_cluster,
        "--model",
        tiny_model_dir,
        "--input",
        wav,
        "-q",
        "--set",
        "encoder.host=host_b",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().strip() == transcribe_audio(audio, model_dir=tiny_model_dir).text.strip()


def test_ray_with_stages_and_replicas_in_a_run_of_files_are_one_line(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.5)
    with_stages = runner.run("pipeline.yaml", "--ray", "--stages", "encoder", "--input", wav)
    assert (with_stages.returncode, one_error_line(with_stages.stderr)) == (
        1,
        "voxtral-run: error: --ray places every stage itself; leave out --stages",
    )
    replicated = runner.run("pipeline.yaml", "--set", "encoder.replicas=2", "--input", wav)
    assert replicated.returncode == 1
    assert "replicas: a run of files uses one chain" in one_error_line(replicated.stderr)
