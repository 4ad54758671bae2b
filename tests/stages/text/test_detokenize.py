"""Incremental detokenizer against mistral-common's Tekkenizer, and the detokenize stage's events."""

from __future__ import annotations

from pathlib import Path

import mistral_common
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from tests.conftest import is_utf8
from voxtral_run.stages.audio.constants import SAMPLE_RATE, SAMPLES_PER_TOKEN
from voxtral_run.stages.base import StageError
from voxtral_run.stages.text.detokenize import DetokenizeStage, IncrementalDetokenizer
from voxtral_run.stages.text.tekken import Tekken, load_tekken
from voxtral_run.tools.tiny_tekken import write_streaming_tekken

BUNDLED_TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
REPLACEMENT = "\ufffd"
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tekken, Tekkenizer]:
    """The real 150000-token tekken vocab (mistral-common's bundled file) with this model's specials."""
    path = tmp_path_factory.mktemp("real") / "tekken.json"
    write_streaming_tekken(BUNDLED_TEKKEN, path)
    return load_tekken(path), Tekkenizer.from_file(path)


@pytest.fixture(scope="module")
def tekken(real: tuple[Tekken, Tekkenizer]) -> Tekken:
    return real[0]


@pytest.fixture(scope="module")
def partial(tekken: Tekken) -> list[int]:
    return partial_ids(tekken)


def byte_id(tekken: Tekken, value: int) -> int:
    """The id of the single-byte token `value` (ranks 0..255 are the bytes)."""
    return tekken.num_special + value


def partial_ids(tekken: Tekken) -> list[int]:
    """Ids whose bytes are not valid UTF-8 on their own: pieces of a character split across tokens."""
    return [rank + tekken.num_special for rank, token in enumerate(tekken.token_bytes) if not is_utf8(token)]


def token_time(index: int) -> float:
    """Start in seconds of real-audio token `index`, from samples (independent of the stage's constant)."""
    return index * SAMPLES_PER_TOKEN / SAMPLE_RATE


