"""POST /v1/audio/transcriptions through the official openai client: every response_format, and stream=true,
gives the stage chain's own ids and text (the CLI's writers for text, SRT and WebVTT); bad requests get OpenAI's
error body naming the problem."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
import soxr

from tests.conftest import speechlike_audio
from tests.runner.serve.conftest import MODEL, reference_events, wait_for, write_wav
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.text.writers import build_cues, open_writer
from voxtral_run.stages.transcribe import transcript_of

AUDIO = speechlike_audio(2.0, seed=18)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    return write_wav(tmp_path_factory.mktemp("upload") / "talk.wav", AUDIO)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> list[dict]:
    events = reference_events(AUDIO, tiny_model_dir)
    assert transcript_of(events).text  # text the formats can differ on
    return events


def written(format: str, events: list[dict]) -> str:
    """What the CLI's writer of `format` makes of the events."""
    out = io.StringIO()
    writer = open_writer(format, None, stream=out)
    for event in events:
        writer.write(event)
    writer.close()
    return out.getvalue()


def test_json_gives_the_chain_ids_and_text(client, wav, reference):
    expected = transcript_of(reference)
    with wav.open("rb") as file:  # any temperature: decoding is greedy
        result = client.audio.transcriptions.create(
            model="whisper-1", file=file, response_format="json", temperature=0.7
        )
    assert result.text == expected.text
    assert result.model_extra["token_ids"] == expected.token_ids
    usage = result.usage
    assert (usage.type, usage.output_tokens, usage.input_tokens) == ("tokens", len(expected.token_ids), 25)


@pytest.mark.parametrize("format", ["text", "srt", "vtt"])
def test_text_and_subtitles_are_the_cli_writers_output(client, wav, reference, format):
    with wav.open("rb") as file:
        result = client.audio.transcriptions.create(model=MODEL, file=file, response_format=format)
    assert result == written(format, reference)
    assert result.strip()


def test_verbose_json_has_timed_segments_with_their_ids(client, wav, reference):
    expected = transcript_of(reference)
    with wav.open("rb") as file:
        result = client.audio.transcriptions.create(
            model=MODEL, file=file, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    cues = build_cues([event for event in reference if event["type"] == "delta"])
    assert result.text == expected.text and result.duration == len(AUDIO) / SAMPLE_RATE
    assert [(s.text, s.start, s.end) for s in result.segments] == [(c.text, c.start_s, c.end_s) for c in cues]
    segment_ids = [token_id for segment in result.segments for token_id in segment.tokens]
    assert segment_ids == expected.token_ids[: len(segment_ids)] and segment_ids
    assert "".join(word.word for word in result.words) == "".join(expected.text.split())
    assert result.usage.seconds == len(AUDIO) / SAMPLE_RATE


def test_stream_sends_the_deltas_then_the_whole_text(client, wav, reference):
    expected = transcript_of(reference)
    with wav.open("rb") as file:
        events = list(client.audio.transcriptions.create(model=MODEL, file=file, stream=True))
    *deltas, done = events
    assert {delta.type for delta in deltas} == {"transcript.text.delta"} and done.type == "transcript.text.done"
    assert "".join(delta.delta for delta in deltas) == done.text == expected.text
    timed = [(d.delta, d.start_s, d.end_s) for d in deltas]
    assert timed == [(e["text"], e["start_s"], e["end_s"]) for e in reference if e["type"] == "delta"]
    assert done.model_extra["token_ids"] == expected.token_ids


def test_any_rate_and_channels_are_resampled_as_the_cli_does(client, tmp_path, tiny_model_dir):
    stereo = soxr.resample(AUDIO, SAMPLE_RATE, 44100)
    stereo = np.stack([stereo, 0.5 * stereo], axis=1).astype(np.float32)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, stereo, 44100, subtype="PCM_24")
    read, rate = soundfile.read(path, dtype="float32")
    mono = soxr.resample(read.mean(axis=1, dtype=np.float32), rate, SAMPLE_RATE, quality="HQ")
    expected = transcript_of(reference_events(mono, tiny_model_dir))
    with path.open("rb") as file:
        result = client.audio.transcriptions.create(model=MODEL, file=file, extra_body={"delay_ms": 480})
    assert (result.model_extra["token_ids"], result.text) == (expected.token_ids, expected.text)


def test_a_stream_s_own_delay(client, wav, tiny_model_dir):
    expected = transcript_of(reference_events(AUDIO, tiny_model_dir, delay_ms=1200))
    with wav.open("rb") as file:
        result = client.audio.transcriptions.create(model=MODEL, file=file, extra_body={"delay_ms": "1200"})
    assert result.model_extra["token_ids"] == expected.token_ids


@pytest.mark.parametrize(
    ("model", "extra", "content", "words"),
    [
        (MODEL, {}, b"not audio at all", "talk.wav: not a readable audio file"),
        ("", {}, None, "model is required"),
        (MODEL, {"response_format": "xml"}, None, "response_format 'xml' is not one of json, text"),
        (MODEL, {"delay_ms": "20"}, None, "delay_ms=20 is outside 80..2400 ms"),
        (MODEL, {"stream": "maybe"}, None, "stream must be true or false, got 'maybe'"),
        (MODEL, {"temperature": "warm"}, None, "temperature must be a number from 0 to 1, got 'warm'"),
        (MODEL, {"temperature": "1.5"}, None, "temperature must be a number from 0 to 1, got '1.5'"),
    ],
)
def test_bad_requests_get_openai_s_error_body(client, wav, model, extra, content, words):
    upload = ("talk.wav", content or wav.read_bytes())
    with pytest.raises(openai.BadRequestError) as failure:
        client.audio.transcriptions.create(model=model, file=upload, extra_body=extra)
    assert words in failure.value.body["message"] and failure.value.body["type"] == "invalid_request_error"
    assert "\n" not in failure.value.body["message"]


def test_a_client_leaving_a_stream_early_frees_it_at_once(client, server, tmp_path):
    long = write_wav(tmp_path / "long.wav", speechlike_audio(30.0, seed=2))

    def audio_seconds() -> float:
        text = urllib.request.urlopen(f"{server.http}/metrics").read().decode()
        return float(
            next(line for line in text.splitlines() if line.startswith("voxtral_serve_audio_seconds_total")).split()[1]
        )

    before = audio_seconds()
    with long.open("rb") as file:
        events = client.audio.transcriptions.create(model=MODEL, file=file, stream=True)
        first = next(iter(events))
        events.close()
    assert first.type == "transcript.text.delta"
    assert wait_for(lambda: server.hub.active == 0) and server.hub.held_streams() == []
    assert audio_seconds() == before  # aborted, not transcribed to its end
