"""The real stages over processes, on a tiny random checkpoint: same ids as the in-process transcription."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.runner.conftest import REPO, wait_until_gone, write_noise_wav
from voxtral_run.stages.audio.capture import FileSource
from voxtral_run.stages.audio.resample import ResampleStage
from voxtral_run.stages.transcribe import transcribe_audio

PIPELINE = REPO / "pipeline.yaml"
DELAY_MS = 480  # pipeline.yaml's
ON_CPU = ["--set", "encoder.device=cpu", "--set", "decoder.device=cpu"]
HOST_A = "capture,resample,mel,detokenize,output"
HOST_B = "encoder,decoder"


def done_ids(stdout: bytes) -> list[int]:
    last = json.loads(stdout.decode().splitlines()[-1])
    assert last["type"] == "done"
    return last["token_ids"]


def run_jsonl(runner, model_dir: Path, *args: str, input_bytes: bytes | None = None) -> list[int]:
    result = runner.run(PIPELINE, "--model", model_dir, "--format", "jsonl", *ON_CPU, *args, input_bytes=input_bytes)
    assert result.returncode == 0, result.stderr.decode()
    assert wait_until_gone(runner.marker) == []
    return done_ids(result.stdout)


@pytest.fixture(scope="module")
def audio_wav(tmp_path_factory) -> Path:
    return write_noise_wav(tmp_path_factory.mktemp("audio") / "speech.wav", 2.0, seed=3)


@pytest.fixture(scope="module")
def reference_ids(audio_wav, tiny_model_dir) -> list[int]:
    audio, rate = soundfile.read(audio_wav, dtype="float32")
    assert rate == 16000
    return transcribe_audio(audio, model_dir=tiny_model_dir, delay_ms=DELAY_MS).token_ids


@pytest.mark.slow
def test_wav_file_matches_in_process(runner, tiny_model_dir, audio_wav, reference_ids):
    assert len(set(reference_ids)) > 1  # a transcript that can differ
    assert run_jsonl(runner, tiny_model_dir, "--input", audio_wav) == reference_ids


@pytest.mark.slow
def test_raw_stdin_matches_in_process(runner, tiny_model_dir, audio_wav, reference_ids):
    audio, _ = soundfile.read(audio_wav, dtype="int16")
    ids = run_jsonl(runner, tiny_model_dir, "--input", "-", "--rate", "16000", input_bytes=audio.tobytes())
    assert ids == reference_ids


@pytest.mark.slow
def test_44k_stereo_matches_in_process_on_the_resampled_audio(runner, tiny_model_dir, tmp_path):
    wav = write_noise_wav(tmp_path / "stereo.wav", 1.5, rate=44100, channels=2, seed=5)
    resample = ResampleStage()
    pieces = [out for chunk in FileSource(wav).chunks() for out in resample.push("s", chunk)]
    audio = np.concatenate(pieces + resample.finish("s"))
    expected = transcribe_audio(audio, model_dir=tiny_model_dir, delay_ms=DELAY_MS).token_ids
    assert run_jsonl(runner, tiny_model_dir, "--input", wav) == expected


@pytest.mark.slow
def test_several_files_at_once_give_each_file_its_own_ids(runner, tiny_model_dir, audio_wav, reference_ids, tmp_path):
    """Three files through the real stages at once, each its own stream: each file gets the token ids of its
    own run, however the stages interleave and batch the streams."""
    others = [
        write_noise_wav(tmp_path / f"{name}.wav", seconds, seed=seed)
        for name, seconds, seed in (("short", 0.7, 11), ("long", 2.6, 12))
    ]
    expected = {str(audio_wav): reference_ids}
    for wav in others:
        audio, _ = soundfile.read(wav, dtype="float32")
        expected[str(wav)] = transcribe_audio(audio, model_dir=tiny_model_dir, delay_ms=DELAY_MS).token_ids
    result = runner.run(
        PIPELINE, "--model", tiny_model_dir, "--format", "jsonl", *ON_CPU, "--input", audio_wav, *others
    )
    assert result.returncode == 0, result.stderr.decode()
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    done = {event["input"]: event["token_ids"] for event in events if event["type"] == "done"}
    assert done == expected
    assert wait_until_gone(runner.marker) == []


def free_port_block(size: int) -> int:
    """A base port whose next `size` ports were free a moment ago."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size < 65536 and all(_port_free(base + offset) for offset in range(size)):
            return base
    raise AssertionError("no free block of ports")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_two_hosts_on_loopback_match_one(runner, tiny_model_dir, audio_wav, reference_ids, tmp_path):
    # Same file for both "hosts"; the queues between them go over tcp on loopback (hosts default to 127.0.0.1).
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINE.read_text().replace("base_port: 5550", f"base_port: {free_port_block(6)}"))
    common = [pipeline, "--model", tiny_model_dir, *ON_CPU]
    host_b = runner.start(*common, "--stages", HOST_B)
    host_a = runner.start(*common, "--stages", HOST_A, "--format", "jsonl", "--input", audio_wav)
    out_a, err_a = host_a.communicate(timeout=120)
    out_b, err_b = host_b.communicate(timeout=30)
    assert host_a.returncode == 0, err_a
    assert host_b.returncode == 0, err_b
    assert done_ids(out_a.encode()) == reference_ids
    assert out_b == ""  # the host without the sink prints no transcript
    assert wait_until_gone(runner.marker) == []


@pytest.mark.slow
def test_model_problems_are_one_line(runner, tiny_model_dir, tmp_path, audio_wav):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "consolidated.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = [
        (["--model", tmp_path / "missing"], "does not exist"),
        (["--model", corrupt], "consolidated.safetensors"),
        (["--model", tiny_model_dir, "--set", "encoder.device=cuda:3"], "cuda:3"),
    ]
    for args, expected in cases:
        result = runner.run(PIPELINE, "--input", audio_wav, *ON_CPU, *args)
        lines = result.stderr.decode().splitlines()
        assert result.returncode == 1 and len(lines) == 1, lines
        assert lines[0].startswith("voxtral-run: error: ") and expected in lines[0], lines[0]
        assert wait_until_gone(runner.marker) == []


def test_runner_module_has_help():
    result = subprocess.run(["python", "-m", "runner", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--stages" in result.stdout and "pipeline.yaml" in result.stdout


@pytest.mark.slow
def test_an_audio_file_as_pipeline_runs_the_default_pipeline(
    runner, tiny_model_dir, audio_wav, reference_ids, tmp_path
):
    """The whisper habit: `voxtral-run talk.wav` runs pipeline.yaml's chain with its stages placed by
    `device: auto` (the CPU here), writing the format --output's extension names, and --quiet prints nothing."""
    out = tmp_path / "talk.jsonl"
    result = runner.run(audio_wav, "--model", tiny_model_dir, "-o", out, "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert done_ids(out.read_bytes()) == reference_ids
    assert result.stderr.decode() == ""
