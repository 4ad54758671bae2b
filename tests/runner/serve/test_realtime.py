"""/v1/realtime: a client in vLLM's dialect and the official openai client in OpenAI's get the stage chain's own
text; 20 concurrent sessions each get their solo transcript; 20 abrupt disconnects leave nothing in the hub or
any stage; every malformed input gets its error event while the session and the others go on; idle, slow and
refused sessions are closed with a reason; the page, /health, /v1/models and /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import (
    MAX_STREAMS,
    MODEL,
    TEST_SETTINGS,
    pcm16_base64,
    reference_events,
    running_server,
    wait_for,
    write_wav,
)
from voxtral_run.runner.serve.hub import StreamOptions
from voxtral_run.runner.serve.metrics import ServeMetrics
from voxtral_run.runner.serve.realtime import RealtimeSession
from voxtral_run.runner.serve.settings import ServeSettings
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.audio.resample import ResampleStage
from voxtral_run.stages.transcribe import Transcript, transcript_of

AUDIO = speechlike_audio(2.0, seed=18)
OPENAI_RATE = 24_000
RECV_TIMEOUT_S = 30.0


def at_24k(audio: np.ndarray) -> np.ndarray:
    """The audio at OpenAI's rate, 16-bit exact (what PCM16 carries)."""
    high = soxr.resample(audio, SAMPLE_RATE, OPENAI_RATE)
    return (np.clip(np.round(high * 32768), -32768, 32767) / 32768).astype(np.float32)


def heard_at_16k(audio_24k: np.ndarray) -> np.ndarray:
    """What the server makes of 24 kHz audio: the resample stage's 16 kHz (the same for any chunking)."""
    resample = ResampleStage()
    pieces = resample.push("s", {"samples": audio_24k, "sample_rate": OPENAI_RATE}) + resample.finish("s")
    return np.concatenate(pieces)


def expected(audio: np.ndarray, model_dir: Path, delay_ms: int | None = None) -> Transcript:
    return transcript_of(reference_events(audio, model_dir, delay_ms))


def pieces(audio: np.ndarray, size: int) -> list[np.ndarray]:
    return [audio[start : start + size] for start in range(0, len(audio), size)]


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def vllm_stream(ws: ClientConnection, audio: np.ndarray, chunk: int = 1280) -> tuple[list[dict], dict]:
    """A stream in vLLM's dialect on a validated session: commit, appends, commit final; its deltas and done."""
    await send(ws, {"type": "input_audio_buffer.commit"})
    for piece in pieces(audio, chunk):
        await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)})
    await send(ws, {"type": "input_audio_buffer.commit", "final": True})
    deltas = []
    while (event := await recv(ws))["type"] == "transcription.delta":
        deltas.append(event)
    assert event["type"] == "transcription.done", event
    return deltas, event


async def vllm_session(url: str, audio: np.ndarray, delay_ms: int | None = None) -> tuple[list[dict], dict]:
    async with connect(url, proxy=None) as ws:
        assert (await recv(ws))["type"] == "session.created"
        update = {"type": "session.update", "model": MODEL} | ({} if delay_ms is None else {"delay_ms": delay_ms})
        await send(ws, update)
        return await vllm_stream(ws, audio)


async def openai_session(url: str, audio_24k: np.ndarray) -> tuple[list[dict], dict]:
    """A transcription session in OpenAI's dialect over a plain WebSocket: one item, committed at its end."""
    async with connect(f"{url}?intent=transcription", proxy=None) as ws:
        created = await recv(ws)
        assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
        for piece in pieces(audio_24k, 1920):
            await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)})
        await send(ws, {"type": "input_audio_buffer.commit"})
        deltas, committed = [], None
        while (event := await recv(ws))["type"] != "conversation.item.input_audio_transcription.completed":
            if event["type"] == "input_audio_buffer.committed":
                committed = event
            else:
                assert event["type"] == "conversation.item.input_audio_transcription.delta", event
                deltas.append(event)
        assert committed["item_id"] == event["item_id"] and {delta["item_id"] for delta in deltas} <= {event["item_id"]}
        return deltas, event


