"""Server VAD in OpenAI's dialect: a beta client (OpenAI-Beta: realtime=v1, transcription_session.update) and
the official client in the GA shape stream two utterances separated by silence and never commit; each gets
speech_started / speech_stopped / committed per utterance, and each item's transcript is the stage chain's own
for the session's audio cut at [audio_start_ms, audio_end_ms). A client's commit ends the open utterance, a
clear drops it, turn_detection null goes back to the client's commits; bad turn detection and beta formats, and
an utterance starting at capacity, get their error events while the session serves on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import openai
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import MAX_STREAMS, pcm16_base64, wait_for
from tests.runner.serve.test_realtime import OPENAI_RATE, at_24k, expected, heard_at_16k, pieces, recv, send
from voxtral_run.runner.serve.hub import StreamOptions
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.audio.resample import ResampleStage

BETA_HEADERS = {"OpenAI-Beta": "realtime=v1"}
SAMPLES_PER_MS = SAMPLE_RATE // 1000
APPEND_24K = OPENAI_RATE // 20  # 50 ms appends, as LiveKit's plugin sends them
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def tone(ms: int, pitch: float) -> np.ndarray:
    """A loud tone, 16-bit exact: an utterance's first and last 160 ms, so that its bounds are known."""
    t = np.arange(ms * SAMPLES_PER_MS) / SAMPLE_RATE
    return (np.round(0.3 * np.sin(2 * np.pi * pitch * t) * 32767) / 32768).astype(np.float32)


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * SAMPLES_PER_MS, np.float32)


