"""The in-process hub: its streams give the stage chain's own transcripts, each with its own delay; abort and
close free every stage's state; a stream with too much audio waiting holds its sender back; past its capacity
a stream is refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import MAX_STREAMS, reference_events, wait_for
from voxtral_run.runner.serve.hub import (
    AudioClock,
    Done,
    HubError,
    InProcessHub,
    StreamError,
    StreamHandle,
    StreamOptions,
    TextDelta,
)
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.transcribe import transcript_of

CHUNK = 1280


async def transcribe(hub: InProcessHub, audio: np.ndarray, chunk: int = CHUNK, **options) -> list:
    handle = await hub.open(StreamOptions(**options))
    for start in range(0, len(audio), chunk):
        assert await handle.send(audio[start : start + chunk])
    handle.end()
    return [event async for event in handle.events()]


def test_streams_give_the_chain_transcript_with_their_own_delays(hub, tiny_model_dir):
    audios = [speechlike_audio(1.6, seed=11), speechlike_audio(1.2, seed=12), speechlike_audio(0.9, seed=13)]
    delays = [None, 160, 960]

    async def run_all() -> list[list]:
        return await asyncio.gather(
            *(
                transcribe(hub, audio, chunk=333 + 1000 * i, delay_ms=delay)
                for i, (audio, delay) in enumerate(zip(audios, delays, strict=True))
            )
        )

    results = asyncio.run(run_all())
    for audio, delay, events in zip(audios, delays, results, strict=True):
        reference = transcript_of(reference_events(audio, tiny_model_dir, delay))
        *deltas, done = events
        assert isinstance(done, Done) and all(isinstance(delta, TextDelta) for delta in deltas)
        assert (list(done.token_ids), done.text) == (reference.token_ids, reference.text)
        assert "".join(delta.text for delta in deltas) == done.text
        assert done.usage.audio_s == len(audio) / SAMPLE_RATE and done.usage.tokens == len(reference.token_ids)
        assert all(delta.latency_s >= 0 and delta.end_s > delta.start_s for delta in deltas)
    assert len({tuple(events[-1].token_ids) for events in results}) == 3
    assert hub.active == 0 and hub.held_streams() == []


def test_abort_frees_the_stream_in_every_stage_at_once(hub):
    async def abort_midway() -> StreamError:
        handle = await hub.open(StreamOptions(label="dropped"))
        await handle.send(speechlike_audio(1.0, seed=5))
        assert wait_for(lambda: hub.held_streams() != [], 5.0)
        handle.abort()
        assert not await handle.send(np.zeros(CHUNK, np.float32))  # audio after the abort is dropped
        return await handle.next_event()

    event = asyncio.run(abort_midway())
    assert event.code == "aborted"
    assert wait_for(lambda: hub.active == 0) and hub.held_streams() == []


def test_a_stream_with_too_much_audio_waiting_holds_its_sender_back(tiny_model_dir):
    hub = InProcessHub.load(tiny_model_dir, max_streams=1, max_pending_s=0.5)
    chunk = np.zeros(CHUNK, np.float32)

    async def flood() -> int:
        handle = await hub.open(StreamOptions())
        with hub._step_lock:  # the worker takes what is waiting, then waits for the stages
            sent = 0
            while sent < 50:
                try:
                    await asyncio.wait_for(handle.send(chunk), 0.2)
                except asyncio.TimeoutError:
                    break
                sent += 1
        # The worker steps again: the held-back sender goes on.
        for _ in range(20):
            await handle.send(chunk)
        handle.abort()
        return sent

    try:
        sent = asyncio.run(flood())
        # Held back once its waiting audio passed 0.5 s (plus what the worker took before it stopped).
        assert 0.5 * SAMPLE_RATE / CHUNK <= sent < 50
    finally:
        hub.close()


def test_past_its_capacity_a_stream_is_refused(hub):
    async def fill() -> tuple[list[StreamHandle], HubError]:
        handles = [await hub.open(StreamOptions()) for _ in range(MAX_STREAMS)]
        with pytest.raises(HubError) as refused:
            await hub.open(StreamOptions())
        for handle in handles:
            handle.abort()
        return handles, refused.value

    _, refusal = asyncio.run(fill())
    assert refusal.code == "server_at_capacity"
    assert refusal.message.startswith(f"server at capacity ({MAX_STREAMS} of {MAX_STREAMS} streams in use)")
    assert wait_for(lambda: hub.active == 0) and hub.held_streams() == []


def test_options_are_checked():
    for bad, words in ((79, "outside 80..2400"), (2401, "outside"), (True, "whole number"), (480.0, "whole number")):
        with pytest.raises(HubError, match=words):
            StreamOptions(delay_ms=bad)
    with pytest.raises(HubError, match="printable"):
        StreamOptions(label="a\nb")


def test_close_ends_open_streams_and_frees_the_stages(tiny_model_dir):
    hub = InProcessHub.load(tiny_model_dir, max_streams=2)

    async def open_then_close() -> tuple[StreamError, bool]:
        handle = await hub.open(StreamOptions())
        await handle.send(speechlike_audio(0.5, seed=1))
        hub.close()
        event = await handle.next_event()
        while isinstance(event, TextDelta):
            event = await handle.next_event()
        with pytest.raises(HubError) as refused:
            await hub.open(StreamOptions())
        return event, refused.value.code

    event, code = asyncio.run(open_then_close())
    assert event.code == "server_shutting_down" and code == "server_not_ready"
    assert not hub.ready and hub.active == 0 and hub.held_streams() == []


def test_latency_counts_from_the_arrival_of_the_audio_the_text_needed():
    clock = AudioClock(delay_s=0.48)
    for index in range(10):
        clock.arrived(CHUNK, now_s=0.08 * (index + 1))  # each 80 ms chunk arrives as it ends
    # Text ending at 0.16 s needed the audio up to 0.16 + 0.48 s and the log-mel's 12.5 ms beyond: the chunk
    # that ends at 0.72 s.
    assert clock.latency_s(0.16, now_s=0.75) == pytest.approx(0.03)
    assert clock.latency_s(0.24, now_s=0.85) == pytest.approx(0.05)
    clock.ended(1.0)
    assert clock.latency_s(0.64, now_s=1.25) == pytest.approx(0.25)  # the right pad's text: from the end
