import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from voxtral_run.stages.base import StageError
from voxtral_run.stages.text.writers import FORMATS, MAX_CUE_CHARS, MAX_CUE_SECONDS, format_timestamp, open_writer

TOKEN_S = 0.08
TRANSCRIPT = (
    " Hello world. This is a test of the subtitle writer, with a long sentence that keeps going without"
    " any stop for quite a while so that cues must split on length! Café, naïve, 東京? Short one. Yes"
)


def delta(text: str, token_id: int, start_s: float, duration_s: float) -> dict:
    """A delta event of one token, its times rounded to the millisecond."""
    return {
        "type": "delta",
        "text": text,
        "token_ids": [token_id],
        "start_s": round(start_s, 3),
        "end_s": round(start_s + duration_s, 3),
    }


def synthetic_events(text: str = TRANSCRIPT, gap_every: int = 17) -> list[dict]:
    """Deltas of at most 3 characters (a word's first piece keeps its leading space), one token apart, with a
    pause now and then, and a done event."""
    events = []
    time_s = 0.32
    token_id = 1000
    for index, word in enumerate(re.findall(r"\s*\S+", text)):
        if index % gap_every == gap_every - 1:
            time_s += 1.5
        pieces = [word[i : i + 3] for i in range(0, len(word), 3)]
        for piece in pieces:
            events.append(delta(piece, token_id, time_s, TOKEN_S))
            time_s += TOKEN_S
            token_id += 1
    events.append({"type": "done", "text": text, "token_ids": list(range(1000, token_id))})
    return events


def written(fmt: str, events: list[dict]) -> str:
    stream = io.StringIO()
    writer = open_writer(fmt, None, stream)
    for event in events:
        writer.write(event)
    writer.close()
    return stream.getvalue()


TIMESTAMP = r"(\d\d):(\d\d):(\d\d){marker}(\d\d\d)"


def parse_subtitles(content: str, fmt: str) -> list[tuple[float, float, str]]:
    """(start_s, end_s, text) of each cue, checking the block layout of SRT or WebVTT."""
    if fmt == "vtt":
        assert content.startswith("WEBVTT\n\n")
        content = content[len("WEBVTT\n\n") :]
    stamp = TIMESTAMP.format(marker="," if fmt == "srt" else r"\.")
    cues = []
    blocks = content.split("\n\n")
    assert blocks[-1] == ""
    for number, block in enumerate(blocks[:-1], start=1):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines[0] == str(number)
            lines = lines[1:]
        match = re.fullmatch(f"{stamp} --> {stamp}", lines[0])
        assert match, lines[0]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        assert len(lines) == 2 and lines[1] == lines[1].strip() and lines[1]
        cues.append((start, end, lines[1]))
    return cues


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_cover_the_deltas_in_order(fmt: str) -> None:
    events = synthetic_events()
    deltas = [e for e in events if e["type"] == "delta"]
    cues = parse_subtitles(written(fmt, events), fmt)
    assert len(cues) > 5
    assert cues[0][0] == pytest.approx(deltas[0]["start_s"], abs=5e-4)
    assert cues[-1][1] == pytest.approx(deltas[-1]["end_s"], abs=5e-4)
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:], strict=False):
        assert start < end <= next_start
    assert " ".join(text for _, _, text in cues) == " ".join(events[-1]["text"].split())
    for start, end, text in cues:
        assert len(text) <= MAX_CUE_CHARS or " " not in text
        assert end - start <= MAX_CUE_SECONDS
        # Sentence ends close a cue: punctuation appears only at a cue's end.
        assert not re.search(r"[.?!](?!$)", text), text


def test_subtitle_cue_times_come_from_their_deltas() -> None:
    events = synthetic_events(" One. Two three.", gap_every=100)
    deltas = [e for e in events if e["type"] == "delta"]
    cues = parse_subtitles(written("srt", events), "srt")
    assert [text for _, _, text in cues] == ["One.", "Two three."]
    one = [d for d in deltas if d["text"] in (" On", "e.")]
    assert cues[0][:2] == pytest.approx((one[0]["start_s"], one[-1]["end_s"]), abs=5e-4)
    assert cues[1][:2] == pytest.approx((deltas[len(one)]["start_s"], deltas[-1]["end_s"]), abs=5e-4)


def test_slow_speech_splits_cues_by_duration() -> None:
    events = synthetic_events(" uh" * 30, gap_every=1)  # a 1.5 s pause before every word
    cues = parse_subtitles(written("vtt", events), "vtt")
    assert len(cues) > 1
    assert all(end - start <= MAX_CUE_SECONDS for start, end, _ in cues)
    assert all(len(text) < MAX_CUE_CHARS for _, _, text in cues)  # so duration alone split them
    assert " ".join(text for _, _, text in cues) == " ".join(["uh"] * 30)


