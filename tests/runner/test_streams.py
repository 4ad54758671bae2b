"""Many streams in one run, on toy stages: several files or a folder, each its own stream and transcript, fed at
once; a stream's failure fails that stream only; a thousand streams leave nothing behind in any stage or queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.runner.conftest import TOY, wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.test_cli import expected_ids, jsonl_events, one_error_line
from voxtral_run.runner.edges import ENDED_STREAMS_REMEMBERED
from voxtral_run.stages.audio.capture import MAX_STREAMS

TOY_STAGES = ("capture", "relay", "detokenize")


def toy_text(wav: Path) -> str:
    """The toy transcriber's text for a file."""
    return " ".join(f"t{token_id % 1000}" for token_id in expected_ids(wav))


def write_inputs(folder: Path, seconds: list[float]) -> list[Path]:
    """Files a.wav, b.wav, ... of these lengths in a new folder."""
    folder.mkdir()
    names = "abcdefgh"[: len(seconds)]
    return [
        write_noise_wav(folder / f"{name}.wav", length, seed=ord(name))
        for name, length in zip(names, seconds, strict=True)
    ]


def labelled_lines(stdout: bytes) -> dict[str, str]:
    """The text transcript of several inputs: input -> its text."""
    lines = [line.partition(": ") for line in stdout.decode().splitlines()]
    return {name: text for name, _, text in lines}


