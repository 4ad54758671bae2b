"""NVIDIA MPS for stage processes sharing a GPU: when a private daemon starts, that the stage processes inherit its
folders, that it quits after them, and the one-line errors. A fake `nvidia-cuda-mps-control` on PATH records each
call (its arguments, the pipe folder it was given, what it read), as the real one would be driven."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tests.conftest import speechlike_audio
from tests.runner.conftest import TOY, write_noise_wav, write_toy_pipeline
from tests.runner.serve.test_pipeline_hub import transcribe
from tests.runner.test_cli import jsonl_events, one_error_line
from voxtral_run.runner import mps
from voxtral_run.runner.config import Pipeline, load_pipeline
from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.mps import LOG_VARIABLE, MPS_CONTROL, PIPE_VARIABLE, shared_gpus, start_mps
from voxtral_run.runner.serve.pipeline_hub import PipelineHub
from voxtral_run.runner.supervisor import Reporting

RECORD_VARIABLE = "FAKE_MPS_RECORD"
FAKE_CONTROL = f"""#!{sys.executable}
import json, os, sys
pipe = os.environ.get("{PIPE_VARIABLE}")
entry = {{"args": sys.argv[1:], "pipe": pipe, "pipe_exists": bool(pipe) and os.path.isdir(pipe)}}
if not sys.argv[1:]:
    entry["stdin"] = sys.stdin.read()
with open(os.environ["{RECORD_VARIABLE}"], "a") as record:
    record.write(json.dumps(entry) + "\\n")
if os.environ.get("FAKE_MPS_FAIL") in sys.argv[1:] + ["quit"] * (not sys.argv[1:]):
    print("An instance of this daemon is already running")
    sys.exit(1)
"""


def install_fake_control(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake control program alone on PATH (NVIDIA's own places looked at none); its record file."""
    folder.mkdir()
    program = folder / MPS_CONTROL
    program.write_text(FAKE_CONTROL)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    record = folder / "record.jsonl"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(RECORD_VARIABLE, str(record))
    monkeypatch.setattr(mps, "MPS_CONTROL_PLACES", ())
    monkeypatch.delenv(PIPE_VARIABLE, raising=False)
    monkeypatch.delenv(LOG_VARIABLE, raising=False)
    return record


def one_stage_run_with_fake_control(runner, tmp_path: Path, name: str, stage: dict) -> tuple[Path, Path]:
    """A pipeline file of the capture and one stage, and the runner's environment pointed at the fake control
    program (none of the test process's MPS variables); the file and the program's record."""
    bin_folder = tmp_path / "bin"
    with pytest.MonkeyPatch.context() as patch:  # writes the program; the runner gets its own environment
        record = install_fake_control(bin_folder, patch)
    queues = [{"from": "capture", "to": name}, {"from": name, "to": "output"}]
    data = {"stages": {"capture": {}, name: stage}, "queues": [queue | {"capacity": 4} for queue in queues]}
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    runner.env = {key: value for key, value in runner.env.items() if key != PIPE_VARIABLE} | {
        "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        RECORD_VARIABLE: str(record),
    }
    return pipeline, record


