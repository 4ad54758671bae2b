"""bench_pipeline on the tiny model: real-time files through the real stage processes, the run's own figures, and
its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import soundfile

from tests.runner.conftest import REPO
from tests.runner.test_profiling import TEXT_SEED
from voxtral_run.tools.bench_pipeline import DISTINCT_AUDIOS, main, write_streams
from voxtral_run.tools.make_tiny_checkpoint import TINY


def test_files_through_the_pipeline_report_latency_lag_and_stages(checkpoint_factory, tmp_path: Path, capsys) -> None:
    """Three real-time files joining 0.2 s apart (a tiny model whose tokens include text): a transcript each, the
    per-token latency of every delta, the capture's lag, the model stages' batches, and a verdict that follows
    from them."""
    out = tmp_path / "bench.json"
    model = checkpoint_factory(TINY, TEXT_SEED)
    code = main(["--model", str(model), "--pipeline", str(REPO / "pipeline.yaml"), "--streams", "3",
                 "--seconds", "1.5", "--join-over", "0.6", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["streams"] == 3 and result["transcripts"] == 3
    assert "capture.stagger_s=0.2" in result["sets"] and result["figures"]["wall_s"] >= 1.5 + 0.4
    latency = result["latency_ms"]
    assert latency["count"] == result["figures"]["end_to_end_ms"]["count"] > 0
    assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"]
    assert result["capture_max_lag_s"] >= 0 and result["late_chunks"] >= 0
    assert result["stages"]["encoder"]["batch"]["max"] >= 1 and "capture" not in result["stages"]
    assert result["within_budget"] == (latency["p95"] <= 50 and result["capture_max_lag_s"] <= 1)
    assert "3 streams of 1.5 s: 3 transcripts; per-token latency" in capsys.readouterr().out


def test_a_pipeline_that_cannot_run_is_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["--model", str(tiny_model_dir), "--pipeline", str(REPO / "pipeline.yaml"), "--streams", "1",
                 "--seconds", "1", "--set", "encoder.bogus=1", "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bench_pipeline: the pipeline exited 1: voxtral-run: error: ") and "bogus" in line
    assert not (tmp_path / "b.json").exists()


def test_streams_beyond_the_distinct_audios_are_copies(tmp_path: Path) -> None:
    paths = write_streams(tmp_path, DISTINCT_AUDIOS + 2, 1.0)
    assert [path.name for path in paths[:2]] == ["stream0000.wav", "stream0001.wav"]
    first, copy = (soundfile.read(paths[i])[0] for i in (0, DISTINCT_AUDIOS))
    assert (first == copy).all() and not (first == soundfile.read(paths[1])[0]).all()
    assert soundfile.info(paths[-1]).samplerate == 16000 and soundfile.info(paths[-1]).duration == 1.0