def check_vllm(result: tuple[list[dict], dict], reference: Transcript, audio_s: float) -> None:
    deltas, done = result
    assert done["text"] == reference.text and done["token_ids"] == reference.token_ids
    assert "".join(delta["delta"] for delta in deltas) == reference.text
    delta_ids = [token for delta in deltas for token in delta["token_ids"]]
    assert delta_ids == reference.token_ids[: len(delta_ids)]  # ids after the last text belong to no delta
    usage = done["usage"]
    assert usage["completion_tokens"] == len(reference.token_ids) and usage["audio_seconds"] == audio_s
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_vllm_client_gets_the_chain_text_with_timed_deltas(server, tiny_model_dir):
    reference_events_ = reference_events(AUDIO, tiny_model_dir)
    reference = transcript_of(reference_events_)
    assert reference.text
    result = asyncio.run(vllm_session(server.realtime, AUDIO))
    check_vllm(result, reference, len(AUDIO) / SAMPLE_RATE)
    timed = [(d["delta"], d["start_s"], d["end_s"]) for d in result[0]]
    assert timed == [(e["text"], e["start_s"], e["end_s"]) for e in reference_events_ if e["type"] == "delta"]


def test_a_vllm_session_has_its_own_delay_and_goes_on_after_done(server, tiny_model_dir):
    other = speechlike_audio(1.6, seed=7)

    async def two_streams() -> tuple:
        async with connect(server.realtime, proxy=None) as ws:
            await recv(ws)
            await send(ws, {"type": "session.update", "model": MODEL, "delay_ms": 960})
            return await vllm_stream(ws, AUDIO, chunk=4000), await vllm_stream(ws, other, chunk=700)

    first, second = asyncio.run(two_streams())
    check_vllm(first, expected(AUDIO, tiny_model_dir, 960), len(AUDIO) / SAMPLE_RATE)
    check_vllm(second, expected(other, tiny_model_dir, 960), len(other) / SAMPLE_RATE)


def test_a_vllm_session_s_back_to_back_streams_come_out_one_after_the_other(server, tiny_model_dir):
    audios = [AUDIO, speechlike_audio(1.6, seed=17)]

    async def back_to_back() -> list:
        async with connect(server.realtime, proxy=None) as ws:
            await recv(ws)
            await send(ws, {"type": "session.update", "model": MODEL})
            for audio in audios:  # the second stream starts before the first one's text is all out
                await send(ws, {"type": "input_audio_buffer.commit"})
                await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(audio)})
                await send(ws, {"type": "input_audio_buffer.commit", "final": True})
            results = []
            for _ in audios:
                deltas = []
                while (event := await recv(ws))["type"] == "transcription.delta":
                    deltas.append(event)
                results.append((deltas, event))
            return results

    for result, audio in zip(asyncio.run(back_to_back()), audios, strict=True):
        check_vllm(result, expected(audio, tiny_model_dir), len(audio) / SAMPLE_RATE)


def test_the_official_openai_realtime_client_gets_the_chain_text(server, tiny_model_dir):
    audio_24k = at_24k(AUDIO)
    reference = expected(heard_at_16k(audio_24k), tiny_model_dir)
    assert reference.text
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = connection.recv()
        assert created.type == "session.created" and created.session.type == "transcription"
        audio_input = {
            "format": {"type": "audio/pcm", "rate": OPENAI_RATE},
            "transcription": {"model": "gpt-4o-transcribe", "delay": "medium"},
            "turn_detection": None,
        }
        connection.session.update(session={"type": "transcription", "audio": {"input": audio_input}})
        updated = connection.recv()
        assert updated.type == "session.updated"
        assert updated.session.audio.input.transcription.model_extra["delay_ms"] == 480
        for piece in pieces(audio_24k, 4800):
            connection.input_audio_buffer.append(audio=pcm16_base64(piece))
        connection.input_audio_buffer.commit()
        events = []
        for event in connection:
            events.append(event)
            if event.type == "conversation.item.input_audio_transcription.completed":
                break
    *deltas, completed = [event for event in events if event.type != "input_audio_buffer.committed"]
    committed = [event for event in events if event.type == "input_audio_buffer.committed"]
    assert {delta.type for delta in deltas} == {"conversation.item.input_audio_transcription.delta"}
    assert completed.transcript == reference.text == "".join(delta.delta for delta in deltas)
    assert completed.model_extra["token_ids"] == reference.token_ids
    assert {delta.item_id for delta in deltas} == {completed.item_id}
    assert completed.usage.output_tokens == len(reference.token_ids) and completed.usage.input_tokens == 25
    assert [event.item_id for event in committed] == [completed.item_id]