def calls(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def placed_pipeline(encoder: str, decoder: str) -> Pipeline:
    """The default pipeline with the model stages where given (as `place_local_stages` leaves them)."""
    pipeline = load_pipeline(None)
    for name, stage in pipeline.stages.items():
        stage.device = {"encoder": encoder, "decoder": decoder}.get(name, "cpu")
    return pipeline


def test_shared_gpus_are_those_two_local_stages_compute_on() -> None:
    local = placed_pipeline("cuda:0", "cuda").chain()
    assert shared_gpus([placed_pipeline("cuda:0", "cuda")], local) == {"cuda:0": ["encoder", "decoder"]}
    assert shared_gpus([placed_pipeline("cuda:0", "cuda:1")], local) == {}
    assert shared_gpus([placed_pipeline("cuda:0", "cuda:0")], ["capture", "encoder"]) == {}
    assert shared_gpus([placed_pipeline("cpu", "cpu")], local) == {}


def test_auto_starts_a_private_daemon_for_a_shared_gpu_and_quits_it(tmp_path, monkeypatch) -> None:
    record = install_fake_control(tmp_path / "bin", monkeypatch)
    console = Console(file=(said := tmp_path / "said.txt").open("w"), width=200)
    pipeline = placed_pipeline("cuda:0", "cuda:0")

    daemon = start_mps("auto", [pipeline], pipeline.chain(), console)

    assert daemon is not None
    pipe = os.environ[PIPE_VARIABLE]
    assert Path(pipe).is_dir() and Path(os.environ[LOG_VARIABLE]).is_dir() and Path(pipe).parent == daemon.folder
    assert calls(record) == [{"args": ["-d"], "pipe": pipe, "pipe_exists": True}]
    daemon.close(console)
    assert calls(record)[1] == {"args": [], "pipe": pipe, "pipe_exists": True, "stdin": "quit\n"}
    assert PIPE_VARIABLE not in os.environ and LOG_VARIABLE not in os.environ
    assert not daemon.folder.exists()
    console.file.close()
    assert "NVIDIA MPS on (encoder, decoder on cuda:0)" in said.read_text()


@pytest.mark.parametrize(
    ("mode", "encoder", "operator_runs_one"),
    [("auto", "cuda:1", False), ("auto", "cpu", False), ("off", "cuda:0", False), ("on", "cuda:0", True)],
)
def test_no_daemon_without_a_shared_gpu_when_off_or_when_the_operator_runs_one(
    mode, encoder, operator_runs_one, tmp_path, monkeypatch
) -> None:
    record = install_fake_control(tmp_path / "bin", monkeypatch)
    if operator_runs_one:
        monkeypatch.setenv(PIPE_VARIABLE, str(tmp_path))
    pipeline = placed_pipeline(encoder, "cuda:0")
    assert start_mps(mode, [pipeline], pipeline.chain(), Console(file=open(os.devnull, "w"))) is None
    assert calls(record) == []


def test_without_the_control_program_auto_goes_on_and_on_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "MPS_CONTROL_PLACES", ())
    monkeypatch.delenv(PIPE_VARIABLE, raising=False)
    pipeline = placed_pipeline("cuda:0", "cuda:0")
    console = Console(file=open(os.devnull, "w"))
    assert start_mps("auto", [pipeline], pipeline.chain(), console) is None
    with pytest.raises(RunnerError, match=f"mps: on, but {MPS_CONTROL} is not installed"):
        start_mps("on", [pipeline], pipeline.chain(), console)


def test_a_daemon_that_will_not_start_is_one_line_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    install_fake_control(tmp_path / "bin", monkeypatch)
    monkeypatch.setenv("FAKE_MPS_FAIL", "-d")
    pipeline = placed_pipeline("cuda:0", "cuda:0")
    with pytest.raises(RunnerError, match="did not start: An instance of this daemon is already running$"):
        start_mps("auto", [pipeline], pipeline.chain(), Console(file=open(os.devnull, "w")))
    assert PIPE_VARIABLE not in os.environ
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"{mps.FOLDER_PREFIX}*/pipe"))


def test_a_daemon_that_will_not_quit_is_a_warning(tmp_path, monkeypatch) -> None:
    install_fake_control(tmp_path / "bin", monkeypatch)
    monkeypatch.setenv("FAKE_MPS_FAIL", "quit")
    console = Console(file=(said := tmp_path / "said.txt").open("w"), width=300)
    pipeline = placed_pipeline("cuda:0", "cuda:0")
    daemon = start_mps("auto", [pipeline], pipeline.chain(), console)
    daemon.close(console)
    console.file.close()
    assert "warning: mps: " in said.read_text() and "did not quit: An instance" in said.read_text()
    assert PIPE_VARIABLE not in os.environ and not daemon.folder.exists()