CHINESE = (
    "今天我们来谈谈语音识别技术的发展历程以及它在日常生活中的各种应用场景，从最早的基于模板匹配的方法到后来的"
    "隐马尔可夫模型再到如今的端到端神经网络模型，每一次进步都让机器更好地理解人类的语言。实时转写系统需要在延迟"
    "和准确率之间取得平衡，这对模型的设计提出了很高的要求！你觉得未来的语音助手会变成什么样子？也许有一天它们能够"
    "像朋友一样和我们自然地交流、讨论问题、分享想法。"
)
JAPANESE = (
    "今日はリアルタイム音声認識について話しましょう。マイクから入ってくる音声を少しずつ処理して、話し終わるのを"
    "待たずにすぐに文字を表示するのがポイントです。「ちょっと待って」と言われても、システムはずっと聞き続けなければ"
    "なりません。スーパーコンピューターがなくても、ノートパソコン一台で動かせるようになったのは本当にすごいことだと"
    "思いませんか？"
)
PUNCTUATION = "。，、！？「」"


def cjk_events(text: str, seconds_per_delta: float = TOKEN_S, seed: int = 0) -> list[dict]:
    """Deltas as a tokenizer might cut text without spaces: each punctuation mark alone, other characters in
    runs of one to three, one after another with a 1.5 s pause now and then."""
    rng = np.random.default_rng(seed)
    pieces = []
    for run in re.findall(f"[{PUNCTUATION}]|[^{PUNCTUATION}]+", text):
        while run:
            size = int(rng.integers(1, 4))
            pieces.append(run[:size])
            run = run[size:]
    events = []
    time_s = 0.32
    for index, piece in enumerate(pieces):
        if index % 23 == 22:
            time_s += 1.5
        events.append(delta(piece, index, time_s, seconds_per_delta))
        time_s += seconds_per_delta
    events.append({"type": "done", "text": text, "token_ids": list(range(len(pieces)))})
    return events


@pytest.mark.parametrize("text", [CHINESE, JAPANESE], ids=["chinese", "japanese"])
@pytest.mark.parametrize("seconds_per_delta", [TOKEN_S, 0.4], ids=["fast", "slow"])
@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_text_without_spaces_splits_within_the_limits(fmt: str, text: str, seconds_per_delta: float) -> None:
    events = cjk_events(text, seconds_per_delta)
    deltas = events[:-1]
    cues = parse_subtitles(written(fmt, events), fmt)
    assert "".join(cue for _, _, cue in cues) == text
    assert cues[0][0] == pytest.approx(deltas[0]["start_s"], abs=5e-4)
    assert cues[-1][1] == pytest.approx(deltas[-1]["end_s"], abs=5e-4)
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:], strict=False):
        assert start < end <= next_start
    starts = {round(delta["start_s"], 3) for delta in deltas}
    for start, end, cue in cues:
        assert len(cue) <= MAX_CUE_CHARS and end - start <= MAX_CUE_SECONDS, cue
        assert round(start, 3) in starts  # cues begin where a delta begins: times are never interpolated
        assert cue[0] not in "。，、！？」ーっ", cue  # no cue starts with closing punctuation or a small kana
        assert not re.search("[。！？](?!$)", cue), cue  # sentence ends close a cue
    if seconds_per_delta > MAX_CUE_SECONDS / MAX_CUE_CHARS:
        assert max(len(cue) for _, _, cue in cues) < MAX_CUE_CHARS  # so duration split them


def one_token_each(pieces: list[str]) -> list[dict]:
    """A delta for each piece, one token (80 ms) after another."""
    return [delta(piece, i, i * TOKEN_S, TOKEN_S) for i, piece in enumerate(pieces)]


def cue_texts(deltas: list[dict]) -> list[str]:
    return [cue for _, _, cue in parse_subtitles(written("srt", deltas), "srt")]


def test_text_without_spaces_or_punctuation_splits_at_the_character_limit() -> None:
    deltas = one_token_each(list("语音识别" * 25))
    cues = parse_subtitles(written("srt", deltas), "srt")
    assert [len(cue) for _, _, cue in cues] == [MAX_CUE_CHARS, MAX_CUE_CHARS, 100 - 2 * MAX_CUE_CHARS]
    assert cues[1][:2] == pytest.approx((MAX_CUE_CHARS * TOKEN_S, 2 * MAX_CUE_CHARS * TOKEN_S), abs=5e-4)


def test_a_long_cjk_cue_splits_after_a_comma_in_its_second_half() -> None:
    late_comma = "甲" * 25 + "，" + "乙" * 30 + "。"
    assert cue_texts(one_token_each(list(late_comma))) == ["甲" * 25 + "，", "乙" * 30 + "。"]
    early_comma = "甲" * 5 + "，" + "乙" * 50 + "。"  # a 6-character cue would read badly: fill the cue instead
    assert cue_texts(one_token_each(list(early_comma))) == ["甲" * 5 + "，" + "乙" * 36, "乙" * 14 + "。"]