def test_twenty_concurrent_sessions_each_get_their_solo_transcript(server, tiny_model_dir):
    audios = [speechlike_audio(1.2 + 0.05 * index, seed=100 + index) for index in range(20)]
    heard = [audio if index % 2 == 0 else heard_at_16k(at_24k(audio)) for index, audio in enumerate(audios)]
    references = [expected(audio, tiny_model_dir) for audio in heard]
    assert len({tuple(reference.token_ids) for reference in references}) == 20

    async def all_at_once() -> list:
        sessions = [
            vllm_session(server.realtime, audio) if index % 2 == 0 else openai_session(server.realtime, at_24k(audio))
            for index, audio in enumerate(audios)
        ]
        return await asyncio.gather(*sessions)

    for index, ((deltas, last), reference) in enumerate(zip(asyncio.run(all_at_once()), references, strict=True)):
        text = last["text"] if index % 2 == 0 else last["transcript"]
        assert (last["token_ids"], text) == (reference.token_ids, reference.text), f"session {index}"
        assert "".join(delta["delta"] for delta in deltas) == reference.text
    assert wait_for(lambda: server.hub.active == 0) and server.hub.held_streams() == []


def test_twenty_abrupt_disconnects_leave_nothing_and_the_server_serves_on(server, tiny_model_dir):
    async def drop(index: int) -> None:
        query = "?intent=transcription" if index % 2 else ""
        ws = await connect(f"{server.realtime}{query}", proxy=None)
        await recv(ws)
        if index % 2:
            audio = at_24k(speechlike_audio(0.6, seed=index))
        else:
            await send(ws, {"type": "session.update", "model": MODEL})
            await send(ws, {"type": "input_audio_buffer.commit"})
            audio = speechlike_audio(0.6, seed=index)
        for piece in pieces(audio, 2000):
            await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)})
        assert wait_for(lambda: server.hub.active > 0, 5.0)
        ws.transport.abort()  # no close frame: the connection just goes

    async def drops() -> None:
        for index in range(20):
            await drop(index)

    asyncio.run(drops())
    assert wait_for(lambda: server.hub.active == 0), "a dropped session's stream is still open"
    assert server.hub.held_streams() == []
    check_vllm(asyncio.run(vllm_session(server.realtime, AUDIO)), expected(AUDIO, tiny_model_dir), 2.0)


VLLM_MALFORMED: list[tuple[Any, str]] = [
    ("x" * (TEST_SETTINGS.max_message_bytes + 1), "message_too_large"),
    ("{bad", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    (b"\x00\x01", "invalid_json"),
    ({"type": "nope"}, "unknown_event"),
    ({"no": "type"}, "unknown_event"),
    ({"type": "input_audio_buffer.commit"}, "model_not_validated"),
    ({"type": "session.update"}, "invalid_event"),
    ({"type": "session.update", "model": "whisper-1"}, "model_not_found"),
    ({"type": "session.update", "model": MODEL, "delay_ms": 50}, "invalid_event"),
    ({"type": "session.update", "model": MODEL}, ""),  # accepted: no reply
    ({"type": "input_audio_buffer.append"}, "invalid_event"),
    ({"type": "input_audio_buffer.append", "audio": "!!not base64!!"}, "invalid_audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}, "invalid_audio"),
    ({"type": "input_audio_buffer.append", "audio": ""}, "invalid_audio"),
    ({"type": "input_audio_buffer.commit", "final": "yes"}, "invalid_event"),
    ({"type": "input_audio_buffer.commit", "final": True}, "invalid_event"),
]

OPENAI_MALFORMED: list[tuple[Any, str]] = [
    ({"type": "session.update", "session": {"type": "transcription"}, "event_id": "e1"}, "session.updated"),
    ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_event"),
    (
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        },
        "unsupported_audio_format",
    ),  # noqa: E501
    (
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"format": {"rate": 8000}}}},
        },
        "unsupported_audio_format",
    ),  # noqa: E501
    (
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"transcription": {"delay_ms": 9000}}}},
        },
        "invalid_event",
    ),  # noqa: E501
    ({"type": "input_audio_buffer.commit", "event_id": "e2"}, "input_audio_buffer_commit_empty"),
    (
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode(), "event_id": "e3"},
        "invalid_audio",
    ),  # noqa: E501
    ({"type": "input_audio_buffer.clear"}, "input_audio_buffer.cleared"),
    ({"type": "response.create"}, "unknown_event"),
]


async def send_raw(ws: ClientConnection, message: Any) -> None:
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))