def test_a_run_with_mps_on_gives_its_stage_processes_the_daemon_and_quits_it_after(runner, tmp_path) -> None:
    """Through the CLI: the stage processes see the private pipe folder, which the daemon was started with and
    quit with after the run; --set mps=on reaches the top-level key."""
    detokenize = {"impl": f"{TOY}:EnvironmentTranscriber", "params": {"variable": PIPE_VARIABLE}}
    pipeline, record = one_stage_run_with_fake_control(runner, tmp_path, "detokenize", detokenize)
    wav = write_noise_wav(tmp_path / "a.wav", 0.4)

    result = runner.run(pipeline, "--input", wav, "--format", "jsonl", "--set", "mps=on")

    assert result.returncode == 0, result.stderr
    started, quit_ = calls(record)
    assert started["args"] == ["-d"] and quit_["stdin"] == "quit\n" and started["pipe"] == quit_["pipe"]
    deltas = [event for event in jsonl_events(result.stdout.decode()) if event["type"] == "delta"]
    assert deltas and {delta["text"] for delta in deltas} == {started["pipe"]}
    assert not Path(started["pipe"]).exists()
    assert "NVIDIA MPS on" in result.stderr.decode()


def test_a_bad_mps_setting_is_one_line(runner, tmp_path) -> None:
    result = runner.run("--input", write_noise_wav(tmp_path / "a.wav", 0.2), "--set", "mps=sometimes")
    assert result.returncode == 1
    assert "mps: Input should be 'auto', 'on' or 'off'" in one_error_line(result.stderr)


def test_a_server_s_stage_processes_run_under_its_daemon_for_the_hub_s_life(tmp_path, monkeypatch, tiny_model_dir):
    """PipelineHub (`voxtral-run serve`): mps on starts the daemon before the stages, whose processes inherit it,
    and quits it once they are stopped."""
    record = install_fake_control(tmp_path / "bin", monkeypatch)
    pipeline = load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml"))
    pipeline.mps = "on"
    pipeline.stages["detokenize"].impl = f"{TOY}:EnvironmentTranscriber"
    pipeline.stages["detokenize"].params = {"variable": PIPE_VARIABLE}
    hub = PipelineHub(pipeline, model_dir=tiny_model_dir, reporting=Reporting(quiet=True))
    try:
        [started] = calls(record)
        events = asyncio.run(transcribe(hub, speechlike_audio(0.3, seed=1)))
    finally:
        hub.close()
    assert {event.text for event in events[:-1]} == {started["pipe"]}
    assert calls(record)[1:] == [{"args": [], "pipe": started["pipe"], "pipe_exists": True, "stdin": "quit\n"}]
    assert PIPE_VARIABLE not in os.environ and not Path(started["pipe"]).exists()


def test_mps_on_with_ray_is_one_line(runner, tmp_path) -> None:
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)
    result = runner.run("--input", wav, "--ray", "--set", "mps=on")
    assert result.returncode == 1
    assert "mps: on starts NVIDIA MPS for the stages spawned here; with --ray" in one_error_line(result.stderr)


def test_a_stage_s_cuda_failure_under_the_run_s_daemon_says_how_to_run_without_it(runner, tmp_path) -> None:
    pipeline, record = one_stage_run_with_fake_control(runner, tmp_path, "relay", {"impl": f"{TOY}:CudaUnavailable"})
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)

    failed = runner.run(pipeline, "--input", wav, "--set", "mps=on", "--quiet")
    assert failed.returncode == 1
    line = one_error_line(failed.stderr)
    assert "CUDA error: all CUDA-capable devices are busy" in line
    assert line.endswith("(under the NVIDIA MPS this run started: mps: off runs without it)")
    assert [call["args"] for call in calls(record)] == [["-d"], []]  # started, and quit after the failure


def test_a_server_whose_stage_cannot_start_under_its_daemon_says_how_to_run_without_it(
    tmp_path, monkeypatch, tiny_model_dir
) -> None:
    record = install_fake_control(tmp_path / "bin", monkeypatch)
    pipeline = load_pipeline(write_toy_pipeline(tmp_path / "toy.yaml"))
    pipeline.mps = "on"
    pipeline.stages["relay"].impl = f"{TOY}:CudaUnavailable"
    with pytest.raises(RunnerError, match=r"busy or unavailable.*\(under the NVIDIA MPS this run started: mps: off"):
        PipelineHub(pipeline, model_dir=tiny_model_dir, reporting=Reporting(quiet=True))
    assert [call["args"] for call in calls(record)] == [["-d"], []]
    assert PIPE_VARIABLE not in os.environ
