"""Profiling: histograms, clock offsets, the end-of-run table, --stats-json, the Chrome trace, the live table, the
Prometheus endpoint, and the PNG report, on toy stages and on the tiny model."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request

import matplotlib.image
import numpy as np
import pytest
import soundfile
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.runner.conftest import REPO, Runner, wait_until_gone, write_noise_wav, write_toy_pipeline
from tests.runner.test_pipeline_model import ON_CPU, PIPELINE
from voxtral_run.runner.metrics import (
    BUCKETS_PER_DECADE,
    LogHistogram,
    RunFigures,
    StageMetrics,
    StepRecord,
    chrome_trace,
    estimate_clock_offset,
    format_table,
    upper_bound,
)
from voxtral_run.runner.prometheus import RunCollector
from voxtral_run.runner.stage_process import CudaTimer
from voxtral_run.stages.audio.constants import SAMPLES_PER_TOKEN
from voxtral_run.tools.make_tiny_checkpoint import TINY
from voxtral_run.tools.profile_report import main as profile_report

TOY_STAGES = ["capture", "relay", "detokenize"]
TEXT_SEED = 1  # a tiny model whose tokens on the test audio include text (seed 0 gives only special tokens)
HALF_BUCKET = 10 ** (0.5 / BUCKETS_PER_DECADE) - 1  # the relative error of a percentile read from a histogram
TIME_TOLERANCE_US = 0.01  # trace times are rounded to the nanosecond


def table_rows(stderr: str, stages: list[str]) -> dict[str, dict[str, str]]:
    """The last end-of-run table in stderr: stage -> column title -> cell."""
    lines = stderr.splitlines()
    header_at = max(index for index, line in enumerate(lines) if line.startswith("stage "))
    titles = re.split(r"\s{2,}", lines[header_at].strip())  # single spaces sit inside titles ("svc p50")
    rows = {}
    for line in lines[header_at + 1 : header_at + 1 + len(stages)]:
        cells = line.split()
        rows[cells[0]] = dict(zip(titles, cells, strict=True))
    assert list(rows) == stages, lines[header_at:]
    return rows


def frame_chains(events: list[dict]) -> dict[int, list[dict]]:
    """Each frame's spans in flow order (the flow events point at the slices by track and start)."""
    slices = {(event["tid"], event["ts"]): event for event in events if event["ph"] == "X" and event["name"] != "send"}
    chains: dict[int, list[dict]] = {}
    for event in events:
        if event["ph"] in ("s", "t"):
            chains.setdefault(event["id"], []).append(slices[(event["tid"], event["ts"])])
    return chains


def assert_pipeline_order(chains: dict[int, list[dict]]) -> None:
    """Every span has a duration, and a frame reaches each stage only after the previous stage's first span of
    it has ended (a stage may take several items of one frame, e.g. a flush; the first is what it produced)."""
    for spans in chains.values():
        assert all(span["dur"] >= 0 for span in spans)
        assert [span["tid"] for span in spans] == sorted(span["tid"] for span in spans)
        firsts = {}
        for span in spans:
            firsts.setdefault(span["tid"], span)
        stages = list(firsts.values())
        for earlier, later in zip(stages, stages[1:], strict=False):
            assert later["ts"] >= earlier["ts"] + earlier["dur"] - TIME_TOLERANCE_US, (earlier, later)


def track_ids(events: list[dict]) -> dict[str, int]:
    return {event["args"]["name"]: event["tid"] for event in events if event["name"] == "thread_name"}


# --- units ---


