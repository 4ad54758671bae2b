"""The encoder and decoder stage cores: their 80 ms steps (`kernels.steps`, run here without capture) compute
what the model's forward computes, and a dropped stream frees its steps at once."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from voxtral_run.stages.audio.constants import MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from voxtral_run.stages.base import StageError
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.kernels.graphs import StepGraphs
from voxtral_run.stages.kernels.steps import DecoderStep, EncoderStep
from voxtral_run.stages.model.encoder import CONV1_TAIL_LENGTHS
from voxtral_run.stages.model_stages import _DecoderStream, _EncoderStream


def test_settings_that_do_not_fit_the_device_are_one_line(tiny_model_dir) -> None:
    with pytest.raises(StageError, match="cuda_graphs needs a CUDA device"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"cuda_graphs": True})
    with pytest.raises(StageError, match="unknown setting 'cache'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"cache": "static"})


def with_steps(stage, stream_id: str) -> None:
    """Give a stream of a CPU stage the step objects a GPU stage gives every stream (eager blocks, no capture)."""
    if stage.name == "encoder":
        state = stage.encoder.new_state()
        stage._states[stream_id] = _EncoderStream(state, EncoderStep(stage.encoder, state, stage.blocks, graphs=False))
    else:
        cache = stage.decoder.new_cache()
        step = DecoderStep(stage.decoder, cache, stage.ffn_scales, stage.blocks, fused=False, graphs=False)
        stage._states[stream_id] = _DecoderStream(cache, step)


def test_the_steps_compute_what_the_model_computes(small_window_model_dir, monkeypatch) -> None:
    """Every 80 ms push is a step, whichever conv tail the odd pushes before it left; the tails pass between
    steps and forwards, and the decoder's step feeds back its token
    whether a position's frames come in one push or straddle two."""
    replayed = []
    replay = StepGraphs.__call__
    monkeypatch.setattr(StepGraphs, "__call__", lambda graphs, key: (replayed.append(graphs), replay(graphs, key)))
    encoder, decoder = (build_stage(kind, model_dir=small_window_model_dir) for kind in ("encoder", "decoder"))
    with_steps(encoder, "stepped")
    mel = np.random.default_rng(3).standard_normal((500, NUM_MEL_BINS)).astype(np.float32)
    sizes = [8, 8, 3, 8, 8, 5, 8, 1, 0, 8, 8, 8, 8, 8, 8] + [MEL_FRAMES_PER_TOKEN] * 40
    starts = np.cumsum([0, *sizes])
    frames = {"plain": [], "stepped": []}
    for start, size in zip(starts, sizes, strict=False):
        for name in frames:
            frames[name] += encoder.push(name, mel[start : start + size])
    stepped = encoder.state("stepped")
    assert stepped.state.next_position == encoder.state("plain").state.next_position == sum(sizes) // 2
    by_tail = stepped.step.graphs
    assert [replayed.count(by_tail[length]) for length in CONV1_TAIL_LENGTHS] == [3, sizes.count(8) - 3]
    encoded = np.concatenate(frames["plain"])
    assert np.array_equal(np.concatenate(frames["stepped"]), encoded)

    chunks = {"plain": len(encoded), "stepped": len(encoded), "stepped_by_4": 4, "stepped_by_3": 3}
    for name in chunks:
        if name != "plain":
            with_steps(decoder, name)
    ids = {
        name: [int(i) for start in range(0, len(encoded), size)
               for out in decoder.push(name, encoded[start : start + size]) for i in out]
        for name, size in chunks.items()
    }  # fmt: skip
    assert len(ids["plain"]) == len(encoded) // 4 - len(decoder.prompt) + 1
    assert len(set(ids["plain"])) >= 3
    assert ids["stepped"] == ids["stepped_by_4"] == ids["stepped_by_3"] == ids["plain"]


def test_a_dropped_streams_steps_are_freed_at_once_not_by_the_cycle_collector(tiny_model_dir) -> None:
    """A stream's steps must not sit in a reference cycle: the cycle collector would free their graphs at some
    later moment, possibly while another step is being captured, where destroying a CUDA graph fails that
    capture."""
    encoder, decoder = (build_stage(kind, model_dir=tiny_model_dir) for kind in ("encoder", "decoder"))
    for stage in (encoder, decoder):
        with_steps(stage, "s")
        stage.push("s", np.zeros((8, NUM_MEL_BINS) if stage is encoder else (4 * 40, 32), np.float32))
    records = [encoder._states.pop("s"), decoder._states.pop("s")]
    steps = [record.step for record in records]
    references = [weakref.ref(thing) for thing in (*records, *steps, *steps[0].graphs.values(), steps[1].graphs)]
    gc.disable()
    try:
        del records, steps
        assert [reference() for reference in references] == [None] * len(references)
    finally:
        gc.enable()


def test_warm_up_leaves_no_stream(tiny_model_dir) -> None:
    stage = build_stage("decoder", model_dir=tiny_model_dir)
    stage.warm_up()
    assert stage.streams() == []
    assert torch.is_inference_mode_enabled() is False