def split_at(ids: list[int], cuts: set[int]) -> list[list[int]]:
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(ids)), len(ids)]
    return [ids[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def normal_id_runs(tekken: Tekken, partial: list[int]) -> st.SearchStrategy[list[int]]:
    """Runs of normal ids, rich in stray and partial UTF-8 bytes."""
    any_normal = st.integers(tekken.num_special, tekken.vocab_size - 1)
    high_bytes = st.integers(byte_id(tekken, 0x80), byte_id(tekken, 0xFF))
    return st.lists(st.one_of(any_normal, st.sampled_from(partial), high_bytes), max_size=40)


def decode_in_chunks(tekken: Tekken, chunks: list[list[int]]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tekken)
    return [detokenizer.feed(np.array(chunk, dtype=np.int64)) for chunk in chunks] + [detokenizer.flush()]


def test_the_real_vocab_has_partial_utf8_tokens(partial: list[int]) -> None:
    assert len(partial) > 1000


@PROPERTY_SETTINGS
@given(data=st.data())
def test_equals_mistral_common_decode_in_any_chunking(
    real: tuple[Tekken, Tekkenizer], partial: list[int], data: st.DataObject
) -> None:
    tekken, reference = real
    ids = data.draw(normal_id_runs(tekken, partial), label="ids")
    cuts = data.draw(st.sets(st.integers(1, max(1, len(ids) - 1))), label="cuts")
    expected = reference.decode(ids)
    assert "".join(decode_in_chunks(tekken, [ids])) == expected
    assert "".join(decode_in_chunks(tekken, split_at(ids, cuts))) == expected
    assert "".join(decode_in_chunks(tekken, [[token_id] for token_id in ids])) == expected


@st.composite
def text_as_streamed_ids(draw: st.DrawFn, real: tuple[Tekken, Tekkenizer]) -> tuple[str, list[int]]:
    """Valid text, tokenized by the reference BPE, some tokens exploded into single bytes (splitting
    characters), with special tokens dropped in anywhere (also between the bytes of one character)."""
    tekken, reference = real
    characters = st.characters(exclude_categories=("Cs",), exclude_characters=REPLACEMENT)
    text = draw(st.text(characters, max_size=30))
    specials = st.sampled_from([tekken.streaming_pad_id, tekken.streaming_word_id, tekken.bos_id, 500])
    ids: list[int] = []
    for token_id in reference.encode(text, bos=False, eos=False):
        pieces = [token_id]
        if draw(st.booleans()):
            pieces = [byte_id(tekken, value) for value in tekken.bytes_of(token_id)]
        for piece in pieces:
            ids.extend(draw(st.lists(specials, max_size=2)))
            ids.append(piece)
    ids.extend(draw(st.lists(specials, max_size=2)))
    return text, ids


@PROPERTY_SETTINGS
@given(data=st.data())
def test_streaming_never_garbles_a_character_that_completes_later(
    real: tuple[Tekken, Tekkenizer], data: st.DataObject
) -> None:
    tekken, _ = real
    text, ids = data.draw(text_as_streamed_ids(real))
    detokenizer = IncrementalDetokenizer(tekken)
    pieces = [detokenizer.feed([token_id]) for token_id in ids]
    assert not any(REPLACEMENT in piece for piece in pieces)
    assert "".join(pieces) == text
    assert detokenizer.flush() == ""

    stage = DetokenizeStage(tekken)
    cuts = data.draw(st.sets(st.integers(1, max(1, len(ids) - 1))), label="cuts")
    events = [event for chunk in split_at(ids, cuts) for event in stage.push("s", np.array(chunk))]
    events += stage.finish("s")
    assert "".join(event["text"] for event in events[:-1]) == text
    assert events[-1] == {"type": "done", "text": text, "token_ids": ids}


def test_special_token_between_the_bytes_of_one_character(real: tuple[Tekken, Tekkenizer]) -> None:
    tekken, reference = real
    ids = [byte_id(tekken, 0xC3), tekken.streaming_pad_id, byte_id(tekken, 0xA9)]  # "é" = C3 A9
    detokenizer = IncrementalDetokenizer(tekken)
    assert [detokenizer.feed([token_id]) for token_id in ids] == ["", "", "é"]
    assert IncrementalDetokenizer(tekken).feed(ids) == "é"
    # mistral-common decodes each run between specials on its own; we drop specials first on purpose.
    assert reference.decode(ids) == REPLACEMENT * 2
    assert reference.decode([ids[0], ids[2]]) == "é"


@pytest.mark.parametrize("num_bytes", [1, 2, 3])
def test_flush_replaces_an_incomplete_character(real: tuple[Tekken, Tekkenizer], num_bytes: int) -> None:
    tekken, reference = real
    ids = [byte_id(tekken, value) for value in "🎤".encode()[:num_bytes]]
    detokenizer = IncrementalDetokenizer(tekken)
    assert detokenizer.feed([byte_id(tekken, ord("a")), *ids]) == "a"
    assert detokenizer.pending_bytes == num_bytes
    assert detokenizer.flush() == REPLACEMENT == reference.decode(ids)
    assert detokenizer.pending_bytes == 0
    assert detokenizer.flush() == ""
    assert detokenizer.feed([byte_id(tekken, ord("b"))]) == "b"


def test_invalid_bytes_are_replaced_at_once(tekken: Tekken) -> None:
    detokenizer = IncrementalDetokenizer(tekken)
    assert detokenizer.feed([byte_id(tekken, 0x80)]) == REPLACEMENT  # a continuation byte cannot start one
    assert detokenizer.feed([byte_id(tekken, 0xC3)]) == ""
    assert detokenizer.feed([byte_id(tekken, ord("x"))]) == REPLACEMENT + "x"  # lead byte without its tail


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.array([-1]), "token id -1 is outside the vocabulary 0..131071"),
        (np.array([131072]), "token id 131072 is outside"),
        (np.array([1.0]), "must be a 1-D integer array, got float64"),
        (np.array([True]), "must be a 1-D integer array, got bool"),
        (np.zeros((2, 2), dtype=np.int64), "shape (2, 2)"),
        ([[1, 2], [3]], "must be a 1-D integer array"),
        ({"ids": [1]}, "got object of shape ()"),
    ],
)
def test_bad_ids_are_rejected(tekken: Tekken, ids: object, message: str) -> None:
    with pytest.raises(StageError) as error:
        IncrementalDetokenizer(tekken).feed(ids)
    assert message in str(error.value)
    stage = DetokenizeStage(tekken)
    stage.push("mic", np.array([byte_id(tekken, 0xC3)]))
    with pytest.raises(StageError) as error:
        stage.push("mic", ids)
    assert str(error.value).startswith("detokenize: stream mic: ") and message in str(error.value)
    # the bad push changed nothing: the held-back byte still completes
    assert stage.push("mic", np.array([byte_id(tekken, 0xA9)]))[0]["text"] == "é"
    assert stage.finish("mic")[-1]["token_ids"] == [byte_id(tekken, 0xC3), byte_id(tekken, 0xA9)]


