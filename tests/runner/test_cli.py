"""The multi-process runner on toy stages: transcripts, backpressure, drops, faults, Ctrl-C and bad input."""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import os
import pty
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile
from rich.console import Console

from tests.runner.conftest import REPO, marked_processes, wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.toy_stages import ToyTranscriber
from voxtral_run.runner.cli import declare_package_main
from voxtral_run.runner.config import load_pipeline
from voxtral_run.runner.sink import TranscriptSink
from voxtral_run.runner.supervisor import EXIT_OK, Supervisor
from voxtral_run.stages.audio.capture import FileSource

EXIT_TIME_S = 5.0


def expected_ids(wav: Path) -> list[int]:
    """What the toy transcriber gives in-process for the file's chunks."""
    toy = ToyTranscriber()
    for chunk in FileSource(wav).chunks():
        toy.push("s", chunk)
    return toy.finish("s")[-1]["token_ids"]


def jsonl_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_error_line(stderr: bytes | str) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    lines = [line for line in text.splitlines() if line.strip() and " ready in " not in line]
    assert len(lines) == 1, text
    assert lines[0].startswith("voxtral-run: error: ")
    return lines[0]


def test_stage_processes_spawned_under_the_console_script_do_not_rerun_it(tmp_path, monkeypatch):
    ran = tmp_path / "ran"
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "voxtral-run")  # as pip's console script: a file without a module spec
    Path(script.__file__).write_text(f"open({str(ran)!r}, 'a').write('x')\n")
    script.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", script)

    def spawn_one() -> None:
        child = multiprocessing.get_context("spawn").Process(target=os.getpid)
        child.start()
        child.join(30)
        assert child.exitcode == 0

    spawn_one()
    assert ran.read_text() == "x"  # the stdlib's default: the child runs the parent's script first
    declare_package_main()
    spawn_one()
    assert ran.read_text() == "x"


