"""bench_serve against a real server on the tiny model (uvicorn in a thread over an in-process hub): a ramp of
stream counts, one past the hub's capacity; its figures, the server it cannot start, and its one-line errors."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runner.serve.conftest import running_server
from voxtral_run.runner.serve.hub import InProcessHub
from voxtral_run.tools import bench_serve
from voxtral_run.tools.bench_serve import BenchError, ramp, started_server, within_budget

CAPACITY = 3
SECONDS = 2.5
JOIN_OVER_S = 1.0


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