def test_several_files_give_each_its_own_transcript(runner, tmp_path):
    """--input with more files after it: each file's text on its own line, as its single run gives it."""
    wavs = write_inputs(tmp_path / "in", [0.5, 1.2, 0.3])
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    result = runner.run(pipeline, "--input", *wavs, "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert labelled_lines(result.stdout) == {str(wav): toy_text(wav) for wav in wavs}
    assert result.stderr.decode() == ""
    assert wait_until_gone(runner.marker) == []


def test_a_folder_writes_a_transcript_per_file_and_jsonl_names_each_input(runner, tmp_path):
    folder = tmp_path / "in"
    wavs = write_inputs(folder, [0.4, 0.9])
    (folder / "notes.txt").write_text("not audio: left out")
    out = tmp_path / "out"
    out.mkdir()
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    result = runner.run(pipeline, "--input", folder, "-o", out, "-f", "jsonl", "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert sorted(path.name for path in out.iterdir()) == ["a.jsonl", "b.jsonl"]
    for wav in wavs:
        events = jsonl_events((out / f"{wav.stem}.jsonl").read_text())
        assert {event["input"] for event in events} == {str(wav)}
        assert events[-1]["type"] == "done" and events[-1]["token_ids"] == expected_ids(wav)
    assert labelled_lines(result.stdout) == {str(wav): toy_text(wav) for wav in wavs}  # no progress bar: text too
    # Without --output, JSONL on stdout interleaves the streams, each event naming its input.
    result = runner.run(pipeline, "--input", folder, "-f", "jsonl", "--quiet")
    events = jsonl_events(result.stdout.decode())
    for wav in wavs:
        own = [event for event in events if event["input"] == str(wav)]
        assert own[-1]["type"] == "done" and own[-1]["token_ids"] == expected_ids(wav)
    assert wait_until_gone(runner.marker) == []


@pytest.mark.parametrize("streams", [None, 1])
def test_files_are_fed_at_once_each_paced_on_its_own(runner, tmp_path, streams):
    """--realtime over three 1.2 s files: all at once, as long as one file; --streams 1: one after the other."""
    wavs = write_inputs(tmp_path / "in", [1.2, 1.2, 1.2])
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    stats = tmp_path / "stats.json"
    extra = ["--streams", str(streams)] if streams else []
    result = runner.run(pipeline, "--input", *wavs, "--realtime", "--stats-json", stats, *extra)
    assert result.returncode == 0, result.stderr.decode()
    assert labelled_lines(result.stdout) == {str(wav): toy_text(wav) for wav in wavs}
    wall_s = json.loads(stats.read_text())["wall_s"]
    assert (1.1 < wall_s < 2.4) if streams is None else (3.5 < wall_s < 5.5), wall_s
    assert wait_until_gone(runner.marker) == []


def test_a_failed_stream_fails_alone_and_the_run_at_its_end(runner, tmp_path):
    """The toy transcriber fails streams longer than 8 chunks: the long file's transcript stays partial with one
    line naming it, the others are whole, and the run exits non-zero once they are done."""
    short, long, other = write_inputs(tmp_path / "in", [0.4, 1.2, 0.6])
    out = tmp_path / "out"
    out.mkdir()
    pipeline = write_toy_pipeline(tmp_path / "p.yaml")
    result = runner.run(
        pipeline, "--input", tmp_path / "in", "-o", out, "-f", "srt", "--set", "detokenize.fail_after=8"
    )
    assert result.returncode == 1
    partial = out / "b.srt.partial"
    errors = [line for line in result.stderr.decode().splitlines() if "error" in line]
    assert errors == [
        f"voxtral-run: error: {long}: stage 'detokenize' failed: toy failure after 8 chunks "
        f"(the transcript up to the failure is in {partial})"
    ]
    assert sorted(path.name for path in out.iterdir()) == ["a.srt", "b.srt.partial", "c.srt"]
    for wav in (short, other):
        cues = (out / f"{wav.stem}.srt").read_text()
        assert " ".join(line for line in cues.splitlines() if line.startswith("t")) == toy_text(wav)
    assert "bottleneck" in result.stderr.decode()  # the run went to its end: the table is printed
    assert wait_until_gone(runner.marker) == []


def test_a_file_that_fails_while_read_fails_its_stream(runner, tmp_path):
    """A file that cannot be read when its stream starts (it changed after the checks): one line naming it."""
    # The first two files last several throttled relay steps, so the third opens (after one of them ended) well
    # after their first text has come and the file has changed; with short ones the race could go either way.
    wavs = write_inputs(tmp_path / "in", [2.0, 2.0, 0.4])
    data = yaml.safe_load(write_toy_pipeline(tmp_path / "p.yaml").read_text())
    data["stages"]["relay"]["throttle_ms"] = 300
    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    process = runner.start(pipeline, "--input", *wavs, "--streams", "2", "-f", "jsonl")
    first = process.stdout.readline()  # text flows: checked and started, and the third file is not open yet
    wavs[2].write_bytes(b"no longer audio")
    stdout, stderr = process.communicate(timeout=60)
    stdout = first + stdout
    assert process.returncode == 1
    [error] = [line for line in stderr.splitlines() if "error" in line]
    assert error.startswith(f"voxtral-run: error: {wavs[2]}: stage 'capture' failed: {wavs[2]}: not a readable")
    done = {event["input"]: event["token_ids"] for event in jsonl_events(stdout) if event["type"] == "done"}
    assert done == {str(wav): expected_ids(wav) for wav in wavs[:2]}


def test_streams_a_stage_holds_waiting_for_room_get_their_steps(runner, tmp_path):
    """A relay that forwards one stream at a time and makes room for the next only in its next call: it is called
    again when a stream leaves, so every stream gets through although all their input arrived long before."""
    wavs = write_inputs(tmp_path / "in", [0.5, 0.3, 0.6])
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", capacity=64)
    pipeline.write_text(pipeline.read_text().replace("toy_stages:Passthrough", "toy_stages:OneAtATime"))
    result = runner.run(pipeline, "--input", *wavs, "--quiet")
    assert result.returncode == 0, result.stderr.decode()
    assert labelled_lines(result.stdout) == {str(wav): toy_text(wav) for wav in wavs}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-o", "OUT/talk.txt"], "--output OUT/talk.txt: with several inputs, give an existing folder"),
        (["-f", "srt"], "--format srt with several inputs needs --output FOLDER"),
        (["-o", "OUT", "-f", "docx"], "--format: unknown format 'docx'"),
        (["-o", "OUT", "--input", "OTHER/a.wav"], "would both write a.txt"),
        (["--streams", "0"], f"--streams: 0 is not a number of streams in 1..{MAX_STREAMS}"),
        (["--streams", str(MAX_STREAMS + 1)], f"--streams: {MAX_STREAMS + 1} is not a number of streams"),
        (["--input", "-"], "input '-' is one stream of its own: several inputs must be files or directories"),
        (["--input", "EMPTY"], "EMPTY: no audio files in the directory"),
        (["--input", "NOTAUDIO.wav"], "NOTAUDIO.wav: not a readable audio file"),
    ],
)
def test_bad_options_with_several_inputs_are_one_line(runner, tmp_path, args, expected):
    wavs = write_inputs(tmp_path / "in", [0.2, 0.2])
    places = {"OUT": tmp_path / "out", "OTHER": tmp_path / "other", "EMPTY": tmp_path / "empty"}
    for folder in places.values():
        folder.mkdir()
    write_noise_wav(tmp_path / "other" / "a.wav", 0.2)
    (tmp_path / "NOTAUDIO.wav").write_text("text")
    places["NOTAUDIO.wav"] = tmp_path / "NOTAUDIO.wav"

    def placed(text: str) -> str:
        for name, path in places.items():
            text = text.replace(name, str(path))
        return text

    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", *wavs, *map(placed, args))
    assert result.returncode == 1
    assert placed(expected) in one_error_line(result.stderr)
    assert " ready in " not in result.stderr.decode()  # found before any stage started