def test_jsonl_transcript_equals_in_process(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 1.0)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    result = runner.run(pipeline, "--input", wav, "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    events = jsonl_events(result.stdout.decode())
    assert [event["type"] for event in events] == ["delta"] * len(events[:-1]) + ["done"]
    assert events[-1]["token_ids"] == expected_ids(wav)
    assert wait_until_gone(runner.marker) == []


class Collect:
    """A transcript writer that keeps the events."""

    def __init__(self):
        self.events: list[dict] = []

    def write(self, event: dict) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def test_backpressure_blocks_upstream_without_loss(tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 1.0)
    throttle_ms = 30
    pipeline = load_pipeline(
        write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": throttle_ms}, capacity=1), []
    )
    pipeline.stages["capture"].params["input"] = str(wav)
    collect = Collect()
    supervisor = Supervisor(
        pipeline, local=pipeline.chain(), model_dir=None, sink=TranscriptSink(collect), console=Console(quiet=True)
    )
    assert supervisor.run() == EXIT_OK
    assert collect.events[-1]["token_ids"] == expected_ids(wav)  # nothing lost, order kept
    capture = supervisor.stages["capture"].stats
    assert capture["peak_depth"] <= 1  # the queue never held more than its capacity
    assert supervisor.stages["relay"].stats["peak_depth"] <= 4
    # The file is read far faster than the relay works, so each send waited for the relay to take a message.
    assert capture["metrics"]["send_ms"]["p50"] > throttle_ms / 2
    assert capture["dropped"] == 0


def test_drop_policy_on_live_capture_counts_and_reports(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 1.5)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 200}, capacity=2, policy="drop_oldest")
    result = runner.run(pipeline, "--input", wav, "--realtime", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    [report] = [line for line in result.stderr.decode().splitlines() if "dropped" in line]
    dropped = int(report.split("dropped ")[1].split()[0])
    assert "queue capture -> relay (drop_oldest)" in report and dropped > 0
    ids = jsonl_events(result.stdout.decode())[-1]["token_ids"]
    everything = expected_ids(wav)
    assert len(ids) + dropped == len(everything)
    positions = [everything.index(token_id) for token_id in ids]
    assert positions == sorted(positions)  # what arrived is in order, the rest was dropped


def test_drop_policy_needs_a_live_capture(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.5)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", policy="drop_newest")
    result = runner.run(pipeline, "--input", wav)
    assert result.returncode == 1
    assert "needs a live capture" in one_error_line(result.stderr)


def start_long_run(runner, tmp_path, seconds: float = 10.0, relay: dict | None = None):
    """A run of a file in real time, writing JSONL; returns it once deltas are being written."""
    wav = write_noise_wav(tmp_path / "long.wav", seconds)
    out = tmp_path / "out.jsonl"
    process = runner.start(
        write_toy_pipeline(tmp_path / "p.yaml", relay=relay), "--input", wav, "--realtime", "-o", out, "-f", "jsonl"
    )
    deadline = time.monotonic() + 30
    while not (out.exists() and len(out.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process, out


def stage_pid(marker: str, name: str) -> int:
    for pid in marked_processes(marker):
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"voxtral-run: {name}".encode()):
            return pid
    raise AssertionError(f"no process titled 'voxtral-run: {name}'")


def _stage_pid_if_started(marker: str, name: str) -> int | None:
    try:
        return stage_pid(marker, name)
    except (AssertionError, FileNotFoundError):  # not titled yet, or a process gone while listing
        return None


def test_killed_stage_ends_the_run_naming_it(runner, tmp_path):
    process, _ = start_long_run(runner, tmp_path)
    killed_at = time.monotonic()
    os.kill(stage_pid(runner.marker, "relay"), signal.SIGKILL)
    _, stderr = process.communicate(timeout=EXIT_TIME_S + 5)
    assert time.monotonic() - killed_at < EXIT_TIME_S
    assert process.returncode == 1
    assert "stage 'relay' died (killed by SIGKILL)" in stderr
    assert wait_until_gone(runner.marker) == []


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_poll_waits_without_sleeping_and_the_run_still_ends(runner, tmp_path):
    """The relay, given a message every 80 ms, spins between them instead of sleeping; end of stream and
    shutdown still reach it."""
    process, out = start_long_run(runner, tmp_path, seconds=3.0, relay={"busy_poll": True})
    relay = stage_pid(runner.marker, "relay")
    before, started = cpu_seconds(relay), time.monotonic()
    time.sleep(1.0)
    assert (cpu_seconds(relay) - before) / (time.monotonic() - started) > 0.5  # a sleeping relay uses ~0
    process.communicate(timeout=EXIT_TIME_S + 10)
    assert process.returncode == 0
    assert jsonl_events(out.read_text())[-1]["token_ids"] == expected_ids(tmp_path / "long.wav")
    assert wait_until_gone(runner.marker) == []


def test_busy_poll_spins_only_while_a_stream_is_open(runner, tmp_path):
    """Before any audio arrives the relay sleeps; while 80 ms chunks come in it spins; stdin's end ends the run."""
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"busy_poll": True})
    out = tmp_path / "out.jsonl"
    process = runner.start(pipeline, "--input", "-", "--rate", "16000", "-o", out, "-f", "jsonl", stdin=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while (relay := _stage_pid_if_started(runner.marker, "relay")) is None:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)

    def busy_share(seconds: float, feed: bool) -> float:
        before, started = cpu_seconds(relay), time.monotonic()
        while time.monotonic() - started < seconds:
            if feed:
                process.stdin.buffer.write(np.zeros(1280, dtype=np.int16).tobytes())  # 80 ms of raw PCM
                process.stdin.buffer.flush()
            time.sleep(0.08)
        return (cpu_seconds(relay) - before) / (time.monotonic() - started)

    # No stream yet: once past its start-up, asleep (a spinning relay stays near 1).
    assert any(busy_share(0.5, feed=False) < 0.1 for _ in range(20))
    assert busy_share(1.5, feed=True) > 0.5
    process.communicate(timeout=EXIT_TIME_S + 10)  # closes stdin: the end of the stream
    assert process.returncode == 0
    assert jsonl_events(out.read_text())[-1]["type"] == "done"
    assert wait_until_gone(runner.marker) == []


def test_ctrl_c_stops_and_keeps_the_partial_transcript(runner, tmp_path):
    process, out = start_long_run(runner, tmp_path)
    interrupted_at = time.monotonic()
    os.kill(process.pid, signal.SIGINT)
    process.communicate(timeout=EXIT_TIME_S + 5)
    assert time.monotonic() - interrupted_at < EXIT_TIME_S
    assert process.returncode == 130
    events = jsonl_events(out.read_text())
    assert events[-1]["type"] == "done" and len(events) >= 4
    delta_ids = [token_id for event in events[:-1] for token_id in event["token_ids"]]
    assert events[-1]["token_ids"] == delta_ids
    assert len(delta_ids) < 125  # stopped well before the 10 s (125 chunks) were read
    assert wait_until_gone(runner.marker) == []