def test_histogram_percentiles_are_within_half_a_bucket_of_the_exact_ones():
    rng = np.random.default_rng(0)
    durations = rng.lognormal(mean=math.log(0.02), sigma=1.5, size=5000)
    histogram = LogHistogram()
    for value in durations:
        histogram.add(float(value))
    for p in (1, 50, 95, 99, 100):
        exact = np.percentile(durations, p, method="inverted_cdf")
        assert abs(histogram.percentile(p) / exact - 1) <= HALF_BUCKET + 1e-9, p
    for index in range(0, 900, 25):  # bucket edges: cumulative counts are exact there
        assert histogram.count_at_most(upper_bound(index)) == np.count_nonzero(durations <= upper_bound(index))
    again = LogHistogram.from_wire(histogram.to_wire())
    assert (again.count, again.total, again.percentile(95)) == (
        histogram.count,
        histogram.total,
        histogram.percentile(95),
    )


def test_clock_offset_from_round_trips_and_the_trace_corrected_by_it():
    offset = -3.25  # the remote stage's wall clock runs this far behind the runner's
    rng = np.random.default_rng(1)
    samples = []
    for start in np.arange(4) * 0.1:
        there, back = rng.uniform(0.0002, 0.003, size=2)  # asymmetric one-way delays
        samples.append((start, start + there + offset, start + there + back))
    error_bound = min(received - sent for sent, _, received in samples) / 2
    estimate = estimate_clock_offset(samples)
    assert abs(estimate - offset) <= error_bound
    same_clock = [(sent, replied - offset, received) for sent, replied, received in samples]
    assert estimate_clock_offset(same_clock) == 0.0  # no correction from the noise of a round trip
    # A frame every 80 ms: the local stage takes 5 ms, the remote one starts 1 ms later, stamped on its own clock.
    origin = 1000.0
    local = [StepRecord(origin + k * 0.08, 0.005, items=[["s", 0.0, origin + k * 0.08, False]]) for k in range(5)]
    remote = [
        StepRecord(origin + k * 0.08 + 0.006 + offset, 0.005, items=[["s", 0.001, origin + k * 0.08, False]])
        for k in range(5)
    ]
    local, remote = ([record.as_list() for record in records] for records in (local, remote))
    tracks = {"local": local, "remote": remote}
    chains = frame_chains(chrome_trace(tracks, origin=origin, clock_offsets={"remote": estimate})["traceEvents"])
    assert len(chains) == 5
    assert_pipeline_order(chains)
    assert all(abs(spans[1]["ts"] - spans[0]["ts"] - 6000) <= error_bound * 1e6 for spans in chains.values())
    with pytest.raises(AssertionError):  # uncorrected, the remote stage would seem to run before the frame exists
        assert_pipeline_order(frame_chains(chrome_trace(tracks, origin=origin)["traceEvents"]))


class FakeCudaEvent:
    """A CUDA event on a fake device whose clock and progress the test sets."""

    clock = 0.0  # the device time an event recorded now gets
    done_until = -1.0  # the device has passed every event recorded up to this time
    synchronized = 0

    def __init__(self, enable_timing: bool):
        assert enable_timing

    def record(self, stream: object) -> None:
        self.time = FakeCudaEvent.clock

    def query(self) -> bool:
        return self.time <= FakeCudaEvent.done_until

    def synchronize(self) -> None:
        FakeCudaEvent.synchronized += 1

    def elapsed_time(self, end: FakeCudaEvent) -> float:
        return (end.time - self.time) * 1000  # ms, as torch gives it


def test_device_times_are_read_without_waiting_for_the_device(monkeypatch):
    for name, value in (("clock", 0.0), ("done_until", -1.0), ("synchronized", 0)):
        monkeypatch.setattr(FakeCudaEvent, name, value)
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    metrics = StageMetrics()
    timer = CudaTimer("cuda:0", metrics)
    records = [StepRecord(0.0, 0.001) for _ in range(3)]
    for index, record in enumerate(records):  # each call takes 4 ms on the device, which is still busy
        FakeCudaEvent.clock = index * 0.01
        timer.start()
        FakeCudaEvent.clock += 0.004
        timer.stop(record)
    assert [record.device_s for record in records] == [None] * 3 and FakeCudaEvent.synchronized == 0
    FakeCudaEvent.done_until = 0.015  # the device has finished the first two calls
    timer.collect()
    assert [record.device_s for record in records[:2]] == pytest.approx([0.004, 0.004]) and records[2].device_s is None
    assert FakeCudaEvent.synchronized == 0
    timer.collect(wait=True)  # the end of the run may wait for the last one
    assert records[2].device_s == pytest.approx(0.004) and metrics.histograms["device"].count == 3


