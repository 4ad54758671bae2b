"""The Python API: a Transcriber gives the reference chain's and the CLI's ids for arrays, files and live streams."""

from __future__ import annotations

import gc
import json
import threading
from itertools import cycle
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from tests.conftest import speechlike_audio
from tests.runner.conftest import REPO, wait_until_gone
from voxtral_run.stages.audio.capture import FileSource
from voxtral_run.stages.audio.constants import MS_PER_TOKEN, OFFLINE_STREAMING_BUFFER_TOKENS, SAMPLE_RATE, delay_tokens
from voxtral_run.stages.audio.resample import ResampleStage
from voxtral_run.stages.base import StageError
from voxtral_run.stages.transcribe import Result, Transcriber, build_chain, run_chain, transcribe_audio, transcript_of

DURATION_S = 2.0
AUDIO = speechlike_audio(DURATION_S, seed=3)
OTHER_AUDIO = speechlike_audio(1.5, seed=4)
DELAY_MS = 480  # the tiny checkpoint's tekken.json default
CD_RATE = 44100
ODD_SIZES = (1, 333, 4000, 17, 1280, 0, 2999)


def stereo_at_cd_rate(audio: np.ndarray) -> np.ndarray:
    """The audio at 44.1 kHz, two channels that differ (so averaging them matters)."""
    high = soxr.resample(audio, SAMPLE_RATE, CD_RATE)
    return np.stack([high, 0.5 * high], axis=1).astype(np.float32)


STEREO = stereo_at_cd_rate(AUDIO)


@pytest.fixture(scope="module")
def transcriber(tiny_model_dir) -> Transcriber:
    return Transcriber.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "stereo.wav"
    soundfile.write(path, STEREO, CD_RATE, subtype="FLOAT")  # float WAV: the samples read back exactly
    return path


def capture_chain_ids(wav: Path, model_dir: Path) -> list[int]:
    """What the CLI gives for a file: capture's chunks through the resample stage, then the model chain."""
    resample = ResampleStage()
    pieces = [out for chunk in FileSource(wav).chunks() for out in resample.push("s", chunk)]
    return transcript_of(run_chain(build_chain(model_dir), "s", pieces + resample.finish("s"))).token_ids


def split(audio: np.ndarray, sizes: tuple[int, ...]) -> list[np.ndarray]:
    pieces, start = [], 0
    for size in cycle(sizes):
        if start >= len(audio):
            return pieces
        pieces.append(audio[start : start + size])
        start += size


def held_streams(transcriber: Transcriber) -> list[str]:
    return [stream for stage in transcriber.stages for stream in stage.streams()]


def test_array_at_16k_matches_the_reference_chain(transcriber, tiny_model_dir):
    reference = transcribe_audio(AUDIO, model_dir=tiny_model_dir)
    assert len(set(reference.token_ids)) > 1 and reference.text  # a transcript that can differ
    result = transcriber.transcribe(AUDIO, sample_rate=SAMPLE_RATE)
    assert (result.token_ids, result.text) == (reference.token_ids, reference.text)
    assert "".join(delta.text for delta in result.deltas) == result.text
    delta_ids = [token_id for delta in result.deltas for token_id in delta.token_ids]
    assert delta_ids == result.token_ids[: len(delta_ids)]  # ids after the last text belong to no delta


def test_used_twice_gives_the_same_result_and_holds_no_stream(transcriber):
    first = transcriber.transcribe(AUDIO, sample_rate=SAMPLE_RATE)
    assert held_streams(transcriber) == []
    assert transcriber.transcribe(AUDIO, sample_rate=SAMPLE_RATE) == first
    assert held_streams(transcriber) == []


def test_44k_stereo_array_and_wav_file_give_the_cli_chain_ids(transcriber, tiny_model_dir, stereo_wav):
    expected = capture_chain_ids(stereo_wav, tiny_model_dir)
    assert len(set(expected)) > 1
    assert transcriber.transcribe(STEREO, sample_rate=CD_RATE).token_ids == expected
    assert transcriber.transcribe(stereo_wav).token_ids == expected
    assert held_streams(transcriber) == []


@pytest.mark.parametrize(("audio", "rate"), [(AUDIO, SAMPLE_RATE), (STEREO, CD_RATE)], ids=["16k-mono", "44k-stereo"])
def test_stream_in_odd_chunks_equals_transcribe(transcriber, audio, rate):
    whole = transcriber.transcribe(audio, sample_rate=rate)
    pushed = []
    with transcriber.stream(rate) as stream:
        for chunk in split(audio, ODD_SIZES):
            pushed += stream.push(chunk)
        result = stream.finish()
    assert result == whole
    assert pushed == result.deltas[: len(pushed)]  # live deltas are the final ones; finish adds the tail's
    assert "".join(delta.text for delta in result.deltas) == result.text
    assert held_streams(transcriber) == []


def test_segments_and_deltas_are_ordered_within_the_audio(transcriber):
    result = transcriber.transcribe(AUDIO, sample_rate=SAMPLE_RATE)
    # A generated token is timed by its index; the last come from the right pad (delay and buffer tokens).
    limit = DURATION_S + (delay_tokens(DELAY_MS) + OFFLINE_STREAMING_BUFFER_TOKENS) * MS_PER_TOKEN / 1000
    for pieces in (result.deltas, result.segments):
        assert pieces
        times = [time for piece in pieces for time in (piece.start_s, piece.end_s)]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= limit
    assert " ".join(segment.text for segment in result.segments) == " ".join(result.text.split())