def test_every_malformed_input_gets_its_error_and_the_sessions_go_on(server, tiny_model_dir):
    other = speechlike_audio(1.8, seed=16)
    audio_24k = at_24k(AUDIO)

    async def vllm_malformed() -> tuple:
        async with connect(server.realtime, proxy=None, max_size=None) as ws:
            await recv(ws)
            codes = []
            for message, code in VLLM_MALFORMED:
                await send_raw(ws, message)
                if code:
                    event = await recv(ws)
                    assert event["type"] == "error" and "\n" not in event["error"], event
                    codes.append(event["code"])
                else:
                    codes.append("")
            return codes, await vllm_stream(ws, AUDIO)

    async def openai_malformed() -> tuple:
        async with connect(f"{server.realtime}?intent=transcription", proxy=None) as ws:
            await recv(ws)
            answers = []
            for message, _ in OPENAI_MALFORMED:
                await send_raw(ws, message)
                event = await recv(ws)
                answers.append(event["error"]["code"] if event["type"] == "error" else event["type"])
                if message.get("event_id") and event["type"] == "error":
                    assert event["error"]["event_id"] == message["event_id"]
            result = await openai_session_on(ws, audio_24k)
            return answers, result

    async def together() -> tuple:
        return await asyncio.gather(vllm_malformed(), openai_malformed(), vllm_session(server.realtime, other))

    (codes, stream), (answers, openai_result), bystander = asyncio.run(together())
    assert codes == [code for _, code in VLLM_MALFORMED]
    check_vllm(stream, expected(AUDIO, tiny_model_dir), 2.0)
    assert answers == [answer for _, answer in OPENAI_MALFORMED]
    assert openai_result[1]["transcript"] == expected(heard_at_16k(audio_24k), tiny_model_dir).text
    check_vllm(bystander, expected(other, tiny_model_dir), len(other) / SAMPLE_RATE)
    assert wait_for(lambda: server.hub.active == 0) and server.hub.held_streams() == []


async def openai_session_on(ws: ClientConnection, audio_24k: np.ndarray) -> tuple[list[dict], dict]:
    for piece in pieces(audio_24k, 1920):
        await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)})
    await send(ws, {"type": "input_audio_buffer.commit"})
    deltas = []
    while (event := await recv(ws))["type"] != "conversation.item.input_audio_transcription.completed":
        deltas.append(event)
    return deltas, event