def test_latin_words_inside_cjk_text_are_not_split() -> None:
    # "我" * 38 + "iPh" would still fit in a cue, "我" * 38 + "iPhone" would not.
    deltas = one_token_each([*"我" * 38, "iPh", "one", "拍", "照"])
    assert cue_texts(deltas) == ["我" * 38, "iPhone拍照"]


def test_timestamps_round_trip() -> None:
    rng = np.random.default_rng(0)
    for seconds in [0.0, 1.234, 59.9996, 3599.9994, *rng.uniform(0, 40000, size=50)]:
        for marker in (",", "."):
            stamp = format_timestamp(seconds, marker)
            match = re.fullmatch(TIMESTAMP.format(marker=re.escape(marker)), stamp)
            assert match, stamp
            h, m, s, ms = map(int, match.groups())
            assert m < 60 and s < 60
            assert h * 3600 + m * 60 + s + ms / 1000 == pytest.approx(seconds, abs=5e-4)


def test_text_is_the_done_transcript_with_a_final_newline() -> None:
    events = synthetic_events()
    assert written("text", events) == events[-1]["text"].strip() + "\n"


def test_jsonl_round_trip_keeps_non_ascii() -> None:
    events = synthetic_events()
    events[0]["token_ids"] = [np.int64(1000)]  # ids and times straight from numpy arrays
    events[0]["end_s"] = np.float32(0.25)
    content = written("jsonl", events)
    assert "東京" in content
    lines = content.splitlines()
    assert [json.loads(line) for line in lines] == [
        {**e, "token_ids": [int(i) for i in e["token_ids"]], **({"end_s": 0.25} if e is events[0] else {})}
        for e in events
    ]


def test_jsonl_lines_reach_the_file_before_close(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    events = synthetic_events()
    writer = open_writer("jsonl", path)
    for count, event in enumerate(events[:5], start=1):
        writer.write(event)
        assert len(path.read_text(encoding="utf-8").splitlines()) == count
    writer.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_close_after_an_interrupt_writes_what_was_received(tmp_path: Path, fmt: str) -> None:
    events = synthetic_events()
    received = events[:20]
    path = tmp_path / f"out.{fmt}"
    with pytest.raises(KeyboardInterrupt), open_writer(fmt, path) as writer:
        for event in received:
            writer.write(event)
        raise KeyboardInterrupt
    content = path.read_text(encoding="utf-8")
    partial_text = "".join(e["text"] for e in received)
    if fmt == "text":
        assert content == partial_text.strip() + "\n"
    elif fmt == "jsonl":
        assert [json.loads(line) for line in content.splitlines()] == received
    else:
        cues = parse_subtitles(content, fmt)
        assert " ".join(text for _, _, text in cues) == " ".join(partial_text.split())
        assert cues[-1][1] == pytest.approx(received[-1]["end_s"], abs=5e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_transcript(fmt: str) -> None:
    content = written(fmt, [{"type": "done", "text": "", "token_ids": []}])
    expected = {
        "text": "\n",
        "jsonl": '{"type": "done", "text": "", "token_ids": []}\n',
        "srt": "",
        "vtt": "WEBVTT\n\n",
    }
    assert content == expected[fmt]


def test_given_stream_is_flushed_not_closed_and_file_is_closed(tmp_path: Path) -> None:
    stream = io.StringIO()
    writer = open_writer("text", None, stream)
    writer.close()
    writer.close()  # a second close does nothing
    assert not stream.closed and stream.getvalue() == "\n"
    with pytest.raises(StageError, match="write after close"):
        writer.write({"type": "done", "text": "", "token_ids": []})
    writer = open_writer("srt", tmp_path / "a.srt")
    writer.close()
    assert writer._out.closed


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture) -> None:
    writer = open_writer("text", None)
    writer.write({"type": "done", "text": " hi", "token_ids": [1]})
    writer.close()
    assert capsys.readouterr().out == "hi\n"


def test_unknown_format_lists_the_valid_ones() -> None:
    expected = "unknown transcript format 'docx'; valid formats: text, jsonl, srt, vtt"
    with pytest.raises(StageError, match=expected):
        open_writer("docx", None)


def test_unwritable_path_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="missing/out.srt: cannot write the transcript"):
        open_writer("srt", tmp_path / "missing" / "out.srt")


@pytest.mark.parametrize(
    "event",
    [
        "text",
        {"text": "hi"},
        {"type": "partial", "text": "hi"},
        {"type": "done"},
        {"type": "delta", "text": "hi", "start_s": 0.0},
        {"type": "delta", "text": "hi", "start_s": "0", "end_s": 0.08},
    ],
)
def test_bad_events_are_stage_errors(event: object) -> None:
    with pytest.raises(StageError, match="transcript writer"):
        open_writer("srt", None, io.StringIO()).write(event)
