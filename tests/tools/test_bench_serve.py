"""bench_serve against a real server on the tiny model (uvicorn in a thread over an in-process hub): a ramp of
stream counts, one past the hub's capacity; a trial whose streams are warmed up first; its figures, the server it
cannot start, and its one-line errors."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runner.serve.conftest import running_server
from voxtral_run.runner.serve.hub import InProcessHub
from voxtral_run.stages.audio.constants import OFFLINE_STREAMING_BUFFER_TOKENS, SECONDS_PER_TOKEN, delay_tokens
from voxtral_run.tools import bench_serve
from voxtral_run.tools.bench_serve import BenchError, ramp, started_server, within_budget

CAPACITY = 3
SECONDS = 2.5
JOIN_OVER_S = 1.0
WARM_AUDIO_S = 6.0  # each warmed-up session's audio
WARM_S = 4.05  # its first 50 appends (4 s) go as fast as the server takes them, the last 2 s paced


@pytest.fixture(scope="module")
def realtime_url(tiny_model_dir: Path) -> Iterator[str]:
    hub = InProcessHub.load(tiny_model_dir, max_streams=CAPACITY)
    try:
        with running_server(hub) as server:
            yield server.realtime
    finally:
        hub.close()


def test_a_ramp_measures_every_session_and_counts_those_past_capacity(realtime_url: str) -> None:
    """2 and 3 streams joining over a second each finish every session with text and sane latencies, some
    while all were live; a 4th past the hub's capacity of 3 is refused while the other three finish; the largest
    count within budget is one that was."""
    results = ramp(realtime_url, [2, CAPACITY, CAPACITY + 1], SECONDS, join_over_s=JOIN_OVER_S)

    assert results["model"] == "voxtral-tiny"
    assert [t["streams"] for t in results["trials"]] == [2, CAPACITY, CAPACITY + 1]
    for trial in results["trials"]:
        served = min(trial["streams"], CAPACITY)
        assert trial["finished"] == served and trial["failed"] == 0 and trial["behind"] == 0, trial
        assert trial["refused"] == trial["streams"] - served
        assert trial["deltas"] >= served and trial["tokens"] >= trial["deltas"]
        assert trial["all_live_s"] == pytest.approx(SECONDS - JOIN_OVER_S * (trial["streams"] - 1) / trial["streams"])
        assert trial["all_live_latency_ms"]["p95"] is not None
        assert trial["latency_ms"]["min"] <= trial["all_live_latency_ms"]["p95"] <= trial["latency_ms"]["max"]
        for figures in (trial["latency_ms"], trial["all_live_latency_ms"], trial["send_lag_ms"]):
            values = [figures[p] for p in ("min", "p50", "p95", "p99", "max")]
            assert all(math.isfinite(v) for v in values) and values == sorted(values), figures
        assert trial["latency_ms"]["min"] >= 0 and trial["send_lag_ms"]["max"] < 1000 * bench_serve.BEHIND_S
        assert SECONDS <= trial["wall_s"] < SECONDS + 20 and 0 < trial["client_cpu"]
    assert not within_budget(results["trials"][-1])
    assert results["largest_within_budget"] in {0, 2, CAPACITY}
    assert results["largest_within_budget"] == max(
        [t["streams"] for t in results["trials"] if within_budget(t)], default=0
    )


def test_a_warm_part_goes_faster_than_real_time_and_only_the_paced_part_counts(realtime_url: str) -> None:
    """Two sessions send their first 4 s as fast as the server takes them, catch up, and pace the last 2 s as
    live: both finish on time within less wall time than their audio lasts; the warm-ups are recorded; latencies
    count only the deltas whose audio went out paced, and none came before its audio."""
    results = ramp(realtime_url, [2], WARM_AUDIO_S, join_over_s=JOIN_OVER_S, warm_s=WARM_S)

    trial = results["trials"][0]
    warm_s = math.floor(WARM_S / SECONDS_PER_TOKEN) * SECONDS_PER_TOKEN
    paced_s = WARM_AUDIO_S - warm_s
    assert results["warm_s"] == trial["warm_s"] == pytest.approx(warm_s)
    assert trial["finished"] == 2 and trial["failed"] == 0 and trial["behind"] == 0 and trial["refused"] == 0, trial
    warm_up = trial["warm_up_s"]
    assert 0 < warm_up["min"] <= warm_up["p50"] <= warm_up["max"] < warm_s, warm_up
    assert paced_s <= trial["wall_s"] < WARM_AUDIO_S, trial
    assert 0 <= trial["caught_up_by_quiet"] <= 2
    # The warm part's deltas are not counted; the paced part's are at most its tokens: those whose audio or delay
    # reaches past the warm part, and the right pad's.
    delay = delay_tokens(480)
    paced_tokens = math.ceil(paced_s / SECONDS_PER_TOKEN) + delay + 1 + delay + 1 + OFFLINE_STREAMING_BUFFER_TOKENS
    assert 0 < trial["paced_deltas"] < trial["deltas"] <= trial["tokens"], trial
    assert trial["paced_deltas"] <= 2 * paced_tokens, trial
    assert 0 < trial["all_live_s"] <= paced_s
    for figures in (trial["latency_ms"], trial["all_live_latency_ms"], trial["send_lag_ms"]):
        values = [figures[p] for p in ("min", "p50", "p95", "p99", "max")]
        assert all(math.isfinite(v) for v in values) and values == sorted(values), figures
    assert trial["latency_ms"]["min"] >= 0 and trial["send_lag_ms"]["max"] < 1000 * bench_serve.BEHIND_S


def test_a_warm_up_past_its_timeout_is_a_session_error(realtime_url: str, monkeypatch) -> None:
    """A warm-up that does not catch up in time ends its session with a one-line error, without waiting more."""
    monkeypatch.setattr(bench_serve, "WARM_TIMEOUT_S", 0.0)
    trial = ramp(realtime_url, [2], WARM_AUDIO_S, join_over_s=JOIN_OVER_S, warm_s=WARM_S)["trials"][0]

    assert trial["failed"] == 2 and trial["finished"] == 0 and trial["warm_up_s"]["max"] is None, trial
    assert len(trial["errors"]) == 1 and trial["errors"][0].startswith("warm-up: the server did not catch up")
    assert trial["all_live_s"] == 0 and trial["all_live_latency_ms"]["p95"] is None and not within_budget(trial)
    assert trial["wall_s"] < WARM_AUDIO_S - WARM_S


def test_a_server_that_fails_to_start_is_one_line_naming_its_log(tiny_model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(BenchError, match=r"voxtral-run serve exited with \d+: .*\(log: .*server\.log\)"):
        with started_server(str(tmp_path / "missing.yaml"), tiny_model_dir, [], log, timeout_s=60.0):
            pass


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "http://127.0.0.1:8000"], "--url must be ws://"),
        (["--url", "ws://h/v1/realtime", "--streams", "50,x"], "argument --streams: must be whole numbers"),
        (["--url", "ws://h/v1/realtime", "--delay-ms", "50"], "--delay-ms must be 80..2400"),
        (["--url", "ws://h/v1/realtime", "--join-over", "30"], "--join-over must be more than 0 and less than"),
        (["--url", "ws://h/v1/realtime", "--warm-s", "-1"], "--warm-s must be >= 0 and leave an 80 ms append"),
        (["--url", "ws://h/v1/realtime", "--seconds", "10", "--warm-s", "10"], "of --seconds 10 to pace, got 10"),
        (["--url", "ws://h/v1/realtime", "--warm-s", "nan"], "--warm-s must be >= 0"),
        (["--start", "pipeline.yaml"], "--start needs --model DIR"),
        (["--url", "ws://127.0.0.1:1/v1/realtime"], "GET http://127.0.0.1:1/v1/models"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], message: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_serve", *argv])
    with pytest.raises(SystemExit) as stopped:
        bench_serve.main()
    err = capsys.readouterr().err
    assert stopped.value.code != 0 and message in err and err.count("\n") == 1, err