# --- toy stages over processes ---


def test_slow_stage_is_the_bottleneck_in_table_json_and_trace(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.8)  # ten 80 ms frames
    frames = math.ceil(soundfile.info(wav).frames / SAMPLES_PER_TOKEN)
    throttle_ms = 25
    at_least = throttle_ms * (1 - HALF_BUCKET)  # the throttle, as a percentile read from a histogram shows it
    capacity = 1  # one message in the relay's queue: each of its steps takes one, and pays the throttle
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": throttle_ms}, capacity=capacity)
    trace, stats = tmp_path / "trace.json", tmp_path / "stats.json"
    # 100 ms runs as two whole tokens: the latency is counted beyond those 160 ms.
    result = runner.run(pipeline, "--input", wav, "--profile", trace, "--stats-json", stats, "--delay-ms", "100")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "beyond the 160 ms delay" in stderr
    rows = table_rows(stderr, TOY_STAGES)
    # Items: the capture's frames; downstream, the same frames plus the stream's end.
    assert [rows[name]["items"] for name in TOY_STAGES] == [str(frames), str(frames + 1), str(frames + 1)]
    utilisation = {name: float(rows[name]["util"].rstrip("%")) for name in TOY_STAGES}
    assert max(utilisation, key=utilisation.get) == "relay" and utilisation["relay"] > 50
    assert at_least <= float(rows["relay"]["svc p50"]) < 4 * throttle_ms
    assert "bottleneck: relay" in stderr
    assert rows["capture"]["queue"] == f"{capacity}/{capacity}"  # the capture filled the relay's queue

    figures = json.loads(stats.read_text())
    assert figures["bottleneck"] == "relay" and figures["delay_ms"] == 160
    assert [figures["stages"][name]["items"] for name in TOY_STAGES] == [frames, frames + 1, frames + 1]
    assert figures["end_to_end_ms"]["count"] == frames
    assert figures["end_to_end_ms"]["p50"] >= at_least  # every delta waited for the slow stage
    assert figures["stages"]["relay"]["service_ms"]["p50"] >= at_least

    events = json.loads(trace.read_text())["traceEvents"]
    tracks = track_ids(events)
    assert list(tracks) == TOY_STAGES
    busy = {name: 0.0 for name in tracks}
    blocked = {name: 0.0 for name in tracks}
    by_tid = {tid: name for name, tid in tracks.items()}
    for event in events:
        if event["ph"] == "X":
            (blocked if event["name"] == "send" else busy)[by_tid[event["tid"]]] += event["dur"]
    assert max(busy, key=busy.get) == "relay"
    # Upstream of the bottleneck, sends wait for room: all frames but those in the queue and the one in service.
    assert blocked["capture"] >= 0.8 * (frames - capacity - 1) * throttle_ms * 1000
    chains = frame_chains(events)
    assert len(chains) == frames and all(len({span["tid"] for span in spans}) == 3 for spans in chains.values())
    assert_pipeline_order(chains)
    latencies = [event["args"]["latency_ms"] for event in events if event["ph"] == "C"]
    assert len(latencies) == frames and min(latencies) > 0
    assert wait_until_gone(runner.marker) == []


