"""tekken.json loading: the tiny writer, agreement with mistral-common, and every validation error."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.transcription.request import StreamingMode, TranscriptionRequest
from mistral_common.tokens.tokenizers.audio import Audio
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from tests.conftest import is_utf8
from voxtral_run.stages.audio.constants import SAMPLE_RATE
from voxtral_run.stages.base import CheckpointError
from voxtral_run.stages.text.tekken import load_tekken
from voxtral_run.tools.tiny_tekken import write_streaming_tekken, write_tiny_tekken

BUNDLED_TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tekken.json"
    write_tiny_tekken(path)
    return path


@pytest.mark.parametrize(
    ("num_normal_tokens", "delay_ms", "left_pad_tokens", "expected_delay_tokens"),
    [(1000, 480, 32, 6), (266, 80, 0, 1), (3000, 2400, 16, 30)],
)
def test_tiny_tekken_loads_with_real_ids_and_options(
    tmp_path: Path, num_normal_tokens: int, delay_ms: int, left_pad_tokens: int, expected_delay_tokens: int
) -> None:
    path = tmp_path / "tekken.json"
    options = {
        "num_normal_tokens": num_normal_tokens,
        "delay_ms": delay_ms,
        "left_pad_tokens": left_pad_tokens,
    }
    write_tiny_tekken(path, **options)
    tekken = load_tekken(path)
    assert (tekken.num_special, tekken.vocab_size) == (1000, 1000 + num_normal_tokens)
    assert len(tekken.token_bytes) == num_normal_tokens
    assert (tekken.bos_id, tekken.eos_id, tekken.streaming_pad_id, tekken.streaming_word_id) == (1, 2, 32, 33)
    named = {"<unk>": 0, "<pad>": 11, "[AUDIO]": 24, "[BEGIN_AUDIO]": 25, "[REPEAT_AUDIO_TEXT]": 34}
    assert {name: tekken.special_ids[name] for name in named} == named
    assert tekken.special_ids["<SPECIAL_500>"] == 500
    assert tekken.audio.transcription_delay_ms == delay_ms
    assert tekken.audio.streaming_n_left_pad_tokens == left_pad_tokens
    assert tekken.audio.num_delay_tokens == expected_delay_tokens
    assert tekken.audio.transcription_format == "streaming"


def test_tiny_tekken_has_merges_that_split_characters(tiny_path: Path) -> None:
    merges = load_tekken(tiny_path).token_bytes[256:]
    assert len(set(merges)) == len(merges) and all(len(token) > 1 for token in merges)

    partial = [token for token in merges if not is_utf8(token)]
    assert any(0xC0 <= token[-1] for token in partial)  # ends with the lead byte of a character
    assert any(0x80 <= token[0] < 0xC0 for token in partial)  # starts inside a character
    assert any(len(token.decode("utf-8", errors="ignore").encode()) < len(token) - 1 for token in partial)
    assert sum(is_utf8(token) and not token.isascii() for token in merges) > 10


def test_tiny_tekken_is_deterministic_per_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_tiny_tekken(tmp_path / f"{name}.json", seed=seed)
    first, again, other = (load_tekken(tmp_path / f"{name}.json").token_bytes for name in "abc")
    assert first == again
    assert first != other


def test_tiny_tekken_loads_in_mistral_common(tiny_path: Path) -> None:
    ours = load_tekken(tiny_path)
    theirs = Tekkenizer.from_file(tiny_path)
    assert (theirs.num_special_tokens, theirs.n_words) == (ours.num_special, ours.vocab_size)
    assert (theirs.bos_id, theirs.eos_id) == (ours.bos_id, ours.eos_id)
    for name, token_id in ours.special_ids.items():
        assert theirs.get_special_token(name) == token_id
    for token_id in range(ours.num_special, ours.vocab_size):
        assert theirs.id_to_byte_piece(token_id) == ours.bytes_of(token_id)
    assert theirs.audio is not None and theirs.audio.is_streaming
    assert theirs.audio.get_num_delay_tokens() == ours.audio.num_delay_tokens
    text = " hello wörld, 日本語 🎤"
    assert theirs.decode(theirs.encode(text, bos=False, eos=False)) == text


@pytest.mark.parametrize(("delay_ms", "left_pad_tokens"), [(480, 32), (560, 16), (2400, 32)])
def test_mistral_common_prompt_uses_our_ids(tmp_path: Path, delay_ms: int, left_pad_tokens: int) -> None:
    path = tmp_path / "tekken.json"
    write_tiny_tekken(path, num_normal_tokens=300, delay_ms=delay_ms, left_pad_tokens=left_pad_tokens)
    tekken = load_tekken(path)
    silence = Audio(np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE, format="wav")
    request = TranscriptionRequest(audio=silence.to_base64("wav"), streaming=StreamingMode.OFFLINE)
    prompt = MistralTokenizer.from_file(str(path)).encode_transcription(request).tokens
    num_pads = left_pad_tokens + tekken.audio.num_delay_tokens
    assert prompt == [tekken.bos_id] + [tekken.streaming_pad_id] * num_pads


def test_script_writes_a_loadable_file_and_rejects_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    command = [sys.executable, "-m", "voxtral_run.tools.tiny_tekken", str(path)]
    done = subprocess.run(
        [*command, "--num-normal-tokens", "300", "--delay-ms", "160", "--left-pad-tokens", "8"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    tekken = load_tekken(path)
    assert (tekken.vocab_size, tekken.audio.num_delay_tokens, tekken.audio.streaming_n_left_pad_tokens) == (
        1300,
        2,
        8,
    )
    for option, value, message in (
        ("--num-normal-tokens", "100", "at least 256"),
        ("--delay-ms", "500", "multiple of 80"),
    ):
        failed = subprocess.run([*command, option, value], cwd=REPO_ROOT, capture_output=True, text=True)
        assert failed.returncode == 2 and message in failed.stderr


def test_real_vocab_loads_fast_and_matches_mistral_common(tmp_path: Path) -> None:
    path = tmp_path / "tekken.json"
    write_streaming_tekken(BUNDLED_TEKKEN, path)
    start = time.perf_counter()
    tekken = load_tekken(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"loading the 150000-entry vocab took {elapsed:.1f} s"
    assert (tekken.vocab_size, tekken.num_special, len(tekken.token_bytes)) == (131072, 1000, 130072)
    theirs = Tekkenizer.from_file(path)
    for token_id in np.random.default_rng(0).integers(1000, 131072, size=2000).tolist():
        assert tekken.bytes_of(token_id) == theirs.id_to_byte_piece(token_id)


# Validation: each broken file gives a one-line CheckpointError naming the file and the key.


@pytest.fixture(scope="module")
def valid_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("valid") / "tekken.json"
    write_tiny_tekken(path, num_normal_tokens=300)
    return json.loads(path.read_text(encoding="utf-8"))


def _delete(keys: str):
    def mutate(data: dict) -> None:
        *parents, last = keys.split(".")
        for key in parents:
            data = data[key]
        del data[last]

    return mutate


def _set(keys: str, value):
    def mutate(data: dict) -> None:
        *parents, last = keys.split(".")
        for key in parents:
            data = data[key]
        data[last] = value

    return mutate


def _drop_special(name: str):
    def mutate(data: dict) -> None:
        data["special_tokens"] = [entry for entry in data["special_tokens"] if entry["token_str"] != name]

    return mutate


def _set_vocab(rank: int, key: str, value):
    def mutate(data: dict) -> None:
        data["vocab"][rank][key] = value

    return mutate


BROKEN_FILES = {
    "no config": (_delete("config"), "missing key config.default_vocab_size"),
    "no vocab size": (_delete("config.default_vocab_size"), "missing key config.default_vocab_size"),
    "no special count": (
        _delete("config.default_num_special_tokens"),
        "missing key config.default_num_special_tokens",
    ),
    "vocab size not int": (
        _set("config.default_vocab_size", "1300"),
        "config.default_vocab_size must be an integer",
    ),
    "vocab size is bool": (_set("config.default_num_special_tokens", True), "must be an integer"),
    "too few normal tokens": (_set("config.default_vocab_size", 1100), "at least one special and 256 byte"),
    "no specials": (_set("config.default_num_special_tokens", 0), "at least one special and 256 byte"),
    "vocab too short": (_set("config.default_vocab_size", 1400), "vocab has 300 entries, fewer than"),
    "no vocab": (_delete("vocab"), "missing key vocab"),
    "vocab not a list": (_set("vocab", {}), "vocab must be an array"),
    "rank out of order": (_set_vocab(7, "rank", 8), "vocab[7].rank is 8, expected 7"),
    "no token bytes": (lambda data: data["vocab"][3].pop("token_bytes"), "vocab[3] needs rank"),
    "null token bytes": (_set_vocab(4, "token_bytes", None), "vocab[4] needs rank"),
    "token bytes not base64": (_set_vocab(280, "token_bytes", "@@@"), "vocab[280].token_bytes is not base64"),
    "byte rank wrong": (
        _set_vocab(65, "token_bytes", base64.b64encode(b"B").decode()),
        "vocab[65].token_bytes must be the single byte 0x41",
    ),
    "byte rank is a merge": (
        _set_vocab(0, "token_bytes", base64.b64encode(b"\x00\x00").decode()),
        "vocab[0].token_bytes must be the single byte 0x00",
    ),
    "no special tokens": (_delete("special_tokens"), "missing key special_tokens"),
    "special rank outside": (
        lambda data: data["special_tokens"].append({"rank": 1000, "token_str": "[X]", "is_control": True}),
        "special_tokens[1000].rank 1000 is outside 0..999",
    ),
    "special without name": (
        lambda data: data["special_tokens"][5].pop("token_str"),
        "missing key special_tokens[5].token_str",
    ),
    "special rank a string": (
        lambda data: data["special_tokens"][2].update(rank="2"),
        "special_tokens[2].rank must be an integer, got '2'",
    ),
    "special not an object": (
        lambda data: data["special_tokens"].insert(0, "<s>"),
        "special_tokens[0] must be an object",
    ),
    "no BOS": (_drop_special("<s>"), "special_tokens lacks <s>"),
    "no EOS": (_drop_special("</s>"), "special_tokens lacks </s>"),
    "no streaming pad": (_drop_special("[STREAMING_PAD]"), "special_tokens lacks [STREAMING_PAD]"),
    "no streaming word": (_drop_special("[STREAMING_WORD]"), "special_tokens lacks [STREAMING_WORD]"),
    "no audio": (_delete("audio"), "missing key audio"),
    "audio not an object": (_set("audio", []), "audio must be an object"),
    "no sampling rate": (_delete("audio.sampling_rate"), "missing key audio.sampling_rate"),
    "no encoding config": (
        _delete("audio.audio_encoding_config"),
        "missing key audio.audio_encoding_config.num_mel_bins",
    ),
    "no delay": (_delete("audio.transcription_delay_ms"), "missing key audio.transcription_delay_ms"),
    "no left pad": (
        _delete("audio.streaming_n_left_pad_tokens"),
        "missing key audio.streaming_n_left_pad_tokens",
    ),
    "no look ahead": (_delete("audio.streaming_look_ahead_ms"), "missing key audio.streaming_look_ahead_ms"),
    "no look back": (_delete("audio.streaming_look_back_ms"), "missing key audio.streaming_look_back_ms"),
    "no format": (_delete("audio.transcription_format"), "missing key audio.transcription_format"),
    "instruct format": (
        _set("audio.transcription_format", "instruct"),
        "audio.transcription_format 'instruct' is not 'streaming'",
    ),
    "sample rate": (
        _set("audio.sampling_rate", 24000),
        "audio.sampling_rate is 24000, this engine supports only",
    ),
    "frame rate": (_set("audio.frame_rate", 25), "audio.frame_rate is 25"),
    "mel bins": (
        _set("audio.audio_encoding_config.num_mel_bins", 80),
        "audio.audio_encoding_config.num_mel_bins",
    ),
    "hop": (
        _set("audio.audio_encoding_config.hop_length", 320),
        "audio.audio_encoding_config.hop_length is 320",
    ),
    "window": (_set("audio.audio_encoding_config.window_size", 512), "window_size is 512"),
    "delay not a multiple": (_set("audio.transcription_delay_ms", 500), "positive multiple of 80 ms"),
    "delay zero": (
        _set("audio.transcription_delay_ms", 0),
        "transcription_delay_ms is 0, must be a positive",
    ),
    "delay negative": (_set("audio.transcription_delay_ms", -80), "must be a positive multiple"),
    "delay too long": (_set("audio.transcription_delay_ms", 2480), "outside 80..2400 ms"),
    "delay a string": (
        _set("audio.transcription_delay_ms", "480"),
        "transcription_delay_ms must be a number",
    ),
    "left pad negative": (_set("audio.streaming_n_left_pad_tokens", -1), "streaming_n_left_pad_tokens is -1"),
    "left pad float": (
        _set("audio.streaming_n_left_pad_tokens", 32.0),
        "streaming_n_left_pad_tokens must be an integer",
    ),
    "look ahead negative": (_set("audio.streaming_look_ahead_ms", -2.5), "streaming_look_ahead_ms is -2.5"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_file_names_file_and_key(tmp_path: Path, valid_data: dict, case: str) -> None:
    mutate, message = BROKEN_FILES[case]
    data = copy.deepcopy(valid_data)
    mutate(data)
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as error:
        load_tekken(path)
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text


def test_unchanged_copy_of_valid_data_loads(tmp_path: Path, valid_data: dict) -> None:
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(valid_data), encoding="utf-8")
    assert load_tekken(path).vocab_size == 1300


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        ("[1, 2]", "top level must be a JSON object"),
    ],
)
def test_unreadable_file(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "tekken.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: {message}"):
        load_tekken(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_tekken(tmp_path)
