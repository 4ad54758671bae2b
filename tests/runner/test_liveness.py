"""Hangs and deaths: a stopped stage fails the run naming it within the heartbeat timeout, stages die with
their runner, and the run folder of a killed runner is removed by the next run."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import yaml

from tests.runner.conftest import marked_processes, wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.test_cli import one_error_line, stage_pid, start_long_run
from voxtral_run.runner.supervisor import OWNER_FILE, RUN_DIR_PREFIX

TIMEOUT_S = 1.5


def with_timeout(path: Path) -> Path:
    data = yaml.safe_load(path.read_text()) | {"heartbeat_timeout_s": TIMEOUT_S}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_with_timeout(runner, tmp_path: Path):
    """A 10 s file in real time through the toy pipeline with a short heartbeat timeout, once text flows."""
    wav = write_noise_wav(tmp_path / "long.wav", 10.0)
    out = tmp_path / "out.jsonl"
    pipeline = with_timeout(write_toy_pipeline(tmp_path / "p.yaml"))
    process = runner.start(pipeline, "--input", wav, "--realtime", "-o", out)
    deadline = time.monotonic() + 30
    while not (out.exists() and len(out.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process


def test_a_stopped_stage_fails_the_run_within_the_timeout_naming_it(runner, tmp_path):
    process = start_with_timeout(runner, tmp_path)
    relay = stage_pid(runner.marker, "relay")
    os.kill(relay, signal.SIGSTOP)
    stopped_at = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert time.monotonic() - stopped_at < TIMEOUT_S + 3  # detection within the timeout, then the shutdown
    assert one_error_line(stderr) == (
        f"voxtral-run: error: stage 'relay' stopped responding: no heartbeat for {TIMEOUT_S:g} s (heartbeat_timeout_s)"
    )
    assert wait_until_gone(runner.marker) == []


def run_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"))


def test_stages_die_with_a_killed_runner_and_the_next_run_removes_its_folder(runner, tmp_path):
    before = run_dirs()
    process, _ = start_long_run(runner, tmp_path)
    [run_dir] = [path for path in run_dirs() - before if (path / OWNER_FILE).read_text().split()[0] == str(process.pid)]
    process.kill()
    process.communicate()
    assert wait_until_gone(runner.marker) == []  # every stage went with it (parent-death signal)
    assert run_dir.exists()
    wav = write_noise_wav(tmp_path / "short.wav", 0.2)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav)
    assert result.returncode == 0
    assert not run_dir.exists()
    assert not marked_processes(runner.marker)
