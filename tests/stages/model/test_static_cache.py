"""The GPU fast path's static ring caches, run on the CPU: same ids and same attention as the dynamic ones."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS, SAMPLES_PER_TOKEN
from voxtral_run.stages.base import StageError
from voxtral_run.stages.encoder import CONV1_TAIL_LENGTHS
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.kernels.graphs import StepGraphs
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.layers import (
    MIN_SPAN,
    Block,
    RollingKVCache,
    RotaryEmbedding,
    StaticKVCache,
    attention_bias,
    fuse_projections,
    span_for,
    warm_attention_spans,
)
from voxtral_run.stages.transcribe import MODEL_CHAIN, run_chain, transcript_of

PARAMS = TransformerParams(
    dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=1e-5,
    sliding_window=10, use_biases=True,
)  # fmt: skip


def chain(model_dir, cache: str):
    settings = {"encoder": {"cache": cache}, "decoder": {"cache": cache}}
    return [build_stage(kind, model_dir=model_dir, params=settings.get(kind)) for kind in MODEL_CHAIN]


@pytest.mark.parametrize("chunk", [SAMPLES_PER_TOKEN, 10**7], ids=["80ms-chunks", "one-chunk"])
def test_static_cache_gives_the_dynamic_ids(small_window_model_dir, chunk) -> None:
    audio = speechlike_audio(6.0, seed=9)
    pieces = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
    dynamic = transcript_of(run_chain(chain(small_window_model_dir, "dynamic"), "s", pieces)).token_ids
    static = transcript_of(run_chain(chain(small_window_model_dir, "static"), "s", pieces)).token_ids
    assert len(set(dynamic)) >= 3
    assert static == dynamic


def test_static_attention_equals_dynamic_across_wraps() -> None:
    """Blocks of 1..5 positions through a transformer block and a ring of window-1+5 (aligned up) slots,
    many times around it."""
    torch.manual_seed(0)
    layer = Block(PARAMS)
    fuse_projections(layer)
    rope = RotaryEmbedding(PARAMS.head_dim, PARAMS.rope_theta)
    window = PARAMS.sliding_window
    dynamic = RollingKVCache(window, 1)
    static = StaticKVCache(window, 5, 1, PARAMS.n_kv_heads, PARAMS.head_dim, dtype=torch.float32, device="cpu")
    position = 0
    with torch.inference_mode():
        for block in [1, 5, 3, 2, 5, 4, 1, 1, 5, 5, 5, 2, 3] * 12:
            x = torch.randn(block, PARAMS.dim)
            positions = torch.arange(position, position + block)
            rotations = rope.rotations(positions, x.dtype)
            outputs = []
            for cache in (dynamic, static):
                cache.prepare(position + block)
                bias = attention_bias(positions, cache.begin(positions), window, x.dtype)
                outputs.append(layer(x, rotations, cache, 0, bias))
                cache.end()
            torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
            position += block
            assert len(static) == len(dynamic) == min(position, window - 1)
    assert position > 2 * static.capacity  # the ring wrapped more than once


def test_span_reads_the_filled_prefix_rounded_up_until_the_ring_wraps() -> None:
    assert span_for(1, 8255) == MIN_SPAN
    assert span_for(MIN_SPAN + 1, 8255) == 2 * MIN_SPAN
    assert span_for(5000, 8255) == 8192
    assert span_for(8200, 8255) == 8255
    assert span_for(10**6, 8255) == 8255
    assert span_for(3, 20) == 20


def test_cuda_graphs_need_a_gpu_and_static_caches(tiny_model_dir) -> None:
    with pytest.raises(StageError, match="cuda_graphs needs a CUDA device"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"cuda_graphs": True})
    with pytest.raises(StageError, match="cache must be static or dynamic"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"cache": "ring"})


def test_spans_are_every_span_a_forward_can_read() -> None:
    cache = StaticKVCache(200, 5, 1, 2, 4, dtype=torch.float32, device="cpu")
    assert cache.spans() == sorted({span_for(n, cache.capacity) for n in range(1, 3 * cache.capacity)})
    assert cache.spans()[-1] == cache.capacity


def test_warming_runs_attention_once_at_every_span() -> None:
    """A stage's warm-up calls its step attention at each span, so no stream's step waits for a kernel
    variant to load or compile."""
    cache = StaticKVCache(300, 4, 2, 2, 8, dtype=torch.float32, device="cpu")
    calls = []

    def attend(q, keys, values, bias):
        calls.append((tuple(q.shape), keys.shape[0], values.shape[0], tuple(bias.shape)))
        return q

    warm_attention_spans(attend, cache, heads=4, rows=3)
    assert calls == [((4, 3, 8), span, span, (3, span)) for span in cache.spans()]
    assert len(calls) > 2


def test_a_dropped_streams_graph_state_is_freed_at_once_not_by_the_cycle_collector(tiny_model_dir) -> None:
    """A stream's step graphs must not sit in a reference cycle: the cycle collector would free them at some
    later moment, possibly while another step is being captured, where destroying a CUDA graph fails that
    capture."""
    encoder, decoder = (
        build_stage(kind, model_dir=tiny_model_dir, params={"cache": "static"}) for kind in ("encoder", "decoder")
    )
    states = [encoder.encoder.new_state(static_cache=True), decoder._new_state()]
    encoder.encoder.enable_graphs(states[0])
    states[1].step = decoder._graph_step(states[1])
    graphs = [*states[0].step.graphs.values(), states[1].step.graphs]
    references = [weakref.ref(thing) for thing in (*states, *graphs)]
    gc.disable()
    try:
        del states, graphs
        assert [reference() for reference in references] == [None] * 5
    finally:
        gc.enable()


def test_graphed_steps_compute_what_the_plain_steps_compute(small_window_model_dir, monkeypatch) -> None:
    """The graphed steps' own buffers and bookkeeping, run without capture on the CPU: every 80 ms push is a
    graphed step, whichever conv tail odd pushes before it left; the tails pass between those and eager pushes,
    positions carry on across the ring's wraps, and the decoder's step feeds back its token."""
    replayed = []
    replay = StepGraphs.__call__
    monkeypatch.setattr(StepGraphs, "__call__", lambda graphs, key: (replayed.append(graphs), replay(graphs, key)))
    encoder, decoder = (
        build_stage(kind, model_dir=small_window_model_dir, params={"cache": "static"})
        for kind in ("encoder", "decoder")
    )
    plain = encoder.encoder.new_state(static_cache=True)
    graphed = encoder.encoder.new_state(static_cache=True)
    encoder.encoder.enable_graphs(graphed)
    mel = np.random.default_rng(3).standard_normal((500, NUM_MEL_BINS)).astype(np.float32)
    sizes = [8, 8, 3, 8, 8, 5, 8, 1, 0, 8, 8, 8, 8, 8, 8] + [MEL_FRAMES_PER_TOKEN] * 40
    starts = np.cumsum([0, *sizes])
    frames = {"plain": [], "graphed": []}
    with torch.inference_mode():
        for start, size in zip(starts, sizes, strict=False):
            chunk = torch.from_numpy(mel[start : start + size])
            for name, state in (("plain", plain), ("graphed", graphed)):
                frames[name].append(encoder.encoder(chunk, state))
    assert graphed.next_position == plain.next_position == sum(sizes) // 2
    by_tail = graphed.step.graphs
    assert [replayed.count(by_tail[length]) for length in CONV1_TAIL_LENGTHS] == [3, sizes.count(8) - 3]
    encoded = torch.cat(frames["plain"])
    assert torch.equal(torch.cat(frames["graphed"]), encoded)

    # The graphed streams take the frames at once, 4 at a time (a position per push, as a stream sends them)
    # and 3 at a time (positions straddling pushes).
    chunks = {"plain": encoded.shape[0], "graphed": encoded.shape[0], "graphed_by_4": 4, "graphed_by_3": 3}
    decoder._states = {name: decoder._new_state() for name in chunks}
    for name in chunks:
        if name != "plain":
            decoder._states[name].step = decoder._graph_step(decoder._states[name])
    host_frames = encoded.float().numpy()
    ids = {
        name: [int(i) for start in range(0, len(host_frames), size)
               for out in decoder.push(name, host_frames[start : start + size]) for i in out]
        for name, size in chunks.items()
    }  # fmt: skip
    assert len(ids["plain"]) == encoded.shape[0] // 4 - len(decoder.prompt) + 1
    assert len(set(ids["plain"])) >= 3
    assert ids["graphed"] == ids["graphed_by_4"] == ids["graphed_by_3"] == ids["plain"]