def test_stage_events_carry_times_and_ids(tekken: Tekken) -> None:
    pad, word = tekken.streaming_pad_id, tekken.streaming_word_id
    a, lead, tail, e2 = (byte_id(tekken, value) for value in (ord("a"), 0xC3, 0xA9, 0xE2))
    ids = [pad, a, lead, word, tail, pad, e2]
    stage = DetokenizeStage(tekken)
    events = stage.push("s", np.array(ids, dtype=np.int32))
    assert events == [
        {
            "type": "delta",
            "text": "a",
            "token_ids": [pad, a],
            "start_s": token_time(1),
            "end_s": token_time(2),
        },
        {
            "type": "delta",
            "text": "é",
            "token_ids": [lead, word, tail],
            "start_s": token_time(2),
            "end_s": token_time(5),
        },
    ]
    assert stage.streams() == ["s"]
    assert stage.finish("s") == [
        {
            "type": "delta",
            "text": REPLACEMENT,
            "token_ids": [pad, e2],
            "start_s": token_time(6),
            "end_s": token_time(7),
        },
        {"type": "done", "text": "aé" + REPLACEMENT, "token_ids": ids},
    ]
    assert stage.streams() == []


def test_delta_starts_at_the_token_that_began_its_character(tekken: Tekken) -> None:
    """A token ending in a lead byte gives its text at once; the character it began is timed from it."""
    split = next(
        rank + tekken.num_special
        for rank, token in enumerate(tekken.token_bytes)
        if len(token) >= 2 and token[:-1].isascii() and 0xC2 <= token[-1] <= 0xDF
    )
    prefix, lead = tekken.bytes_of(split)[:-1], tekken.bytes_of(split)[-1]
    tail = byte_id(tekken, 0xA9)
    stage = DetokenizeStage(tekken)
    events = stage.push("s", np.array([tekken.streaming_pad_id, split, tekken.streaming_word_id, tail]))
    character = bytes([lead, 0xA9]).decode()
    assert [(e["text"], e["start_s"], e["end_s"]) for e in events] == [
        (prefix.decode(), token_time(1), token_time(2)),
        (character, token_time(1), token_time(4)),
    ]
    assert events[0]["token_ids"] == [tekken.streaming_pad_id, split]
    assert events[1]["token_ids"] == [tekken.streaming_word_id, tail]


