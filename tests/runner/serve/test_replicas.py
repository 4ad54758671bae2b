"""Replicas at the pipeline hub: three chains of the stages after the capture, each new stream routed to the least
loaded one (streams, KV memory) for its whole life; every stream gets its solo ids; a chain whose stage is killed
mid-stream fails its own streams within 5 s while the others finish whole, new streams go to the healthy chains, and
the broken chain is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import wait_for
from tests.runner.serve.test_pipeline_hub import check_transcript, events_of, send_all
from voxtral_run.runner.config import load_pipeline
from voxtral_run.runner.serve.hub import StreamError, StreamOptions
from voxtral_run.runner.serve.pipeline_hub import PipelineHub, _Chain

REPLICAS = 3
PER_REPLICA = 4  # each chain's encoder and decoder batch this many streams
DEATH_NOTICED_S = 5.0


@pytest.fixture(scope="module")
def replica_hub(tiny_model_dir: Path) -> Iterator[PipelineHub]:
    """The default pipeline on the tiny model with its stages after the capture in three chains."""
    settings = [
        f"{stage}.{key}={value}"
        for stage in ("encoder", "decoder")
        for key, value in (("replicas", REPLICAS), ("max_streams", PER_REPLICA))
    ]
    hub = PipelineHub(load_pipeline(None, settings), model_dir=tiny_model_dir)
    yield hub
    hub.close()


async def transcribe_all(hub: PipelineHub, audios: list) -> tuple[list[int | None], list[list]]:
    """Open a stream per audio at once (the replica each went to), then send each its audio: their events."""
    handles = [await hub.open(StreamOptions()) for _ in audios]
    replicas = [hub.replica_of(handle.id) for handle in handles]

    async def stream(handle, audio) -> list:
        await send_all(handle, audio)
        handle.end()
        return await events_of(handle)

    return replicas, await asyncio.gather(*(stream(h, a) for h, a in zip(handles, audios, strict=True)))


def test_twelve_streams_are_spread_over_three_replicas_and_each_gets_its_solo_ids(replica_hub, tiny_model_dir):
    audios = [speechlike_audio(1.0 + 0.05 * index, seed=500 + index) for index in range(REPLICAS * PER_REPLICA)]
    assert replica_hub.replicas == REPLICAS and replica_hub.capacity == REPLICAS * PER_REPLICA

    replicas, results = asyncio.run(transcribe_all(replica_hub, audios))
    assert Counter(replicas) == dict.fromkeys(range(REPLICAS), PER_REPLICA)
    for audio, events in zip(audios, results, strict=True):
        check_transcript(events, audio, tiny_model_dir)
    assert wait_for(lambda: replica_hub.active == 0) and replica_hub.held_streams() == []
    for replica in range(REPLICAS):  # each chain's encoder batched its own streams (reports fresh from the ask)
        encoder = replica_hub.figures().stages[f"encoder/{replica}"]["metrics"]
        assert max(size for size, _ in encoder["batch_counts"]) > 1


def test_a_chains_load_is_the_larger_of_its_share_of_streams_and_of_kv_memory_in_use() -> None:
    """A chain with few streams but its KV pages nearly all taken (long streams) is fuller than its stream count
    says; stages without a pool report none."""
    chain = _Chain(0, load_pipeline(None), capacity=4, streams={"a"})
    assert chain.load() == 0.25
    reports = {"mel": {"metrics": {}}, "encoder": {"kv": {"pages_in_use": 3, "pages": 40}}}
    chain.supervisor = SimpleNamespace(stages={name: SimpleNamespace(stats=stats) for name, stats in reports.items()})
    assert chain.load() == 0.25
    reports["decoder"] = {"kv": {"pages_in_use": 30, "pages": 40}}
    chain.supervisor.stages["decoder"] = SimpleNamespace(stats=reports["decoder"])
    assert chain.load() == 0.75


def test_a_killed_replica_fails_its_own_streams_the_others_finish_and_it_is_replaced(replica_hub, tiny_model_dir):
    audios = [speechlike_audio(1.6, seed=600 + index) for index in range(2 * REPLICAS)]
    victim = 1

    async def killed_midway() -> tuple[dict[int, list], dict[int, float], list[int | None]]:
        handles = [await replica_hub.open(StreamOptions()) for _ in audios]
        replicas = [replica_hub.replica_of(handle.id) for handle in handles]
        for handle, audio in zip(handles, audios, strict=True):
            await send_all(handle, audio[: len(audio) // 2])
        held = [f"decoder/{replica}: held 2" for replica in range(REPLICAS)]  # every stream is under way
        assert wait_for(lambda: set(held) <= set(replica_hub.held_streams()), 20)
        killed = time.monotonic()
        os.kill(replica_hub.stage_processes(victim)["encoder"].process.pid, signal.SIGKILL)
        waited: dict[int, float] = {}
        results: dict[int, list] = {}
        for index, handle in enumerate(handles):
            if replicas[index] == victim:
                results[index] = await events_of(handle)
                waited[index] = time.monotonic() - killed
        newcomers = [await replica_hub.open(StreamOptions()) for _ in range(2)]
        new_replicas = [replica_hub.replica_of(handle.id) for handle in newcomers]
        for handle in newcomers:
            handle.abort()
        for index, (handle, audio) in enumerate(zip(handles, audios, strict=True)):
            if replicas[index] != victim:
                await send_all(handle, audio[len(audio) // 2 :])
                handle.end()
                results[index] = await events_of(handle)
        return results, waited, [*replicas, *new_replicas]

    results, waited, replicas = asyncio.run(killed_midway())
    assert Counter(replicas[: len(audios)]) == dict.fromkeys(range(REPLICAS), 2)
    assert victim not in replicas[len(audios) :]  # new streams went to the healthy replicas
    for index, audio in enumerate(audios):
        if replicas[index] == victim:
            error = results[index][-1]
            assert isinstance(error, StreamError) and error.code == "stream_failed"
            assert error.message == f"replica {victim} failed: stage 'encoder' died (killed by SIGKILL)"
            assert waited[index] < DEATH_NOTICED_S
        else:
            check_transcript(results[index], audio, tiny_model_dir)
    # The broken chain is replaced and takes streams again.
    assert wait_for(lambda: replica_hub.capacity == REPLICAS * PER_REPLICA, 60)
    assert wait_for(lambda: replica_hub.active == 0)
    audios = [speechlike_audio(0.8, seed=620 + index) for index in range(REPLICAS)]

    replicas, results = asyncio.run(transcribe_all(replica_hub, audios))
    assert sorted(replicas) == list(range(REPLICAS))
    for audio, events in zip(audios, results, strict=True):
        check_transcript(events, audio, tiny_model_dir)
