"""The pipeline hub: a pipeline's stages started once, each in its own process; every stream through them gets
transcribe_audio's own ids and text, alone or among twenty at once; abrupt aborts leave nothing in any stage
process and the hub serves on; a stage's refusal at its ceiling reaches its stream as server_at_capacity while
the others finish whole; a dead stage fails the open streams and the hub is no longer ready; the queues work over
ipc and over tcp; a stream's waiting audio and unread events are bounded."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import speechlike_audio
from tests.runner.conftest import write_toy_pipeline
from tests.runner.serve.conftest import wait_for
from tests.runner.test_pipeline_model import free_port_block
from tests.runner.toy_stages import ToyTranscriber
from voxtral_run.runner.config import load_pipeline
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.serve.hub import Done, HubError, StreamError, StreamHandle, StreamOptions, TextDelta
from voxtral_run.runner.serve.pipeline_hub import PipelineHub
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.transcribe import transcribe_audio

CHUNK = 1280


async def send_all(handle: StreamHandle, audio: np.ndarray, chunk: int = CHUNK) -> None:
    for start in range(0, len(audio), chunk):
        assert await handle.send(audio[start : start + chunk])


async def transcribe(hub: PipelineHub, audio: np.ndarray, chunk: int = CHUNK, **options) -> list:
    handle = await hub.open(StreamOptions(**options))
    await send_all(handle, audio, chunk)
    handle.end()
    return await events_of(handle)


async def events_of(handle: StreamHandle) -> list:
    return [event async for event in handle.events()]


def check_transcript(events: list, audio: np.ndarray, model_dir: Path, delay_ms: int | None = None) -> None:
    """The events are transcribe_audio's text and ids for the audio, as timed deltas then a Done with its usage."""
    reference = transcribe_audio(audio, model_dir=model_dir, delay_ms=delay_ms)
    *deltas, done = events
    assert isinstance(done, Done) and all(isinstance(delta, TextDelta) for delta in deltas), done
    assert (list(done.token_ids), done.text) == (reference.token_ids, reference.text)
    assert "".join(delta.text for delta in deltas) == done.text
    assert done.usage.audio_s == len(audio) / SAMPLE_RATE and done.usage.tokens == len(reference.token_ids)
    assert all(delta.latency_s >= 0 and delta.end_s > delta.start_s for delta in deltas)


def test_streams_give_transcribe_audio_s_ids_and_text_with_their_own_delays(pipeline_hub, tiny_model_dir):
    audios = [speechlike_audio(1.6, seed=31), speechlike_audio(1.1, seed=32), speechlike_audio(0.7, seed=33)]
    delays = [None, 160, 1200]
    chunks = [333, CHUNK, 7000]  # any pieces: the hub sends them on in the capture's chunks

    async def together() -> list[list]:
        streams = zip(audios, delays, chunks, strict=True)
        return await asyncio.gather(*(transcribe(pipeline_hub, a, c, delay_ms=d, label="t") for a, d, c in streams))

    results = asyncio.run(together())
    for audio, delay, events in zip(audios, delays, results, strict=True):
        check_transcript(events, audio, tiny_model_dir, delay)
    assert wait_for(lambda: pipeline_hub.active == 0) and pipeline_hub.held_streams() == []


def test_twenty_concurrent_streams_each_get_their_solo_transcript(pipeline_hub, tiny_model_dir):
    audios = [speechlike_audio(1.2 + 0.05 * index, seed=200 + index) for index in range(20)]

    async def all_at_once() -> list[list]:
        return await asyncio.gather(
            *(transcribe(pipeline_hub, audio, chunk=640 + 97 * index) for index, audio in enumerate(audios))
        )

    results = asyncio.run(all_at_once())
    for audio, events in zip(audios, results, strict=True):
        check_transcript(events, audio, tiny_model_dir)
    assert len({events[-1].token_ids for events in results}) == 20
    encoder = pipeline_hub.figures().stages["encoder"]["metrics"]
    assert max(size for size, _ in encoder["batch_counts"]) > 1  # the streams went through together, batched
    assert wait_for(lambda: pipeline_hub.active == 0) and pipeline_hub.held_streams() == []


def test_twenty_abrupt_aborts_leave_no_stream_in_any_stage_and_the_hub_serves_on(pipeline_hub, tiny_model_dir):
    async def abort_midway(index: int) -> StreamError:
        handle = await pipeline_hub.open(StreamOptions(label=f"dropped {index}"))
        await send_all(handle, speechlike_audio(1.0, seed=300 + index))
        # Mid-stream: the stage processes hold it (the model's text is still coming).
        assert wait_for(lambda: any(line.startswith("decoder: held") for line in pipeline_hub.held_streams()), 10)
        handle.abort()
        assert not await handle.send(np.zeros(CHUNK, np.float32))  # audio after the abort is dropped
        return await handle.next_event()

    for index in range(20):
        assert asyncio.run(abort_midway(index)).code == "aborted"
    # Each stream counts until its failure has passed every stage, so none is held once none is active.
    assert wait_for(lambda: pipeline_hub.active == 0)
    assert pipeline_hub.held_streams() == []
    audio = speechlike_audio(1.2, seed=330)
    check_transcript(asyncio.run(transcribe(pipeline_hub, audio)), audio, tiny_model_dir)


@pytest.fixture(scope="module")
def refusing_hub(tiny_model_dir: Path) -> Iterator[PipelineHub]:
    """An encoder of two streams that refuses a third, behind a hub that takes three."""
    config = load_pipeline(None, ["encoder.max_streams=2", "encoder.when_full=refuse"])
    hub = PipelineHub(config, model_dir=tiny_model_dir, capacity=3)
    yield hub
    hub.close()