def test_trailing_specials_appear_only_in_done(tekken: Tekken) -> None:
    stage = DetokenizeStage(tekken)
    ids = [byte_id(tekken, ord("h")), byte_id(tekken, ord("i")), tekken.streaming_pad_id, tekken.eos_id]
    deltas = stage.push("s", np.array(ids))
    assert [delta["text"] for delta in deltas] == ["h", "i"]
    assert stage.finish("s") == [{"type": "done", "text": "hi", "token_ids": ids}]
    assert all(type(token_id) is int for delta in deltas for token_id in delta["token_ids"])


def test_finish_of_an_unknown_stream_is_an_empty_done(tekken: Tekken) -> None:
    assert DetokenizeStage(tekken).finish("never") == [{"type": "done", "text": "", "token_ids": []}]


def run_alone(tekken: Tekken, chunks: list[list[int]]) -> list[dict]:
    stage = DetokenizeStage(tekken)
    events = [event for chunk in chunks for event in stage.push("only", np.array(chunk, dtype=np.int64))]
    return events + stage.finish("only")


@PROPERTY_SETTINGS
@given(data=st.data())
def test_events_do_not_depend_on_chunking(tekken: Tekken, partial: list[int], data: st.DataObject) -> None:
    specials = st.sampled_from([tekken.streaming_pad_id, tekken.streaming_word_id])
    ids = data.draw(
        st.lists(
            st.one_of(specials, st.sampled_from(partial), st.integers(1000, 131071)),
            max_size=30,
        ),
        label="ids",
    )
    cuts = data.draw(st.sets(st.integers(1, max(1, len(ids) - 1))), label="cuts")
    whole = run_alone(tekken, [ids])
    assert run_alone(tekken, split_at(ids, cuts)) == whole
    assert run_alone(tekken, [[token_id] for token_id in ids]) == whole
    deltas, done = whole[:-1], whole[-1]
    in_deltas = [token_id for delta in deltas for token_id in delta["token_ids"]]
    assert in_deltas == ids[: len(in_deltas)]
    assert all(tekken.is_special(token_id) for token_id in ids[len(in_deltas) :])  # bytes always make text
    assert done["token_ids"] == ids
    assert done["text"] == "".join(delta["text"] for delta in deltas)
    ends = [delta["end_s"] for delta in deltas]
    assert ends == sorted(ends) and all(delta["start_s"] < delta["end_s"] for delta in deltas)


def test_interleaved_streams_are_independent(tekken: Tekken, partial: list[int]) -> None:
    rng = np.random.default_rng(7)
    pool = [tekken.streaming_pad_id, tekken.streaming_word_id, *partial[:200], *range(1000, 1300)]
    streams = {name: rng.choice(pool, size=60).tolist() for name in ("left", "right")}
    cuts = {name: set(rng.integers(1, 60, size=12).tolist()) for name in streams}
    chunked = {name: split_at(ids, cuts[name]) for name, ids in streams.items()}
    stage = DetokenizeStage(tekken)
    events: dict[str, list[dict]] = {name: [] for name in streams}
    for index in range(max(len(chunks) for chunks in chunked.values())):
        for name, chunks in chunked.items():
            if index < len(chunks):
                events[name] += stage.push(name, np.array(chunks[index]))
    assert sorted(stage.streams()) == ["left", "right"]
    events["left"] += stage.finish("left")
    assert stage.streams() == ["right"]
    events["right"] += stage.finish("right")
    for name, chunks in chunked.items():
        assert events[name] == run_alone(tekken, chunks)
        assert events[name][-1]["token_ids"] == streams[name]


def test_a_finished_stream_id_starts_afresh(tekken: Tekken) -> None:
    stage = DetokenizeStage(tekken)
    stage.push("s", np.array([tekken.streaming_pad_id] * 5 + [byte_id(tekken, 0xC3)]))
    stage.finish("s")
    events = stage.push("s", np.array([byte_id(tekken, ord("z"))]))
    assert events == [
        {
            "type": "delta",
            "text": "z",
            "token_ids": [byte_id(tekken, ord("z"))],
            "start_s": 0.0,
            "end_s": token_time(1),
        }
    ]