def utterance(seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio between two tones (no pause in it reaches the 500 ms of silence that ends a turn)."""
    return np.concatenate([tone(160, 440), speechlike_audio(seconds, seed), tone(160, 660)])


FIRST, SECOND = utterance(1.2, 18), utterance(1.6, 5)
FIRST_MS, SECOND_MS = len(FIRST) // SAMPLES_PER_MS, len(SECOND) // SAMPLES_PER_MS
TWO_UTTERANCES = np.concatenate([silence(600), FIRST, silence(1000), SECOND, silence(1000)])
# Each starts 300 ms before its first voiced frame and ends 500 ms after its last.
SECOND_AT_MS = 600 + FIRST_MS + 1000
TWO_BOUNDS = [(600 - 300, 600 + FIRST_MS + 500), (SECOND_AT_MS - 300, SECOND_AT_MS + SECOND_MS + 500)]


def append(audio_24k: np.ndarray) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": pcm16_base64(audio_24k)}


def ga_update(turn_detection: dict | None) -> dict[str, Any]:
    session = {"type": "transcription", "audio": {"input": {"turn_detection": turn_detection}}}
    return {"type": "session.update", "session": session}


def whole_ms(sample: int) -> int:
    return sample - sample % SAMPLES_PER_MS


def heard_so_far(audio_24k: np.ndarray) -> int:
    """The 16 kHz samples the server's resampler has given out for the session's audio so far (no tail yet)."""
    return sum(len(piece) for piece in ResampleStage().push("s", {"samples": audio_24k, "sample_rate": OPENAI_RATE}))


async def events_until(ws: ClientConnection, completed: int) -> list[dict[str, Any]]:
    """The events up to this many items' completion."""
    events: list[dict[str, Any]] = []
    while sum(event["type"] == COMPLETED for event in events) < completed:
        events.append(await recv(ws))
    return events


def check_items(
    events: list[Any], heard: np.ndarray, model_dir: Path, previous: str | None = None
) -> list[tuple[int, int]]:
    """Each item's events in order, after the item `previous`, its transcript the chain's own for its cut of the
    session's 16 kHz audio; the items' (audio_start_ms, audio_end_ms)."""
    kinds = ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed")
    started, stopped, committed = ([event for event in events if event["type"] == kind] for kind in kinds)
    item_ids = [event["item_id"] for event in started]
    assert len(set(item_ids)) == len(item_ids) and [event["item_id"] for event in stopped] == item_ids
    assert [event["item_id"] for event in committed] == item_ids
    assert [event["previous_item_id"] for event in committed] == [previous, *item_ids[:-1]]
    bounds = []
    for item_id, start, stop in zip(item_ids, started, stopped, strict=True):
        own = [event["type"] for event in events if event.get("item_id") == item_id]  # started first, completed last
        assert own[0] == kinds[0] and own[-1] == COMPLETED and own.index(kinds[1]) < own.index(kinds[2])
        (completed,) = [event for event in events if event["type"] == COMPLETED and event["item_id"] == item_id]
        deltas = [event for event in events if event["type"] == DELTA and event["item_id"] == item_id]
        bounds.append((start["audio_start_ms"], stop["audio_end_ms"]))
        reference = expected(heard[bounds[-1][0] * SAMPLES_PER_MS : bounds[-1][1] * SAMPLES_PER_MS], model_dir)
        assert reference.text
        assert completed["transcript"] == reference.text == "".join(delta["delta"] for delta in deltas)
        assert completed["token_ids"] == reference.token_ids
    return bounds


def test_a_beta_client_gets_each_utterance_as_an_item_without_committing(server, tiny_model_dir):
    audio_24k = at_24k(TWO_UTTERANCES)
    update = {
        "type": "transcription_session.update",
        "session": {
            "input_audio_format": "pcm16",
            "input_audio_transcription": {"model": "gpt-4o-transcribe", "language": "", "prompt": ""},
            "turn_detection": SERVER_VAD,
            "input_audio_noise_reduction": {"type": "near_field"},
        },
    }

    async def beta_client() -> tuple:
        url = f"{server.realtime}?intent=transcription"
        async with connect(url, proxy=None, additional_headers=BETA_HEADERS) as ws:
            created = await recv(ws)
            await send(ws, update)
            updated = await recv(ws)
            for piece in pieces(audio_24k, APPEND_24K):
                await send(ws, append(piece))
            return created, updated, await events_until(ws, 2)

    created, updated, events = asyncio.run(beta_client())
    assert created["type"] == "transcription_session.created"
    session = created["session"]
    assert session["object"] == "realtime.transcription_session" and session["id"].startswith("sess_")
    assert session["input_audio_format"] == "pcm16" and session["turn_detection"] is None
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["turn_detection"] == SERVER_VAD and updated["session"]["input_audio_format"] == "pcm16"
    assert updated["session"]["input_audio_noise_reduction"] is None
    assert updated["session"]["input_audio_transcription"]["model"] == "gpt-4o-transcribe"
    assert check_items(events, heard_at_16k(audio_24k), tiny_model_dir) == TWO_BOUNDS
    assert wait_for(lambda: server.hub.active == 0) and server.hub.held_streams() == []


def test_the_official_client_s_ga_session_update_with_server_vad_works_the_same(server, tiny_model_dir):
    audio_24k = at_24k(TWO_UTTERANCES)
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        audio_input = {
            "format": {"type": "audio/pcm", "rate": OPENAI_RATE},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
        }
        connection.session.update(session={"type": "transcription", "audio": {"input": audio_input}})
        updated = connection.recv()
        assert updated.type == "session.updated"
        detection = updated.session.audio.input.turn_detection  # the defaults filled in
        assert (detection.type, detection.threshold, detection.prefix_padding_ms) == ("server_vad", 0.5, 300)
        for piece in pieces(audio_24k, APPEND_24K):
            connection.input_audio_buffer.append(audio=pcm16_base64(piece))
        events = []
        for event in connection:
            events.append(event.model_dump())
            if sum(event["type"] == COMPLETED for event in events) == 2:
                break
    assert check_items(events, heard_at_16k(audio_24k), tiny_model_dir) == TWO_BOUNDS


def test_a_commit_ends_the_open_utterance_a_clear_drops_it_and_null_gives_commits_back(server, tiny_model_dir):
    # The session's audio in turn: an utterance still open at the commit, one open at the clear, one ended by
    # silence; then, without turn detection, an item the client commits.
    spoken = at_24k(np.concatenate([silence(400), FIRST, silence(100)]))
    cleared = at_24k(np.concatenate([silence(200), utterance(0.5, 7), silence(100)]))
    last = at_24k(np.concatenate([silence(600), SECOND, silence(1000)]))
    manual = at_24k(utterance(0.6, 8))

    async def client() -> tuple:
        async with connect(f"{server.realtime}?intent=transcription", proxy=None) as ws:
            await recv(ws)
            await send(ws, ga_update(SERVER_VAD))
            assert (await recv(ws))["session"]["audio"]["input"]["turn_detection"] == SERVER_VAD
            for piece in pieces(spoken, APPEND_24K):
                await send(ws, append(piece))
            await send(ws, {"type": "input_audio_buffer.commit"})
            first = await events_until(ws, 1)
            for piece in pieces(cleared, APPEND_24K):
                await send(ws, append(piece))
            await send(ws, {"type": "input_audio_buffer.clear"})
            second = []
            while (event := await recv(ws))["type"] != "input_audio_buffer.cleared":
                second.append(event)
            await send(ws, {"type": "input_audio_buffer.commit"})  # the clear left nothing to commit
            empty = await recv(ws)
            for piece in pieces(last, APPEND_24K):
                await send(ws, append(piece))
            third = await events_until(ws, 1)
            await send(ws, ga_update(None))
            assert (await recv(ws))["session"]["audio"]["input"]["turn_detection"] is None
            await send(ws, append(manual))
            await send(ws, {"type": "input_audio_buffer.commit"})
            fourth = await events_until(ws, 1)
            return first, second, empty, third, fourth

    first, second, empty, third, fourth = asyncio.run(client())
    heard = heard_at_16k(np.concatenate([spoken, cleared, last]))
    # The commit: no speech_stopped; the item's audio runs to the last whole ms the resampler had given out.
    assert [event["type"] for event in first if event["type"] != DELTA] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.committed",
        COMPLETED,
    ]
    start_ms, end = first[0]["audio_start_ms"], whole_ms(heard_so_far(spoken))
    assert start_ms == 400 - 300
    reference = expected(heard[start_ms * SAMPLES_PER_MS : end], tiny_model_dir)
    assert first[-1]["transcript"] == reference.text and first[-1]["token_ids"] == reference.token_ids
    # The clear: the utterance it dropped is never committed, and nothing is left to commit.
    assert [event["type"] for event in second if event["type"] != DELTA] == ["input_audio_buffer.speech_started"]
    assert all(event.get("item_id") != second[0]["item_id"] for event in third)
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    # The next utterance: its own bounds in the session's audio, after the committed item.
    last_at_ms = (len(spoken) + len(cleared)) * 1000 // OPENAI_RATE
    bounds = check_items(third, heard, tiny_model_dir, previous=first[-1]["item_id"])
    assert bounds == [(last_at_ms + 600 - 300, last_at_ms + 600 + SECOND_MS + 500)]
    # turn_detection null: the client's commit again, the item resampled on its own as before.
    reference = expected(heard_at_16k(manual), tiny_model_dir)
    assert fourth[-1]["transcript"] == reference.text and fourth[-1]["token_ids"] == reference.token_ids
    committed = [event for event in fourth if event["type"] == "input_audio_buffer.committed"]
    assert [event["previous_item_id"] for event in committed] == [third[-1]["item_id"]]