def test_stage_error_mid_run_is_one_line(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 1.0)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    result = runner.run(pipeline, "--input", wav, "--set", "detokenize.fail_after=3")
    assert result.returncode == 1
    assert one_error_line(result.stderr) == "voxtral-run: error: stage 'detokenize' failed: toy failure after 3 chunks"
    assert wait_until_gone(runner.marker) == []


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.wav", b"these are not audio samples\n", "not a readable audio file"),
        ("empty.wav", b"", "not a readable audio file"),
    ],
)
def test_bad_audio_file_is_one_line(runner, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", path)
    assert result.returncode == 1
    assert expected in one_error_line(result.stderr) and str(path) in result.stderr.decode()
    assert wait_until_gone(runner.marker) == []


def test_wav_without_frames_is_one_line(runner, tmp_path):
    path = tmp_path / "silent.wav"
    soundfile.write(path, np.zeros((0, 1), dtype=np.float32), 16000)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", path)
    assert result.returncode == 1
    assert "no audio frames" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "capture.chunkms=40"], "stage 'capture': unknown setting 'chunkms'"),
        (["--set", "relay.thrttle_ms=1"], "Passthrough() takes no arguments"),  # a stage parameter, not a runner key
        (["--stages", "relay,nowhere"], "--stages: unknown stage 'nowhere'"),
        (["--set", "relay.device=cuda:0:1"], "stages.relay.device: String should match pattern"),
        (["--format", "docx"], "--format: unknown format 'docx'"),
    ],
)
def test_bad_command_line_is_one_line(runner, tmp_path, args, expected):
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, *args)
    assert result.returncode == 1
    assert expected in one_error_line(result.stderr)
    assert wait_until_gone(runner.marker) == []


def test_yaml_errors_are_one_line(runner, tmp_path):
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    text = pipeline.read_text()
    for broken, expected in [
        (text.replace("capacity: 4", "capacity: 0", 1), "queues[0].capacity"),
        (text + "colour: blue\n", "colour: unknown key"),
        (text.replace("stages:\n", "stages:\n  transcoder: {}\n", 1), "stages.transcoder: unknown stage"),
    ]:
        pipeline.write_text(broken)
        result = runner.run(pipeline, "--input", "x.wav")
        assert result.returncode == 1
        assert expected in one_error_line(result.stderr)


def test_profile_writes_a_table_and_a_chrome_trace(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.8)  # 10 chunks
    trace = tmp_path / "trace.json"
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 20})
    result = runner.run(pipeline, "--input", wav, "--profile", trace)
    assert result.returncode == 0, result.stderr
    table = {line.split()[0]: line.split() for line in result.stderr.decode().splitlines() if line[:1].isalpha()}
    assert table["capture"][1] == "10" and table["relay"][1] == "11"  # items: chunks, plus end of stream after
    assert 15 < float(table["relay"][4]) < 200  # service p50 (ms) shows the 20 ms throttle
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {event["args"]["name"]: event["tid"] for event in events if event["name"] == "thread_name"}
    assert list(tracks) == ["capture", "relay", "detokenize"]
    # A slice per step, which takes every message waiting: the 11 messages in fewer steps, each step's told.
    slices = [event for event in events if event["ph"] == "X" and event["name"] == "relay"]
    assert sum(slice_["args"]["items"] for slice_ in slices) == 11 and str(len(slices)) == table["relay"][-2]
    assert all(slice_["tid"] == tracks["relay"] for slice_ in slices)
    # Each chunk's capture time links its slices across the stages (a flow per frame); a step's outputs carry its
    # stream's latest capture time, so a frame batched with a later one of its stream goes no further than there.
    flows = {}
    for event in events:
        if event["ph"] in "st":
            flows.setdefault(event["id"], set()).add(event["tid"])
    assert sum(tids >= {tracks["capture"], tracks["relay"]} for tids in flows.values()) == 10
    assert any(tids == set(tracks.values()) for tids in flows.values())


