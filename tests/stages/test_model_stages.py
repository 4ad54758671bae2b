"""The encoder and decoder stage cores batch many streams: each stream's ids are its ids alone, whatever joins
or leaves beside it; the ceiling waits or refuses; KV memory goes back the moment a stream ends."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import MEL_FRAMES_PER_TOKEN, SAMPLES_PER_TOKEN, delay_tokens, pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.base import END, StageError, StreamEnd, StreamFailed, StreamStart
from voxtral_run.stages.factory import build_stage
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.decoder import streaming_prompt
from voxtral_run.stages.model_stages import EncoderStage

CHUNK = SAMPLES_PER_TOKEN  # 80 ms a tick, as live audio arrives


@dataclass
class Schedule:
    """A stream's part in a run: its audio, the tick it joins at, and its delay."""

    audio: np.ndarray
    joins: int = 0
    delay_ms: int | None = None
    chunk: int = CHUNK


def model_chain(model_dir, **batch) -> list:
    """mel, encoder and decoder stage cores, the model stages with the given batching settings."""
    return [
        build_stage("mel", model_dir=model_dir),
        build_stage("encoder", model_dir=model_dir, params=batch),
        build_stage("decoder", model_dir=model_dir, params=batch),
    ]


def run_ticks(
    chain: list, schedules: dict[str, Schedule], idle_rounds: int | None = None
) -> tuple[dict[str, list[int]], dict[str, str], list]:
    """Every stream pushes one chunk a tick from the tick it joins; each tick, each stage takes all the work
    waiting for it in one `step`, or with `idle_rounds` in one `step_round` followed by that many calls with no
    new work between ticks (as a stage process runs the rounds it kept while no input waits). Returns each
    stream's ids, the failures, and each stage's batch sizes."""
    ids: dict[str, list[int]] = {name: [] for name in schedules}
    failures: dict[str, StreamFailed] = {}
    ended: set[str] = set()
    batches: list[list[int]] = [[] for _ in chain]
    tick = 0
    last_input = max(s.joins + -(-len(s.audio) // s.chunk) for s in schedules.values())
    while len(ended) < len(schedules) or tick < last_input:
        work = []
        for name, schedule in schedules.items():
            index = tick - schedule.joins
            chunks = -(-len(schedule.audio) // schedule.chunk)
            if index == 0:
                work.append((name, StreamStart(schedule.delay_ms)))
            if 0 <= index < chunks:
                work.append((name, schedule.audio[index * schedule.chunk : (index + 1) * schedule.chunk]))
            if index == chunks - 1:
                work.append((name, END))
        outputs = []
        for round_work in [work] + [[]] * (idle_rounds or 0):
            for position, stage in enumerate(chain):
                starts = [(name, item) for name, item in round_work if isinstance(item, StreamStart)]
                round_work = starts + (stage.step(round_work) if idle_rounds is None else stage.step_round(round_work))
                batches[position].extend(stage.batch_sizes)
            outputs += round_work
        for name, item in outputs:
            if isinstance(item, StreamFailed):
                failures[name] = item
                ended.add(name)
            elif isinstance(item, StreamEnd):
                ended.add(name)
            elif not isinstance(item, StreamStart):
                ids[name].extend(int(i) for i in item)
        tick += 1
        assert tick < 10_000
    return ids, failures, batches


def alone(model_dir, schedule: Schedule) -> list[int]:
    """A stream's ids when it runs alone."""
    ids, failures, _ = run_ticks(model_chain(model_dir), {"alone": Schedule(schedule.audio, 0, schedule.delay_ms)})
    assert not failures
    return ids["alone"]


def transformers_ids(model_dir, hf_oracle, audio: np.ndarray, delay_ms: int) -> list[int]:
    """The oracle's greedy ids for a stream with this delay."""
    model = ModelDir(model_dir)
    num_delay = delay_tokens(delay_ms)
    prompt = streaming_prompt(model.tekken, num_delay)
    features = log_mel_frames(pad_audio(audio, model.tekken.audio.streaming_n_left_pad_tokens, num_delay))
    with torch.inference_mode():
        return (
            hf_oracle(model_dir)
            .generate(
                input_ids=torch.tensor([prompt]),
                input_features=torch.from_numpy(features.T[None].copy()),
                num_delay_tokens=num_delay,
                do_sample=False,
            )[0, len(prompt) :]
            .tolist()
        )


STREAMS = {
    "a": Schedule(speechlike_audio(2.4, seed=1), joins=0, delay_ms=480),
    "b": Schedule(speechlike_audio(1.2, seed=2), joins=3, delay_ms=160),
    "c": Schedule(speechlike_audio(3.0, seed=3), joins=5, delay_ms=1200),
    "d": Schedule(speechlike_audio(0.7, seed=4), joins=20, delay_ms=480),
}


def test_streams_of_different_lengths_and_delays_batched_give_their_ids_alone_and_the_oracles(
    small_window_model_dir, hf_oracle
) -> None:
    """Four streams join at different ticks, leave at different ticks (different lengths) and each has its own
    delay; the model stages run them in batches, and each stream's ids are its ids alone, and transformers'."""
    chain = model_chain(small_window_model_dir, max_streams=4)
    ids, failures, batches = run_ticks(chain, STREAMS)
    assert not failures
    assert max(batches[1]) >= 3 and max(batches[2]) >= 3  # really batched, in the encoder and the decoder
    for name, schedule in STREAMS.items():
        expected = transformers_ids(small_window_model_dir, hf_oracle, schedule.audio, schedule.delay_ms)
        assert len(set(expected)) >= 3
        assert ids[name] == alone(small_window_model_dir, schedule) == expected, name
    assert len({tuple(i) for i in ids.values()}) == len(STREAMS)


@pytest.fixture(scope="module")
def solo_ids(tiny_model_dir) -> dict[str, list[int]]:
    return {name: alone(tiny_model_dir, schedule) for name, schedule in STREAMS.items()}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    joins=st.lists(st.integers(0, 30), min_size=4, max_size=4),
    chunks=st.lists(st.sampled_from([CHUNK, 2 * CHUNK, 3000]), min_size=4, max_size=4),
    max_streams=st.integers(1, 4),
    idle_rounds=st.sampled_from([None, 0, 1, 3]),
)
def test_any_arrival_and_departure_schedule_gives_each_stream_its_ids_alone(
    tiny_model_dir, solo_ids, joins, chunks, max_streams, idle_rounds
) -> None:
    """Random join ticks, chunk sizes (so departures move too), ceilings (streams past it wait), and whether the
    stages take each tick's work whole or a round at a time (the rest in rounds between ticks)."""
    schedules = {
        name: Schedule(schedule.audio, join, schedule.delay_ms, chunk)
        for (name, schedule), join, chunk in zip(STREAMS.items(), joins, chunks, strict=True)
    }
    chain = model_chain(tiny_model_dir, max_streams=max_streams)
    ids, failures, _ = run_ticks(chain, schedules, idle_rounds)
    assert not failures
    assert ids == solo_ids


def test_a_round_at_a_time_keeps_a_burst_for_later_calls_which_other_streams_join(tiny_model_dir, solo_ids) -> None:
    """Stream "a" arrives whole in one item with its end (a burst of many positions); "b" arrives 80 ms a tick.
    `step_round` steps each stream once a call and keeps the rest (`has_work`, `backlog`), so each of b's ticks
    runs in a batch with a's next position instead of after all of a's; both keep their ids alone."""
    mel, encoder, decoder = model_chain(tiny_model_dir, max_streams=2)
    a, b = STREAMS["a"].audio, STREAMS["b"].audio
    work = [("a", StreamStart(480)), ("a", a), ("a", END), ("b", StreamStart(160))]
    ids: dict[str, list[int]] = {"a": [], "b": []}
    ended, batches, tick = set(), [], 0
    while ended != {"a", "b"}:
        if tick * CHUNK < len(b):
            work.append(("b", b[tick * CHUNK : (tick + 1) * CHUNK]))
            if (tick + 1) * CHUNK >= len(b):
                work.append(("b", END))
        starts = [(name, item) for name, item in work if isinstance(item, StreamStart)]
        encoded = encoder.step_round(mel.step(work))
        for name, item in decoder.step_round(starts + encoded):
            if isinstance(item, StreamEnd):
                ended.add(name)
            else:
                ids[name].extend(int(i) for i in item)
        batches.append(decoder.batch_sizes)
        if tick == 0:
            assert encoder.has_work and encoder.backlog > 0  # a's pieces past the first wait for later calls
        work, tick = [], tick + 1
        assert tick < 1000
    assert ids == {"a": solo_ids["a"], "b": solo_ids["b"]}
    assert max(len(sizes) for sizes in batches) <= 2  # a call: at most a prefill and one step
    assert sum(2 in sizes for sizes in batches) >= 5  # b's positions batched with a's burst
    assert not (encoder.has_work or decoder.has_work) and encoder.backlog == decoder.backlog == 0


@pytest.mark.parametrize(("piece_frames", "rounds"), [(8, 33), (128, 3)], ids=["graphs", "no_graphs"])
def test_a_joining_streams_first_item_steps_in_whole_tokens_beside_the_others(tiny_model_dir, piece_frames, rounds):
    """A joining stream's first item (the left pad's 33 tokens of mel frames) runs a piece a round, in the same
    batched step as the others' 80 ms items when the pieces are a token (as with CUDA graphs), so the others'
    tick does not wait for it; the rounds after (no new work) run the rest, with what the item gives at once."""
    encoder = build_stage("encoder", model_dir=tiny_model_dir, params={"max_streams": 2})
    encoder.piece_frames = piece_frames
    rng = np.random.default_rng(0)
    first = rng.standard_normal((264, 128)).astype(np.float32)  # the left pad's frames and 80 ms
    tick = rng.standard_normal((8, 128)).astype(np.float32)
    alone = np.concatenate([frames for _, frames in encoder.step([("x", first)])])
    outputs = encoder.step_round([("x", tick), ("y", first)])
    assert [name for name, _ in outputs] == ["x", "y"] and encoder.has_work
    assert encoder.batch_sizes == ([2] if piece_frames == MEL_FRAMES_PER_TOKEN else [1, 1])
    later, taken = [outputs[1]], 1
    while encoder.has_work:
        later += encoder.step_round([])
        taken += 1
    assert taken == rounds and {name for name, _ in later} == {"y"}
    np.testing.assert_array_equal(np.concatenate([frames for _, frames in later]), alone)


@pytest.mark.parametrize("piece_frames", [8, 128], ids=["graphs", "no_graphs"])
def test_items_of_any_size_step_in_whole_tokens_and_give_the_models_frames(tiny_model_dir, piece_frames) -> None:
    """Items that cut tokens anywhere: frames short of a token wait for the next item, every step but the stream's
    last takes whole tokens (at most `piece_frames`), and the stream's last few frames step at its end; together
    they are the frames the model's forward gives for the whole input."""
    encoder = build_stage("encoder", model_dir=tiny_model_dir, params={"max_streams": 2})
    encoder.piece_frames = piece_frames
    rng = np.random.default_rng(1)
    mel = rng.standard_normal((75, 128)).astype(np.float32)
    frames, sizes = [], set()
    for start, end in itertools.pairwise([0, 3, 4, 17, 30, 31, 60, 75]):
        frames += [out for _, out in encoder.step([("x", mel[start:end])])]
        sizes |= {key[0][1] for key in encoder._steps}
    frames += [out for _, out in encoder.step([("x", END)]) if isinstance(out, np.ndarray)]
    assert sizes and all(size % MEL_FRAMES_PER_TOKEN == 0 and size <= piece_frames for size in sizes)
    assert {key[0][1] for key in encoder._steps} == sizes | {75 % MEL_FRAMES_PER_TOKEN}
    expected = encoder.encoder(torch.from_numpy(mel)[None], encoder.encoder.new_state())[0].numpy()
    np.testing.assert_allclose(np.concatenate(frames), expected, rtol=1e-4, atol=1e-5)
    assert encoder.streams() == []


def test_a_prompts_prefill_gives_way_once_to_a_rounds_80_ms_steps(tiny_model_dir) -> None:
    """A joining stream's prefill waits for the next round when the round steps other streams' positions; the
    next call (no new work) runs it."""
    rng = np.random.default_rng(0)
    decoder = build_stage("decoder", model_dir=tiny_model_dir, params={"max_streams": 2})
    groups = rng.standard_normal((len(decoder.prompt) + 1, 4, decoder.decoder.params.encoder.dim)).astype(np.float32)
    prompt_frames = groups[:-1].reshape(-1, groups.shape[-1])
    assert len(decoder.step([("x", prompt_frames)])) == 1  # x's prefill: its first id
    outputs = decoder.step_round([("x", groups[-1]), ("y", prompt_frames)])
    assert [name for name, _ in outputs] == ["x"] and decoder.has_work
    assert [name for name, _ in decoder.step_round([])] == ["y"] and not decoder.has_work


def test_padding_rows_of_a_bucket_touch_no_streams_memory(tiny_model_dir, solo_ids) -> None:
    """Batches padded to power-of-two buckets, as CUDA graphs run them: the padding rows compute in the scratch
    row and page, and every stream keeps its ids alone."""
    chain = model_chain(tiny_model_dir, max_streams=4)
    for stage in chain[1:]:
        stage.bucket = lambda count: 1 << (count - 1).bit_length()
    ids, failures, batches = run_ticks(chain, STREAMS)
    assert not failures and ids == solo_ids
    assert 3 in batches[1]  # a batch of 3 ran in a bucket of 4
    # Buckets 1, 2 and 4 of each kind of step (80 ms steps, pieces of other sizes, prompts), none other.
    assert {bucket for steps in (chain[1]._steps, chain[2]._steps) for *_, bucket in steps} <= {1, 2, 4}


def test_capturing_every_bucket_and_span_mid_run_touches_no_streams_memory(tiny_model_dir, solo_ids) -> None:
    """`capture_all` runs every bucket's step at every cache span (eagerly on the CPU, as a capture's warm-up runs
    it) in padding rows only: done while streams are open, their ids are still their ids alone."""
    chain = model_chain(tiny_model_dir, max_streams=4)
    for stage in chain[1:]:
        stage.bucket = lambda count: 1 << (count - 1).bit_length()
        step, calls = stage.step, []

        def step_then_capture(work, stage=stage, step=step, calls=calls):
            calls.append(len(work))
            if len(calls) == 12:  # streams a, b and c are open by then
                pages = stage.pool.pages_in_use
                stage.capture_all()
                assert stage.pool.pages_in_use == pages
            return step(work)

        stage.step = step_then_capture
    ids, failures, _ = run_ticks(chain, STREAMS)
    assert not failures and ids == solo_ids
    prompt = len(chain[2].prompt)
    assert {key for key in chain[1]._steps if key[0] == ("step", 8)} == {(("step", 8), b) for b in (1, 2, 4)}
    assert {key for key in chain[2]._steps if key[0] in ("step", ("prefill", prompt))} == {
        (kind, bucket) for kind in ("step", ("prefill", prompt)) for bucket in (1, 2, 4)
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_with_capture_all_no_stream_waits_for_a_capture(tiny_model_dir) -> None:
    """On a GPU, streams of the default delay joining and leaving at different ticks meet no step shape the start
    did not capture: the 80 ms steps' graphs (a stream's first and last items step a token at a time too) and the
    default prompt's prefill were captured at start."""
    params = {"max_streams": 4, "capture_all": True, "fused_kernels": False}  # the tiny dims fit no kernel launch
    chain = [build_stage("mel", model_dir=tiny_model_dir)] + [
        build_stage(kind, model_dir=tiny_model_dir, device="cuda", params=params) for kind in ("encoder", "decoder")
    ]
    schedules = {"a": STREAMS["a"], "d": STREAMS["d"], "e": Schedule(speechlike_audio(1.9, seed=5), joins=2)}
    _, failures, _ = run_ticks(chain, schedules)
    assert not failures
    assert [stage.graph_captures()["captured"] for stage in chain[1:]] == [0, 0]


def test_a_stream_past_the_ceiling_is_refused_and_the_others_go_on(tiny_model_dir, solo_ids) -> None:
    chain = model_chain(tiny_model_dir, max_streams=2, when_full="refuse")
    ids, failures, _ = run_ticks(chain, {name: STREAMS[name] for name in "abc"})
    assert list(failures) == ["c"]
    assert failures["c"] == StreamFailed(
        "encoder at capacity (2 of 2 streams, 6 of 26 KV pages in use)", at_capacity=True
    )
    assert ids["a"] == solo_ids["a"] and ids["b"] == solo_ids["b"]
    assert all(stage.streams() == [] for stage in chain)


def test_a_stream_past_the_ceiling_waits_for_a_row_when_asked(tiny_model_dir, solo_ids) -> None:
    schedules = {name: STREAMS[name] for name in "abc"}
    ids, failures, batches = run_ticks(model_chain(tiny_model_dir, max_streams=2, when_full="wait"), schedules)
    assert not failures
    assert ids == {name: solo_ids[name] for name in "abc"}
    assert max(batches[1]) == 2


def test_a_stream_that_outgrows_the_kv_memory_fails_alone(tiny_model_dir, solo_ids) -> None:
    """A decoder pool of one page (64 positions) and reservations of 0.2 s: "a" takes the page, "b" waits for
    room; "a" needs a second page (its 70th position) and fails with a message, which frees its page at once,
    and "b" then runs with its ids alone."""
    chain = model_chain(tiny_model_dir, max_streams=2, reserve_s=0.2)
    settings = {"max_streams": 2, "reserve_s": 0.2, "kv_memory_gb": 1e-9}
    chain[2] = build_stage("decoder", model_dir=tiny_model_dir, params=settings)
    assert chain[2].pool.total_pages == 1
    ids, failures, _ = run_ticks(chain, {name: STREAMS[name] for name in "ab"})
    assert failures == {"a": StreamFailed("decoder: KV memory full: a stream needs a page and all 1 are in use")}
    assert ids["b"] == solo_ids["b"]
    assert chain[2].pool.pages_in_use == 0


def test_an_encoder_stream_that_outgrows_the_kv_memory_fails_alone(tiny_model_dir, solo_ids) -> None:
    """An encoder pool of 6 pages (a's 312 frames take 5, b's 236 take 4) and reservations of 0.2 s: both streams
    start and grow until the pool runs dry; the one that then needs a page fails with a message, its pages freed
    at once, and the other runs on to its ids alone."""
    chain = model_chain(tiny_model_dir, max_streams=2)
    pages = 6
    chain[1] = EncoderStage(chain[1].encoder, max_streams=2, kv_pages=pages, reserve_s=0.2)
    ids, failures, _ = run_ticks(chain, {name: STREAMS[name] for name in "ab"})
    (failed,) = failures
    message = f"encoder: KV memory full: a stream needs a page and all {pages} are in use"
    assert failures[failed] == StreamFailed(message)
    (other,) = set("ab") - {failed}
    assert ids[other] == solo_ids[other]
    assert chain[1].pool.pages_in_use == 0


def test_a_stream_started_with_the_default_reservation_has_its_whole_ring(tiny_model_dir) -> None:
    """Without reserve_s a stream sets aside every page its ring can hold, so streams admitted together never run
    the pool dry."""
    for stage in model_chain(tiny_model_dir, max_streams=2)[1:]:
        assert stage.pool.pages_for(stage.reserve_positions) == stage.pool.pages_per_stream


def test_kv_memory_returns_to_zero_and_hundreds_of_short_streams_leave_no_state(tiny_model_dir) -> None:
    """25 rounds of 8 streams joining at different ticks: whatever a stream leaves behind would pile up."""
    chain = model_chain(tiny_model_dir, max_streams=4)
    pools = [chain[1].pool, chain[2].pool]
    short = speechlike_audio(0.3, seed=9)
    for first in range(0, 200, 8):
        schedules = {f"s{index}": Schedule(short, joins=index % 8) for index in range(first, first + 8)}
        run_ticks(chain, schedules)
        assert all(pool.pages_in_use == 0 and pool.rows_in_use == 0 for pool in pools)
    assert all(stage.streams() == [] for stage in chain)
    assert all(stage.kv_usage() == {"pages_in_use": 0, "pages": stage.pool.total_pages} for stage in chain[1:])
    assert all(len(stage._failed) == 0 and len(stage._steps) <= 8 for stage in chain[1:])
    assert len(chain[2]._scales) == 1


def test_settings_that_do_not_fit_are_one_line(tiny_model_dir) -> None:
    with pytest.raises(StageError, match="cuda_graphs needs a CUDA device"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"cuda_graphs": True})
    with pytest.raises(StageError, match="unknown setting 'cache'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"cache": "static"})
    with pytest.raises(StageError, match=r"max_streams must be an integer in 1..1024, got 0"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"max_streams": 0})
    with pytest.raises(StageError, match="when_full must be one of wait, refuse, got 'drop'"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"when_full": "drop"})
    with pytest.raises(StageError, match="kv_memory_gb must be a number > 0, got 'lots'"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"kv_memory_gb": "lots"})
    with pytest.raises(StageError, match="capture_all must be true or false, got 'yes'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"capture_all": "yes"})


def test_bad_input_fails_its_stream_only(tiny_model_dir) -> None:
    encoder = build_stage("encoder", model_dir=tiny_model_dir, params={"max_streams": 2})
    good = np.zeros((8, 128), np.float32)
    outputs = encoder.step([("bad", np.zeros((8, 5), np.float32)), ("good", good), ("bad", good)])
    assert outputs[0] == ("bad", StreamFailed("encoder: expected mel frames of shape [k, 128], got [8, 5]"))
    assert [name for name, _ in outputs] == ["bad", "good"]
    assert encoder.streams() == ["good"]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("capture_all", [False, True], ids=["one_stream", "capture_all"])
def test_warm_up_leaves_no_stream(tiny_model_dir, kind, capture_all) -> None:
    stage = build_stage(kind, model_dir=tiny_model_dir, params={"max_streams": 3})
    stage.warm_up(capture_all)
    assert stage.streams() == [] and stage.pool.pages_in_use == 0 and stage.pool.rows_in_use == 0
    assert torch.is_inference_mode_enabled() is False
    assert {bucket for _, bucket in stage._steps} == ({1, 2, 3} if capture_all else {1})


def test_8_bit_kv_caches_and_decoder_weights_run_and_say_so(tiny_model_dir) -> None:
    """`kv_dtype: fp8` on both model stages, `weights: fp8` and `lm_head: fp8` on the decoder (eager on the CPU):
    two streams batched decode as many positions as in float32, and each stage reports what it computes in.
    Accuracy is the kernels' and the model's tests' (bounds from e4m3's rounding), not this one's."""
    fp8 = model_chain(tiny_model_dir, max_streams=2, kv_dtype="fp8")
    params = {"kv_dtype": "fp8", "weights": "fp8", "lm_head": "fp8"}
    fp8[2] = build_stage("decoder", model_dir=tiny_model_dir, params=params)
    schedules = {f"s{index}": Schedule(speechlike_audio(0.6, seed=index), joins=index) for index in range(2)}
    ids, failures, _ = run_ticks(fp8, schedules)
    float_ids, _, _ = run_ticks(model_chain(tiny_model_dir, max_streams=2), schedules)
    assert not failures and {name: len(i) for name, i in ids.items()} == {n: len(i) for n, i in float_ids.items()}
    assert fp8[1].settings() == {"dtype": "float32", "kv_dtype": "fp8", "weights": "float32"}
    assert fp8[2].settings() == {"dtype": "float32", "kv_dtype": "fp8", "weights": "fp8", "lm_head": "fp8"}
    assert build_stage("mel", model_dir=tiny_model_dir).settings() == {}


def test_8_bit_settings_that_do_not_fit_are_one_line(tiny_model_dir) -> None:
    with pytest.raises(StageError, match="kv_dtype must be one of auto, fp8, got 'int8'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"kv_dtype": "int8"})
    with pytest.raises(StageError, match="weights must be one of auto, fp8, got 'fp4'"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"weights": "fp4"})
    with pytest.raises(StageError, match="unknown setting 'weights'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"weights": "fp8"})
    with pytest.raises(StageError, match="weights: fp8 runs with dtype bfloat16 or float32, not float16"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"weights": "fp8", "dtype": "float16"})
    with pytest.raises(StageError, match="lm_head: fp8 runs with dtype bfloat16 or float32, not float16"):
        build_stage("decoder", model_dir=tiny_model_dir, params={"lm_head": "fp8", "dtype": "float16"})
    with pytest.raises(StageError, match="unknown setting 'lm_head'"):
        build_stage("encoder", model_dir=tiny_model_dir, params={"lm_head": "fp8"})