BAD_UPDATES: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "semantic_vad"}, "invalid_event", "turn detection 'semantic_vad' is not served"),
    ({"type": "server_vad", "threshold": 1.5}, "invalid_event", "threshold 1.5 is outside 0..1"),
    ({"type": "server_vad", "threshold": -0.1}, "invalid_event", "threshold -0.1 is outside 0..1"),
    ({"type": "server_vad", "threshold": "high"}, "invalid_event", "turn_detection.threshold"),
    ({"type": "server_vad", "prefix_padding_ms": -1}, "invalid_event", "prefix_padding_ms -1 is outside"),
    ({"type": "server_vad", "silence_duration_ms": -500}, "invalid_event", "silence_duration_ms -500 is outside"),
]


def test_bad_turn_detection_and_formats_get_their_error_and_the_session_serves_on(server, tiny_model_dir):
    audio_24k = at_24k(np.concatenate([silence(300), SECOND, silence(800)]))

    def beta(session: dict) -> dict:
        return {"type": "transcription_session.update", "session": session}

    bad = [(ga_update(detection), code, text) for detection, code, text in BAD_UPDATES]
    bad += [(beta({"turn_detection": detection}), code, text) for detection, code, text in BAD_UPDATES]
    bad += [
        (beta({"input_audio_format": "g711_ulaw"}), "unsupported_audio_format", "g711_ulaw is not supported"),
        (beta({"input_audio_format": "g711_alaw"}), "unsupported_audio_format", "g711_alaw is not supported"),
        (beta({"input_audio_format": "mp3"}), "invalid_event", "input_audio_format"),
    ]

    async def client() -> tuple:
        async with connect(server.realtime, proxy=None, additional_headers=BETA_HEADERS) as ws:
            assert (await recv(ws))["type"] == "transcription_session.created"
            errors = []
            for message, _, _ in bad:
                await send(ws, message)
                errors.append(await recv(ws))
            await send(ws, beta({"turn_detection": {"type": "server_vad"}}))
            updated = await recv(ws)
            for piece in pieces(audio_24k, APPEND_24K):
                await send(ws, append(piece))
            return errors, updated, await events_until(ws, 1)

    errors, updated, events = asyncio.run(client())
    for error, (_, code, text) in zip(errors, bad, strict=True):
        assert error["type"] == "error" and error["error"]["code"] == code and text in error["error"]["message"], error
    assert updated["session"]["turn_detection"] == SERVER_VAD  # the defaults: no bad value was kept
    assert check_items(events, heard_at_16k(audio_24k), tiny_model_dir) == [(0, 300 + SECOND_MS + 500)]