def test_version(runner):
    result = runner.run("--version")
    assert result.returncode == 0
    assert result.stdout.decode() == f"voxtral-run {importlib.metadata.version('voxtral-run')}\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["NOPIPELINE"], "missing PIPELINE and --input: try voxtral-run talk.wav"),
        ([], "no audio input: give an audio file, --input FILE"),
        (["NOPIPELINE", "talk.wav", "-i", "b.wav"], "talk.wav is not a pipeline YAML (.yaml or .yml) and --input is"),
        (["--input", "-", "--rate", "1"], "--rate: rate 1 is outside 8000..384000"),
        (["--input", "-", "--rate", "16000", "--channels", "0"], "--channels: channels 0 is outside 1..64"),
        (["--input", "-", "--rate", "16000", "--realtime"], "--realtime paces audio files"),
        (["--input", "WAV", "--delay-ms", "5"], "--delay-ms: 5 is outside 80..2400 ms"),
        (["--input", "missing.wav"], "missing.wav: no such file"),
        (["--input", "WAV", "-o", "/nonexistent/talk.srt"], "--output /nonexistent/talk.srt: the folder /nonexistent"),
        (["--input", "WAV", "-o", "TMP"], "is a directory; give a file name"),
        (["--input", "WAV", "-o", "talk.srt", "--format", "docx"], "--format: unknown format 'docx'"),
    ],
)
def test_options_are_checked_before_any_stage_starts(runner, tmp_path, args, expected):
    """Each bad option is one line naming the option, found before a stage process is started."""
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)
    pipeline = [] if args[:1] == ["NOPIPELINE"] else [write_toy_pipeline(tmp_path / "p.yaml")]
    args = [{"WAV": str(wav), "TMP": str(tmp_path)}.get(arg, arg) for arg in args if arg != "NOPIPELINE"]
    result = runner.run(*pipeline, *args)
    assert result.returncode == 1
    assert expected in one_error_line(result.stderr)
    assert "starting stages" not in result.stderr.decode() and " ready in " not in result.stderr.decode()


@pytest.mark.parametrize(
    ("name", "format", "check"),
    [
        ("talk.srt", None, lambda text: text.startswith("1\n00:00:00,000 --> ")),
        ("talk.vtt", None, lambda text: text.startswith("WEBVTT")),
        ("talk.jsonl", None, lambda text: jsonl_events(text)[-1]["type"] == "done"),
        ("talk.txt", None, lambda text: text.startswith("t") and "-->" not in text),
        ("talk.srt", "text", lambda text: "-->" not in text and text.strip().startswith("t")),
    ],
)
def test_the_format_follows_the_output_extension_unless_given(runner, tmp_path, name, format, check):
    wav = write_noise_wav(tmp_path / "a.wav", 0.3)
    out = tmp_path / name
    extra = ["--format", format] if format else []
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, "-o", out, *extra)
    assert result.returncode == 0, result.stderr.decode()
    assert check(out.read_text())
    assert not out.with_name(name + ".partial").exists()


@pytest.mark.parametrize("name", ["talk.srt", "talk.txt", "talk.jsonl"])
def test_a_failed_run_leaves_no_finished_looking_transcript(runner, tmp_path, name):
    """Text written at close stays under FILE.partial; JSONL has the deltas so far and no done event."""
    wav = write_noise_wav(tmp_path / "a.wav", 1.0)
    out = tmp_path / name
    args = ["--input", wav, "-o", out, "--set", "detokenize.fail_after=6"]
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), *args)
    assert result.returncode == 1
    partial = out.with_name(name + ".partial")
    if name.endswith(".jsonl"):
        events = jsonl_events(out.read_text())
        assert 1 <= len(events) <= 6 and {event["type"] for event in events} == {"delta"}
        assert not partial.exists()
    else:
        assert not out.exists()
        # The deltas the sink took before the failure stopped the run: some, never past the sixth.
        words = [word for word in partial.read_text().split() if word.startswith("t")]
        assert 1 <= len(words) <= 6 and words == [f"t{token_id % 1000}" for token_id in expected_ids(wav)][: len(words)]
        assert f"the transcript up to the failure is in {partial}" in result.stderr.decode()


def test_quiet_prints_no_table(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.3)
    loud = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav)
    quiet = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, "--quiet")
    assert loud.returncode == quiet.returncode == 0
    assert "bottleneck" in loud.stderr.decode() and quiet.stderr.decode() == ""
    assert quiet.stdout == loud.stdout


def run_on_a_terminal(runner, *args: str) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal and stdout on a pipe; exit status, stdout, what the terminal showed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", *map(str, args)],
        cwd=REPO,
        env=runner.env | {"COLUMNS": "160"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # the terminal closed: every writer exited
            break
        if not data:
            break
        shown += data
    stdout = process.communicate(timeout=60)[0].decode()
    os.close(controller)
    return process.returncode, stdout, shown.decode(errors="replace")


def test_a_file_shows_a_progress_bar_when_stdout_is_not_the_live_text(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 2.0)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 10})
    status, stdout, shown = run_on_a_terminal(runner, pipeline, "--input", wav)
    assert status == 0
    assert "s of audio" in shown and "x real time" in shown and "ETA" in shown
    assert stdout.split() == [f"t{token_id % 1000}" for token_id in expected_ids(wav)]
    status, _, quiet = run_on_a_terminal(runner, pipeline, "--input", wav, "--quiet")
    assert status == 0 and "s of audio" not in quiet
