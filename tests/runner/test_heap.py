"""Long-lived processes freeze the objects their start left (torch, the model, graphs), so that the collector's
full passes while streams run walk only what came after: a stage process does it before reporting ready."""

from __future__ import annotations

import gc

import yaml

from tests.runner.conftest import TOY, write_noise_wav
from tests.runner.test_cli import jsonl_events
from voxtral_run.runner.stage_process import freeze_startup_heap


class Cycle:
    """An object in a reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_freezing_collects_the_garbage_first_and_freezes_what_lives() -> None:
    alive = Cycle()
    garbage = Cycle()
    garbage_id = id(garbage)
    del garbage
    freeze_startup_heap()
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 0
        assert not any(id(obj) == garbage_id and isinstance(obj, Cycle) for obj in gc.get_objects())
        assert alive.me is alive
        gc.collect()
        assert gc.get_freeze_count() == frozen  # a full pass leaves the frozen objects alone
    finally:
        gc.unfreeze()


def test_a_stage_process_has_frozen_its_start_before_its_first_item(runner, tmp_path) -> None:
    detokenize = {"impl": f"{TOY}:HeapReporter"}
    queues = [{"from": "capture", "to": "detokenize"}, {"from": "detokenize", "to": "output"}]
    data = {"stages": {"capture": {}, "detokenize": detokenize}, "queues": [q | {"capacity": 4} for q in queues]}
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    result = runner.run(pipeline, "--input", write_noise_wav(tmp_path / "a.wav", 0.3), "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    counts = {int(event["text"]) for event in jsonl_events(result.stdout.decode()) if event["type"] == "delta"}
    assert counts and min(counts) > 1000  # numpy, zmq, msgpack and the stage's own modules at least