def test_batched_steps_show_in_table_json_and_trace(runner, tmp_path):
    """Four files at once through a relay that batches its streams: its steps take several messages, their rows
    are counted per batched computation, and each message's wait and each delta's latency are still measured."""
    folder = tmp_path / "in"
    folder.mkdir()
    wavs = [write_noise_wav(folder / f"{index}.wav", 0.8, seed=index) for index in range(4)]
    frames = sum(math.ceil(soundfile.info(wav).frames / SAMPLES_PER_TOKEN) for wav in wavs)
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": 30}, capacity=16)
    pipeline.write_text(pipeline.read_text().replace("toy_stages:Passthrough", "toy_stages:BatchingRelay"))
    trace, stats = tmp_path / "trace.json", tmp_path / "stats.json"
    result = runner.run(pipeline, "--input", folder, "--profile", trace, "--stats-json", stats)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    relay = json.loads(stats.read_text())["stages"]["relay"]
    assert relay["items"] == frames + len(wavs) and relay["steps"] < relay["items"]
    batch = relay["batch"]
    assert batch["max"] > 1 and batch["count"] <= relay["steps"] and batch["mean"] * batch["count"] == frames
    row = table_rows(stderr, TOY_STAGES)["relay"]
    assert row["steps"] == str(relay["steps"])
    assert row["batch"] == f"{batch['mean']:.1f}/{batch['p95']}/{batch['max']}"
    assert table_rows(stderr, TOY_STAGES)["capture"]["batch"] == "-"  # reading a chunk is no batched computation
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [event for event in events if event["ph"] == "X" and event["name"] == "relay"]
    assert len(steps) == relay["steps"]
    assert sum(step["args"]["items"] for step in steps) == relay["items"]
    assert sum(len(step["args"]["waits_ms"]) for step in steps) == relay["items"]  # a wait per message
    assert sum(sum(step["args"]["batch_sizes"]) for step in steps) == frames
    assert max(step["args"]["batch_sizes"][0] for step in steps if step["args"]["batch_sizes"]) == batch["max"]
    assert json.loads(stats.read_text())["end_to_end_ms"]["count"] == frames  # every delta of every stream
    assert wait_until_gone(runner.marker) == []


def test_metrics_endpoint_serves_steps_batch_sizes_and_kv_pages():
    metrics = StageMetrics()
    for rows in (1, 3, 3, 8):
        metrics.record(StepRecord(0.0, 0.01, batch_sizes=[rows], items=[["s", 0.001, 0.0, False]] * rows))
    kv = {"pages_in_use": 7, "pages": 40}
    figures = RunFigures(stages={"encoder": {"metrics": metrics.snapshot(), "kv": kv}, "mel": {}}, wall_s=1.0)
    families = {family.name: family.samples for family in RunCollector(lambda: figures).collect()}
    assert sample_value(families, "voxtral_kv_pages_in_use", stage="encoder") == 7
    assert sample_value(families, "voxtral_kv_pages", stage="encoder") == 40
    assert [sample.labels["stage"] for sample in families["voxtral_kv_pages"]] == ["encoder"]
    assert sample_value(families, "voxtral_stage_steps_total", stage="encoder") == 4
    assert sample_value(families, "voxtral_stage_items_total", stage="encoder") == 15
    assert sample_value(families, "voxtral_stage_batch_rows_count", stage="encoder") == 4
    assert sample_value(families, "voxtral_stage_batch_rows_sum", stage="encoder") == 15
    assert sample_value(families, "voxtral_stage_batch_rows_bucket", stage="encoder", le="2") == 1
    assert sample_value(families, "voxtral_stage_batch_rows_bucket", stage="encoder", le="4") == 3
    assert sample_value(families, "voxtral_stage_batch_rows_bucket", stage="encoder", le="+Inf") == 4
    assert metrics.snapshot()["batch"] == {"count": 4, "mean": 3.75, "p95": 8, "max": 8}