def test_a_stage_at_capacity_refuses_the_third_stream_and_the_others_finish_whole(refusing_hub, tiny_model_dir):
    audios = [speechlike_audio(1.5, seed=41), speechlike_audio(1.3, seed=42)]

    async def third_refused() -> tuple[list[list], list]:
        handles = [await refusing_hub.open(StreamOptions()) for _ in audios]
        for handle, audio in zip(handles, audios, strict=True):
            await send_all(handle, audio[: len(audio) // 2])
        assert wait_for(lambda: "encoder: held 2" in refusing_hub.held_streams(), 10)
        third = await refusing_hub.open(StreamOptions())
        for piece in np.split(speechlike_audio(1.0, seed=43), 10):
            await third.send(piece)  # False once its refusal came
        refusal = await events_of(third)
        for handle, audio in zip(handles, audios, strict=True):
            await send_all(handle, audio[len(audio) // 2 :])
            handle.end()
        return [await events_of(handle) for handle in handles], refusal

    results, refusal = asyncio.run(third_refused())
    for audio, events in zip(audios, results, strict=True):
        check_transcript(events, audio, tiny_model_dir)
    [error] = refusal
    assert isinstance(error, StreamError) and error.code == "server_at_capacity"
    assert error.message.startswith("stage 'encoder' failed: encoder at capacity (2 of 2 streams")
    assert wait_for(lambda: refusing_hub.active == 0 and refusing_hub.held_streams() == [])
    audio = speechlike_audio(0.8, seed=44)  # the room the two made is the next stream's
    check_transcript(asyncio.run(transcribe(refusing_hub, audio)), audio, tiny_model_dir)


def test_a_dead_stage_fails_the_open_streams_and_the_hub_is_not_ready(tmp_path, tiny_model_dir):
    hub = PipelineHub(load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml")), model_dir=tiny_model_dir)

    async def killed_midway() -> tuple[StreamError, HubError]:
        handle = await hub.open(StreamOptions())
        await send_all(handle, speechlike_audio(0.5, seed=5))
        assert isinstance(await handle.next_event(), TextDelta)
        os.kill(hub.stage_processes()["relay"].process.pid, signal.SIGKILL)
        events = await events_of(handle)
        with pytest.raises(HubError) as refused:
            await hub.open(StreamOptions())
        return events[-1], refused.value

    try:
        error, refusal = asyncio.run(killed_midway())
        died = "stage 'relay' died (killed by SIGKILL)"
        assert (error.code, error.message) == ("internal_error", f"the pipeline failed: {died}")
        assert not hub.ready and hub.failure == died
        assert refusal.code == "server_not_ready"
        assert wait_for(lambda: not any(state.process.is_alive() for state in hub.stage_processes().values()))
    finally:
        hub.close()


def toy_ids(audio: np.ndarray) -> list[int]:
    """The toy transcriber's ids for audio in the capture's chunks, which is how the hub sends it."""
    toy = ToyTranscriber()
    for start in range(0, len(audio), CHUNK):
        toy.push("s", {"samples": audio[start : start + CHUNK, None], "sample_rate": SAMPLE_RATE})
    return toy.finish("s")[-1]["token_ids"]


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_the_queues_carry_streams_over_ipc_and_over_tcp_with_curve(tmp_path, tiny_model_dir, transport):
    pipeline = load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml"))
    pipeline.transport, pipeline.base_port = transport, free_port_block(3)
    hub = PipelineHub(pipeline, model_dir=tiny_model_dir)
    try:
        assert hub._chains[0].supervisor.source_edge.is_tcp == (transport == "tcp")  # tcp: the run's CURVE keys
        audio = speechlike_audio(1.0, seed=7)
        events = asyncio.run(transcribe(hub, audio, chunk=500))
        assert list(events[-1].token_ids) == toy_ids(audio)
    finally:
        hub.close()


def test_a_stream_s_waiting_audio_and_its_unread_events_are_bounded(tmp_path, tiny_model_dir):
    pipeline = load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml", relay={"throttle_ms": 40}, capacity=1))
    hub = PipelineHub(pipeline, model_dir=tiny_model_dir, max_pending_s=0.2, max_events=4)
    chunk = np.zeros(CHUNK, np.float32)

    async def flood_while_reading() -> tuple[list, int]:
        handle = await hub.open(StreamOptions())
        reading = asyncio.ensure_future(events_of(handle))
        most = 0
        for _ in range(30):
            assert await handle.send(chunk)
            most = max(most, hub._streams[handle.id].pending)
        handle.end()
        return await reading, most

    async def never_read() -> list:
        handle = await hub.open(StreamOptions())
        for _ in range(10):
            await handle.send(chunk)  # False once it was dropped
        handle.end()
        for _ in range(200):  # the loop must run for the events to arrive
            if hub.active == 0:
                break
            await asyncio.sleep(0.05)
        return await events_of(handle)

    try:
        events, most = asyncio.run(flood_while_reading())
        assert len(events) == 31 and isinstance(events[-1], Done)  # a delta a chunk, then the done
        assert hub.max_pending_samples < most <= hub.max_pending_samples + CHUNK  # held back at its bound
        *unread, error = asyncio.run(never_read())
        assert len(unread) == 4 and error.code == "slow_reader", error
        assert error.message.endswith("4 events unread, the stream was dropped")
        assert hub.active == 0 and hub.held_streams() == []
    finally:
        hub.close()


def test_a_capture_queue_that_drops_is_refused_before_anything_starts(tmp_path, tiny_model_dir):
    pipeline = load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml", policy="drop_oldest", capacity=2))
    with pytest.raises(RunnerError, match="policy drop_oldest drops audio; serve holds its clients back instead"):
        PipelineHub(pipeline, model_dir=tiny_model_dir)