def test_a_message_past_the_server_s_read_limit_closes_only_its_connection(server, tiny_model_dir):
    async def too_big() -> int:
        async with connect(server.realtime, proxy=None, max_size=None) as ws:
            await recv(ws)
            await ws.send("x" * (4 * TEST_SETTINGS.max_message_bytes + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            return closed.value.rcvd.code

    assert asyncio.run(too_big()) == 1009
    check_vllm(asyncio.run(vllm_session(server.realtime, AUDIO)), expected(AUDIO, tiny_model_dir), 2.0)


def test_idle_sessions_are_closed_and_their_streams_freed(hub):
    settings = ServeSettings(model_name=MODEL, idle_timeout_s=0.3)

    async def idle(url: str, open_stream: bool) -> tuple[dict, int]:
        async with connect(url, proxy=None) as ws:
            await recv(ws)
            if open_stream:
                await send(ws, {"type": "session.update", "model": MODEL})
                await send(ws, {"type": "input_audio_buffer.commit"})
                await send(ws, {"type": "input_audio_buffer.append", "audio": pcm16_base64(AUDIO[:4000])})
            while (event := await recv(ws))["type"] != "error":
                pass
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            return event, closed.value.rcvd.code

    with running_server(hub, settings) as server:
        for open_stream in (False, True):
            event, code = asyncio.run(idle(server.realtime, open_stream))
            assert (event["code"], code) == ("idle_timeout", 1008)
            assert event["error"] == "no event for 0.3 s: session closed"
        assert wait_for(lambda: hub.active == 0) and hub.held_streams() == []


def test_past_the_hub_s_ceiling_sessions_and_uploads_are_refused(server, tiny_model_dir, tmp_path):
    wav = write_wav(tmp_path / "a.wav", AUDIO)
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)

    async def at_capacity() -> tuple:
        early = await connect(server.realtime, proxy=None)
        await recv(early)
        await send(early, {"type": "session.update", "model": MODEL})
        early_openai = await connect(f"{server.realtime}?intent=transcription", proxy=None)
        await recv(early_openai)
        fillers = [await server.hub.open(StreamOptions(label="filler")) for _ in range(MAX_STREAMS)]
        await send(early, {"type": "input_audio_buffer.commit"})
        refused_stream = await recv(early)
        for piece in pieces(at_24k(AUDIO), 4800):  # one error for the item, not one per append
            await send(early_openai, {"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)})
        await send(early_openai, {"type": "input_audio_buffer.commit"})
        refused_item = [(await recv(early_openai))["error"]["message"] for _ in range(2)]
        await early_openai.close()
        async with connect(server.realtime, proxy=None) as late:
            refused_session = await recv(late)
            with pytest.raises(ConnectionClosed) as closed:
                await recv(late)
        with wav.open("rb") as file, pytest.raises(openai.APIStatusError) as upload:
            await asyncio.to_thread(client.audio.transcriptions.create, model=MODEL, file=file)
        health = json.loads(urllib.request.urlopen(f"{server.http}/health").read())
        for filler in fillers:
            filler.abort()
        assert wait_for(lambda: server.hub.active == 0)  # the worker frees them at its next tick
        result = await vllm_stream(early, AUDIO)  # the early session goes on once there is room
        await early.close()
        return refused_stream, refused_item, refused_session, closed.value.rcvd.code, upload.value, health, result

    refused_stream, refused_item, refused_session, code, upload, health, result = asyncio.run(at_capacity())
    assert refused_item[0].startswith("server at capacity (24 of 24 streams in use)")
    assert refused_item[1] == "the item was refused (server at capacity): its audio was dropped"
    for refusal in (refused_stream, refused_session):
        assert refusal["code"] == "server_at_capacity" and refusal["error"].startswith("server at capacity")
    assert code == 1013
    assert upload.status_code == 503 and upload.body["code"] == "server_at_capacity"
    assert health == {"status": "ready", "streams": MAX_STREAMS, "capacity": MAX_STREAMS}
    check_vllm(result, expected(AUDIO, tiny_model_dir), 2.0)


class StalledClient:
    """A WebSocket client that sends its events at once and never reads: every send to it blocks."""

    query_params: dict[str, str] = {}
    headers: dict[str, str] = {}

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return {"type": "websocket.receive", "text": self.messages.pop(0)}
        return await asyncio.get_running_loop().create_future()  # never done: the client sends nothing more

    async def send_text(self, text: str) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.set_result((code, reason))


def test_a_client_that_reads_too_slowly_is_closed_and_stalls_no_one(server, tiny_model_dir):
    settings = ServeSettings(model_name=MODEL, max_outgoing_events=2)
    other = speechlike_audio(1.7, seed=21)

    async def stalled() -> tuple:
        events = [{"type": "session.update", "model": MODEL}, {"type": "input_audio_buffer.commit"}]
        events += [{"type": "input_audio_buffer.append", "audio": pcm16_base64(piece)} for piece in pieces(AUDIO, 1280)]
        events.append({"type": "input_audio_buffer.commit", "final": True})
        client = StalledClient([json.dumps(event) for event in events])
        session = RealtimeSession(client, server.hub, settings, ServeMetrics(server.hub))
        _, bystander = await asyncio.gather(
            asyncio.wait_for(session.run(), RECV_TIMEOUT_S), vllm_session(server.realtime, other)
        )
        return await client.closed, bystander

    (code, reason), bystander = asyncio.run(stalled())
    assert (code, reason) == (1008, "client reads too slowly: 2 events waiting")
    check_vllm(bystander, expected(other, tiny_model_dir), len(other) / SAMPLE_RATE)
    assert wait_for(lambda: server.hub.active == 0) and server.hub.held_streams() == []


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read().decode()


def metrics(server) -> dict[str, float]:
    status, kind, text = get(server.http + "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def test_the_page_health_models_and_metrics(server):
    status, kind, page = get(server.http + "/")
    assert status == 200 and kind.startswith("text/html") and 'id="toggle"' in page and "/static/app.js" in page
    for script in ("app.js", "pcm-worklet.js"):
        status, kind, body = get(f"{server.http}/static/{script}")
        assert status == 200 and "javascript" in kind and body
    assert "registerProcessor" in get(f"{server.http}/static/pcm-worklet.js")[2]
    status, _, health = get(server.http + "/health")
    assert status == 200 and json.loads(health) == {"status": "ready", "streams": 0, "capacity": MAX_STREAMS}
    status, _, models = get(server.http + "/v1/models")
    assert status == 200 and [model["id"] for model in json.loads(models)["data"]] == [MODEL]
    asyncio.run(vllm_session(server.realtime, AUDIO))
    assert wait_for(lambda: metrics(server)["voxtral_serve_active_sessions"] == 0)  # the server saw the client go
    values = metrics(server)
    assert values['voxtral_serve_sessions_total{protocol="realtime"}'] >= 1
    assert values["voxtral_serve_audio_seconds_total"] >= 2.0 and values["voxtral_serve_tokens_total"] >= 35
    assert values["voxtral_serve_token_latency_seconds_count"] >= 1
    assert values["voxtral_serve_stream_capacity"] == MAX_STREAMS and values["voxtral_serve_active_streams"] == 0