def test_a_gathering_stage_takes_a_ticks_streams_in_one_step(runner, tmp_path):
    """`gather_ms` on a batching relay: three real-time files, a tick's chunk of each stream waits (at most 60 ms)
    for the others', so after the first tick each step takes all three; the transcripts are as without."""
    wavs = write_inputs(tmp_path / "in", [1.2, 1.2, 1.2])
    data = yaml.safe_load(write_toy_pipeline(tmp_path / "p.yaml", capacity=64).read_text())
    data["stages"]["relay"] |= {"impl": f"{TOY}:BatchingRelay", "gather_ms": 60}
    pipeline = tmp_path / "gathering.yaml"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    stats = tmp_path / "stats.json"
    result = runner.run(pipeline, "--input", *wavs, "--realtime", "--stats-json", stats)
    assert result.returncode == 0, result.stderr.decode()
    assert labelled_lines(result.stdout) == {str(wav): toy_text(wav) for wav in wavs}
    batch = json.loads(stats.read_text())["stages"]["relay"]["batch"]
    assert batch["max"] == 3 and batch["mean"] > 2.5, batch


def test_a_thousand_streams_leave_nothing_behind(runner, tmp_path):
    """1,000 short files through the toy stages (a batching relay among them): every transcript right, and at the
    end no stage, queue end or stage process holds anything of any stream."""
    folder = tmp_path / "in"
    folder.mkdir()
    wavs = [write_noise_wav(folder / f"{index:04d}.wav", 0.1, seed=index) for index in range(1000)]
    data = yaml.safe_load(write_toy_pipeline(tmp_path / "p.yaml", capacity=64).read_text())
    data["stages"]["relay"]["impl"] = f"{TOY}:BatchingRelay"
    pipeline = tmp_path / "batching.yaml"
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    stats = tmp_path / "stats.json"
    result = runner.run(pipeline, "--input", folder, "--stats-json", stats, "--quiet", timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    lines = labelled_lines(result.stdout)
    assert len(lines) == 1000
    assert all(lines[str(wav)] == toy_text(wav) for wav in wavs[::97])
    figures = json.loads(stats.read_text())["stages"]
    for name in TOY_STAGES:
        streams = figures[name]["streams"]
        assert streams["tracked"] == 0 and streams.get("held", 0) == 0 and streams["output_tracked"] == 0, name
        if name != "capture":
            assert streams["input_open"] == 0 and streams["input_remembered"] == min(1000, ENDED_STREAMS_REMEMBERED)
    assert figures["relay"]["items"] == 3000  # two chunks and the end of each stream
    assert figures["relay"]["batch"]["max"] > 1  # the relay took several streams' chunks in one step
    assert wait_until_gone(runner.marker) == []