def test_the_beta_header_or_a_first_beta_update_picks_openai_s_dialect(server):
    async def first_events(query: str, headers: dict[str, str], first: dict | None) -> list[str]:
        async with connect(f"{server.realtime}{query}", proxy=None, additional_headers=headers) as ws:
            types = [(await recv(ws))["type"]]
            if first is not None:
                await send(ws, first)
                types.append((await recv(ws))["type"])
            return types

    update = {"type": "transcription_session.update", "session": {"turn_detection": None}}
    cases = [
        ("?intent=transcription", BETA_HEADERS, None, ["transcription_session.created"]),
        ("", BETA_HEADERS, None, ["transcription_session.created"]),
        ("?model=x", {"OpenAI-Beta": "assistants=v2, realtime=v1"}, None, ["transcription_session.created"]),
        ("?intent=transcription", {}, None, ["session.created"]),
        ("", {}, update, ["session.created", "transcription_session.updated"]),  # vLLM's hello, then OpenAI's
    ]
    for query, headers, first, types in cases:
        assert asyncio.run(first_events(query, headers, first)) == types


def test_an_utterance_starting_at_capacity_gets_its_error_and_the_next_is_transcribed(server, tiny_model_dir):
    refused, served = at_24k(np.concatenate([silence(300), FIRST, silence(700)])), at_24k(TWO_UTTERANCES)

    async def client() -> tuple:
        async with connect(f"{server.realtime}?intent=transcription", proxy=None) as ws:
            await recv(ws)
            await send(ws, ga_update(SERVER_VAD))
            await recv(ws)
            fillers = [await server.hub.open(StreamOptions(label="filler")) for _ in range(MAX_STREAMS)]
            for piece in pieces(refused, APPEND_24K):
                await send(ws, append(piece))
            at_capacity = []
            while (event := await recv(ws))["type"] != "input_audio_buffer.speech_stopped":
                at_capacity.append(event)
            at_capacity.append(event)
            for filler in fillers:
                filler.abort()
            assert wait_for(lambda: server.hub.active == 0)
            for piece in pieces(served, APPEND_24K):
                await send(ws, append(piece))
            return at_capacity, await events_until(ws, 2)

    at_capacity, events = asyncio.run(client())
    assert [event["type"] for event in at_capacity] == [
        "input_audio_buffer.speech_started",
        "error",
        "input_audio_buffer.speech_stopped",
    ]
    assert at_capacity[1]["error"]["code"] == "server_at_capacity"
    assert at_capacity[2]["audio_end_ms"] == 300 + FIRST_MS + 500
    offset_ms = len(refused) * 1000 // OPENAI_RATE
    heard = heard_at_16k(np.concatenate([refused, served]))
    bounds = check_items(events, heard, tiny_model_dir)
    assert bounds == [(start + offset_ms, end + offset_ms) for start, end in TWO_BOUNDS]


def test_a_rate_change_under_server_vad_goes_on_with_the_session_s_audio(server, tiny_model_dir):
    before = at_24k(np.concatenate([silence(400), tone(160, 440)]))  # the utterance starts at 24 kHz
    after = np.concatenate([SECOND, silence(700)])  # and goes on at 16 kHz

    async def client() -> list[dict]:
        async with connect(f"{server.realtime}?intent=transcription", proxy=None) as ws:
            await recv(ws)
            await send(ws, ga_update(SERVER_VAD))
            await recv(ws)
            for piece in pieces(before, APPEND_24K):
                await send(ws, append(piece))
            update = ga_update(SERVER_VAD)
            update["session"]["audio"]["input"]["format"] = {"type": "audio/pcm", "rate": SAMPLE_RATE}
            await send(ws, update)
            for piece in pieces(after, SAMPLE_RATE // 20):
                await send(ws, append(piece))
            return await events_until(ws, 1)

    events = asyncio.run(client())
    heard = np.concatenate([heard_at_16k(before), after])  # the 24 kHz resampler's tail, then the 16 kHz audio
    assert check_items(events, heard, tiny_model_dir) == [(400 - 300, 400 + 160 + SECOND_MS + 500)]
