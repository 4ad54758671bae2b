"""Every number a user or a pipeline gives is bounded with a one-line error; output write errors are one line and
never leave half a record; what the run reads and how far behind it falls are told as they are."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys

import pytest
import yaml

from tests.runner.conftest import REPO, TOY, wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.test_cli import expected_ids, jsonl_events, one_error_line
from tests.runner.toy_stages import LossyLiveSource


@pytest.mark.parametrize(
    ("args", "yaml_edit", "expected"),
    [
        ([], ("capacity: 4", f"capacity: {10**9}"), "queues[0].capacity: Input should be less than or equal to 4096"),
        ([], ("capacity: 4", f"capacity: {2**32}"), "queues[0].capacity: Input should be less than or equal to 4096"),
        (["--set", "capture.chunk_ms=5"], None, "stages.capture.params.chunk_ms: 5 is outside 10..1000 ms"),
        (["--set", "capture.chunk_ms=100000"], None, "stages.capture.params.chunk_ms: 100000 is outside 10..1000 ms"),
        (["--set", "relay.throttle_ms=1e9"], None, "stages.relay.throttle_ms: Input should be less than or equal"),
        (["--set", "relay.gather_ms=-1"], None, "stages.relay.gather_ms: Input should be greater than or equal to 0"),
        (["--set", "relay.gather_ms=5000"], None, "stages.relay.gather_ms: Input should be less than or equal to 1000"),
        ([], ("stages:", "heartbeat_timeout_s: 0\nstages:"), "heartbeat_timeout_s: Input should be greater than"),
        ([], ("stages:", "base_port: 65534\nstages:"), "base_port: 65534 + 2 (queue 2) is past port 65535"),
        (["--rate", "1", "--input", "-"], None, "--rate: rate 1 is outside 8000..384000"),
        (["--channels", "65", "--input", "-", "--rate", "16000"], None, "--channels: channels 65 is outside 1..64"),
        (["--delay-ms", "100000"], None, "--delay-ms: 100000 is outside 80..2400 ms"),
        (["--stats-every", "0.001"], None, "--stats-every: give at least 0.1 seconds"),
    ],
)
def test_every_bound_is_one_line_naming_the_option(runner, tmp_path, args, yaml_edit, expected):
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    if yaml_edit is not None:
        pipeline.write_text(pipeline.read_text().replace(*yaml_edit, 1))
    inputs = [] if "--input" in args else ["--input", write_noise_wav(tmp_path / "a.wav", 0.2)]
    result = runner.run(pipeline, *inputs, *args)
    assert result.returncode == 1
    assert expected in one_error_line(result.stderr)
    assert wait_until_gone(runner.marker) == []


def test_a_full_disk_is_one_line_and_a_failure(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.5)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, "-o", "/dev/full", "-f", "jsonl")
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line == "voxtral-run: error: /dev/full: cannot write the transcript (No space left on device)"
    assert wait_until_gone(runner.marker) == []


def test_a_write_cut_short_leaves_only_whole_records(runner, tmp_path):
    """A file size limit stops a JSONL record part way: the file is cut back to its last whole record."""
    wav = write_noise_wav(tmp_path / "a.wav", 1.0)
    out = tmp_path / "out.jsonl"
    limit = 500  # bytes: a few records, the next one cut inside

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "runner", write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, "-o", out],
        cwd=REPO,
        env=runner.env,
        capture_output=True,
        timeout=60,
        preexec_fn=limit_file_size,
    )
    assert result.returncode == 1
    assert one_error_line(result.stderr) == f"voxtral-run: error: {out}: cannot write the transcript (File too large)"
    text = out.read_text()
    assert 0 < len(text) <= limit and text.endswith("\n")
    assert all(json.loads(line)["type"] == "delta" for line in text.splitlines())
    assert wait_until_gone(runner.marker) == []


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_a_wav_header_claiming_less_is_read_as_it_says_with_a_warning(runner, tmp_path, via):
    """As a file or on stdin, once: a file's warning comes before the run starts, stdin's from the capture."""
    whole = write_noise_wav(tmp_path / "whole.wav", 1.0)
    half = write_noise_wav(tmp_path / "half.wav", 0.5)
    data = whole.read_bytes()
    at = data.index(b"data")
    declared = int.from_bytes(half.read_bytes()[at + 4 : at + 8], "little")
    lying = tmp_path / "lying.wav"
    lying.write_bytes(data[: at + 4] + struct.pack("<I", declared) + data[at + 8 :])
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    unread = "16000 bytes after the audio the WAV header declares are not read (the header's data size is smaller"
    if via == "file":
        result = runner.run(pipeline, "--input", lying, "-f", "jsonl")
        warning = f"voxtral-run: warning: {lying}: {unread} than the file)"
    else:
        result = runner.run(pipeline, "--input", "-", "-f", "jsonl", input_bytes=lying.read_bytes())
        warning = f"voxtral-run: warning: capture: stdin: {unread} than the input)"
    assert result.returncode == 0, result.stderr
    assert jsonl_events(result.stdout.decode())[-1]["token_ids"] == expected_ids(half)
    stderr = result.stderr.decode()
    assert f"{warning}\n" in stderr and stderr.count(unread) == 1


def test_drops_on_a_live_queue_keep_the_real_audio_times(runner, tmp_path):
    """Each delta's times are those of its chunk in the file, although the queue dropped the chunks between."""
    wav = write_noise_wav(tmp_path / "a.wav", 1.5)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 200}, capacity=2, policy="drop_oldest")
    result = runner.run(pipeline, "--input", wav, "--realtime", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    everything = expected_ids(wav)
    deltas = [event for event in jsonl_events(result.stdout.decode()) if event["type"] == "delta"]
    assert len(deltas) < len(everything)  # some were dropped
    for delta in deltas:
        index = everything.index(delta["token_ids"][0])
        assert delta["start_s"] == pytest.approx(index * 0.08) and delta["end_s"] == pytest.approx((index + 1) * 0.08)


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_audio_a_live_source_lost_keeps_the_real_audio_times(runner, tmp_path, policy):
    """Chunks the source itself lost (a microphone's full queue) move later text as queue drops do, alone or with
    drops on the queue (a slow relay behind a drop_oldest queue)."""
    wav = write_noise_wav(tmp_path / "a.wav", 1.5)
    relay = {"throttle_ms": 200} if policy == "drop_oldest" else None
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay=relay, capacity=2, policy=policy)
    data = yaml.safe_load(pipeline.read_text())
    data["stages"]["capture"]["impl"] = f"{TOY}:LossyLiveSource"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.run(pipeline, "--input", wav, "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    everything = expected_ids(wav)
    kept = [token_id for index, token_id in enumerate(everything) if index not in LossyLiveSource.LOST]
    deltas = [event for event in jsonl_events(result.stdout.decode()) if event["type"] == "delta"]
    if policy == "block":
        assert [delta["token_ids"][0] for delta in deltas] == kept
    else:
        assert len(deltas) < len(kept)  # the queue dropped some as well
    for delta in deltas:
        index = everything.index(delta["token_ids"][0])
        assert delta["start_s"] == pytest.approx(index * 0.08) and delta["end_s"] == pytest.approx((index + 1) * 0.08)


def test_a_live_capture_that_falls_behind_says_so(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 1.5)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 200}, capacity=1)
    result = runner.run(pipeline, "--input", wav, "--realtime", "--stats-json", tmp_path / "stats.json")
    assert result.returncode == 0
    stderr = result.stderr.decode()
    assert "voxtral-run: warning: capture: the capture is " in stderr and " s behind real time" in stderr
    assert "voxtral-run: the capture fell behind real time by up to" in stderr
    capture = json.loads((tmp_path / "stats.json").read_text())["stages"]["capture"]
    assert capture["late_chunks"] > 0 and capture["max_lag_s"] > 1