def test_graph_captures_after_the_warm_up_show_in_table_json_and_metrics():
    """A model stage's graphs captured while streams waited (count and host seconds) are a line after the table,
    a figure in the JSON and two Prometheus counters; a stage that captured none adds no line."""
    graphs = {"encoder": {"captured": 12, "capture_s": 0.84}, "decoder": {"captured": 0, "capture_s": 0.0}}
    figures = RunFigures(stages={name: {"graphs": tally} for name, tally in graphs.items()} | {"mel": {}}, wall_s=2.0)
    table = format_table(figures)
    assert (
        "CUDA graphs captured after the warm-up (a step meeting a new shape waits for its capture): encoder 12 in "
        "0.84 s" in table.splitlines()
    )
    assert "decoder 0" not in table
    stages = figures.to_json()["stages"]
    assert stages["encoder"]["graphs"] == graphs["encoder"] and "graphs" not in stages["mel"]
    assert "CUDA graphs" not in format_table(RunFigures(stages={"mel": {}}, wall_s=1.0))
    families = {family.name: family.samples for family in RunCollector(lambda: figures).collect()}
    assert sample_value(families, "voxtral_graph_captures_total", stage="encoder") == 12
    assert sample_value(families, "voxtral_graph_capture_seconds_total", stage="encoder") == 0.84
    assert [sample.labels["stage"] for sample in families["voxtral_graph_captures"]] == ["encoder", "decoder"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> samples, from the endpoint on loopback."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample_value(families: dict[str, list], name: str, **labels: str) -> float | None:
    family = name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket").removesuffix("_sum")
    for sample in families.get(family, []):
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
            return sample.value
    return None


def test_metrics_endpoint_and_live_table_during_a_run(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 2.4)  # 30 frames of 40 ms each at the relay: about 1.2 s
    throttle_ms = 40
    pipeline = write_toy_pipeline(tmp_path / "p.yaml", relay={"throttle_ms": throttle_ms})
    port = free_port()
    process = runner.start(pipeline, "--input", wav, "--metrics-port", port, "--stats-every", "0.3")
    deadline = time.monotonic() + 30
    families: dict[str, list] = {}
    while time.monotonic() < deadline and process.poll() is None:
        try:
            families = scrape(port)
        except OSError:  # not listening yet, or no longer: the last scrape that answered stands
            pass
        items = [sample_value(families, "voxtral_stage_items_total", stage=stage) for stage in TOY_STAGES]
        if all(items) and sample_value(families, "voxtral_end_to_end_latency_seconds_count"):
            break
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    for stage in TOY_STAGES:
        items = sample_value(families, "voxtral_stage_items_total", stage=stage)
        assert items and items > 0, f"no {stage} series scraped during the run: {sorted(families)}"
        assert sample_value(families, "voxtral_stage_busy_seconds_total", stage=stage) is not None
        assert sample_value(families, "voxtral_queue_peak_depth", stage=stage) is not None
        assert sample_value(families, "voxtral_queue_dropped_total", stage=stage) == 0
    # The relay's service histogram: nothing faster than its throttle.
    service_count = sample_value(families, "voxtral_stage_service_seconds_count", stage="relay")
    under = sample_value(families, "voxtral_stage_service_seconds_bucket", stage="relay", le="0.0316")
    assert service_count > 0 and under == 0
    assert sample_value(families, "voxtral_end_to_end_latency_seconds_count") > 0
    # The live table came while the run went on, and the final one after it.
    assert "voxtral-run: figures at" in stderr
    rows = table_rows(stderr, TOY_STAGES)
    assert rows["capture"]["items"] == "30" and rows["relay"]["items"] == "31"
    assert wait_until_gone(runner.marker) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--stats-every", "0"], "--stats-every: give at least 0.1 seconds"),
        (["--metrics-port", "70000"], "--metrics-port: give a port from 1 to 65535"),
    ],
)
def test_bad_profiling_flags_are_one_line(runner, tmp_path, args, expected):
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)
    result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, *args)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], lines