def test_two_live_streams_at_once_are_independent(transcriber):
    alone = [transcriber.transcribe(AUDIO, sample_rate=SAMPLE_RATE), transcriber.transcribe(STEREO[:, 1], CD_RATE)]
    streams = [transcriber.stream(SAMPLE_RATE), transcriber.stream(CD_RATE)]
    pieces = [split(AUDIO, (1280,)), split(STEREO[:, 1], (3000,))]
    for index in range(max(map(len, pieces))):
        for stream, chunks in zip(streams, pieces, strict=True):
            if index < len(chunks):
                stream.push(chunks[index])
    assert [stream.finish() for stream in streams] == alone
    assert held_streams(transcriber) == []


def test_streams_on_several_threads_give_their_own_results(transcriber):
    audios = [AUDIO, OTHER_AUDIO, AUDIO[::-1].copy()]
    alone = [transcriber.transcribe(audio, sample_rate=SAMPLE_RATE) for audio in audios]
    results: dict[int, Result] = {}

    def live(index: int) -> None:
        with transcriber.stream(SAMPLE_RATE) as stream:
            for chunk in split(audios[index], (640,)):
                stream.push(chunk)
            results[index] = stream.finish()

    threads = [threading.Thread(target=live, args=(index,)) for index in range(len(audios))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(len(audios))] == alone
    assert held_streams(transcriber) == []


def test_unfinished_streams_leave_no_state(transcriber):
    stream = transcriber.stream(SAMPLE_RATE)
    stream.push(AUDIO[:8000])
    assert held_streams(transcriber)
    stream.close()
    assert held_streams(transcriber) == []
    with pytest.raises(RuntimeError), transcriber.stream(SAMPLE_RATE) as stream:
        stream.push(AUDIO[:8000])
        raise RuntimeError("the caller's own failure")
    assert held_streams(transcriber) == []
    stream = transcriber.stream(SAMPLE_RATE)
    stream.push(AUDIO[:8000])
    del stream  # dropped without finish or close: discarded at the transcriber's next call
    gc.collect()
    assert isinstance(transcriber.transcribe(OTHER_AUDIO, sample_rate=SAMPLE_RATE), Result)
    assert held_streams(transcriber) == []


def finished_stream(transcriber: Transcriber):
    stream = transcriber.stream(SAMPLE_RATE)
    stream.push(OTHER_AUDIO)
    stream.finish()
    return stream


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t, wav: t.transcribe(AUDIO), "an array needs its rate"),
        (lambda t, wav: t.transcribe(AUDIO, sample_rate=0), "sample_rate must be a positive whole number of Hz, got 0"),
        (lambda t, wav: t.transcribe(AUDIO, sample_rate=44100.5), "got 44100.5"),
        (lambda t, wav: t.stream("16000"), "got '16000'"),
        (lambda t, wav: t.transcribe(AUDIO[:0], sample_rate=SAMPLE_RATE), "no audio: the array holds 0 samples"),
        (lambda t, wav: t.transcribe(np.zeros((4, 2, 2)), SAMPLE_RATE), "shape [n] or [n, channels], got [4, 2, 2]"),
        (lambda t, wav: t.transcribe(AUDIO[None], SAMPLE_RATE), "would be 32000 channels; pass [n, channels]"),
        (lambda t, wav: t.transcribe((AUDIO * 32767).astype(np.int16), SAMPLE_RATE), "floats in [-1, 1], got int16"),
        (lambda t, wav: t.transcribe(np.full(800, np.nan), SAMPLE_RATE), "NaN or infinite"),
        (lambda t, wav: t.transcribe(wav, sample_rate=SAMPLE_RATE), "a file gives its own sample rate"),
        (lambda t, wav: t.transcribe(wav.with_name("missing.wav")), "missing.wav: no such file"),
        (lambda t, wav: t.stream(SAMPLE_RATE).finish(), "no audio was pushed before finish"),
        (lambda t, wav: finished_stream(t).push(AUDIO), "push after the stream was finished"),
        (lambda t, wav: finished_stream(t).finish(), "finish after the stream was finished"),
        (lambda t, wav: Transcriber.load(wav.with_name("no-model"), device="cpu"), "no-model does not exist"),
    ],
)
def test_errors_are_one_line_stage_errors(transcriber, stereo_wav, call, message):
    with pytest.raises(StageError) as raised:
        call(transcriber, stereo_wav)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert held_streams(transcriber) == []


@pytest.mark.slow
def test_token_ids_and_deltas_equal_the_cli(runner, transcriber, tiny_model_dir, stereo_wav, tmp_path):
    out = tmp_path / "transcript.jsonl"
    args = [REPO / "examples" / "cpu.yaml", "--model", tiny_model_dir, "--input", stereo_wav, "--format", "jsonl"]
    completed = runner.run(*args, "-o", out)
    assert completed.returncode == 0, completed.stderr.decode()
    assert wait_until_gone(runner.marker) == []
    events = [json.loads(line) for line in out.read_text().splitlines()]
    result = transcriber.transcribe(str(stereo_wav))
    assert events[-1]["type"] == "done" and events[-1]["token_ids"] == result.token_ids
    deltas = [(e["text"], e["start_s"], e["end_s"], e["token_ids"]) for e in events if e["type"] == "delta"]
    assert deltas == [(d.text, d.start_s, d.end_s, d.token_ids) for d in result.deltas]  # so the SRT cues too