def test_metrics_port_in_use_is_one_line(runner, tmp_path):
    wav = write_noise_wav(tmp_path / "a.wav", 0.2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.run(write_toy_pipeline(tmp_path / "p.yaml"), "--input", wav, "--metrics-port", port)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in lines[0]
    assert wait_until_gone(runner.marker) == []


# --- the tiny model ---


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, checkpoint_factory):
    """One profiled run of the real stages on a tiny model: (stderr, stats, trace path, wav)."""
    model_dir = checkpoint_factory(TINY, TEXT_SEED)
    directory = tmp_path_factory.mktemp("profiled")
    wav = write_noise_wav(directory / "speech.wav", 1.6, seed=4)
    trace, stats = directory / "trace.json", directory / "stats.json"
    runner = Runner(f"profiled-{time.monotonic_ns()}")
    result = runner.run(
        PIPELINE, "--model", model_dir, *ON_CPU, "--input", wav, "--profile", trace, "--stats-json", stats
    )
    assert result.returncode == 0, result.stderr.decode()
    assert wait_until_gone(runner.marker) == []
    return result.stderr.decode(), json.loads(stats.read_text()), trace, wav


@pytest.mark.slow
def test_model_run_counts_every_frame_once_and_traces_it_in_pipeline_order(model_run):
    stderr, figures, trace, wav = model_run
    stages = ["capture", "resample", "mel", "encoder", "decoder", "detokenize"]
    rows = table_rows(stderr, stages)
    frames = math.ceil(soundfile.info(wav).frames / SAMPLES_PER_TOKEN)
    assert rows["capture"]["items"] == str(frames)
    # Each stage took every message its upstream sent: the frames it was given and the stream's end.
    for upstream, stage in zip(stages, stages[1:], strict=False):
        sent = figures["stages"][upstream]["queue"]["sent"]
        assert rows[stage]["items"] == str(sent) == str(figures["stages"][stage]["items"]), stage
    assert figures["end_to_end_ms"]["count"] > 0 and figures["bottleneck"] in stages

    events = json.loads(trace.read_text())["traceEvents"]
    assert list(track_ids(events)) == stages
    chains = frame_chains(events)
    assert len(chains) == frames  # every captured frame reached at least the resampler
    assert_pipeline_order(chains)
    assert all(event["dur"] >= 0 for event in events if event["ph"] == "X")


@pytest.mark.slow
def test_model_run_says_what_the_model_stages_compute_in(model_run):
    """The start-up line and the figures name each model stage's number formats (stages/factory.py's kv_dtype,
    weights, lm_head); other stages have none."""
    stderr, figures, _, _ = model_run
    formats = {"dtype": "float32", "kv_dtype": "float32", "weights": "float32"}
    assert figures["stages"]["encoder"]["settings"] == formats
    assert figures["stages"]["decoder"]["settings"] == {**formats, "lm_head": "float32"}
    assert "settings" not in figures["stages"]["mel"]
    assert "decoder [dtype float32, kv_dtype float32, weights float32, lm_head float32]" in stderr.splitlines()[0]


@pytest.mark.slow
def test_model_stages_report_their_kv_memory_and_free_it_all(model_run):
    """The figures carry each model stage's KV pages (what a replica router weighs): all of them free once the
    run's streams ended; other stages have none."""
    _, figures, _, _ = model_run
    for stage in ("encoder", "decoder"):
        kv = figures["stages"][stage]["kv"]
        assert kv["pages"] > 0 and kv["pages_in_use"] == 0, kv
    assert "kv" not in figures["stages"]["mel"]


@pytest.mark.slow
def test_profile_report_draws_a_png_of_a_model_run(model_run, tmp_path):
    _, _, trace, _ = model_run
    png = tmp_path / "report.png"
    assert profile_report([str(trace), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 1000 and height > 800


def test_profile_report_rejects_a_file_that_is_not_a_trace(tmp_path, capsys):
    not_trace = tmp_path / "notes.json"
    not_trace.write_text('{"hello": 1}')
    assert profile_report([str(not_trace)]) == 1
    assert (
        capsys.readouterr().err.strip()
        == f"profile_report: {not_trace}: not a Chrome trace (a JSON object with traceEvents)"
    )


def test_help_documents_every_profiling_flag():
    result = subprocess.run(
        [sys.executable, "-m", "runner", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    for flag in ("--profile", "--stats-every", "--stats-json", "--metrics-port", "--metrics-host"):
        assert flag in result.stdout, flag
