"""Write a small tekken.json in the real schema (docs/MODEL.md §2): real special ids, byte tokens, seeded merges.

Run from the repository root: `python -m tools.tiny_tekken OUT.json [--num-normal-tokens N] ...`.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from pathlib import Path

from voxtral_run.stages.audio.constants import (
    FRAME_RATE,
    HOP_LENGTH,
    MS_PER_TOKEN,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    WINDOW_SIZE,
)
from voxtral_run.stages.text.tekken import BOS, EOS, NUM_BYTE_TOKENS, STREAMING_FORMAT, STREAMING_PAD, STREAMING_WORD

NUM_SPECIAL_TOKENS = 1000
# Named special tokens at their real tekken ids (docs/MODEL.md §2); ids 3..19 carry the names mistral-common's
# instruct tokenizer looks up, so MistralTokenizer.from_file loads the file too. Others are fillers.
NAMED_SPECIAL_TOKENS = {
    0: "<unk>",
    1: BOS,
    2: EOS,
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    32: STREAMING_PAD,
    33: STREAMING_WORD,
    34: "[REPEAT_AUDIO_TEXT]",
}
# vLLM's realtime framing values from the real file (docs/MODEL.md §2); this engine does not use them itself.
STREAMING_LOOK_AHEAD_MS = 2.5
STREAMING_LOOK_BACK_MS = 52.5
TOKENIZER_VERSION = "v7"  # the newest version whose instruct tokenizer needs no names beyond ids 0..19
# A GPT-2-like split (no contractions): the tiny file only needs a pattern tiktoken accepts.
SPLIT_PATTERN = r" ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Code point ranges the merges draw non-ASCII characters from: 2-, 3- and 4-byte UTF-8.
_NON_ASCII_RANGES = ((0xC0, 0x17F), (0x391, 0x3C9), (0x410, 0x44F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F))
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def special_token_entries(num_special: int = NUM_SPECIAL_TOKENS) -> list[dict]:
    """The `special_tokens` list: the named tokens at their real ids, `<SPECIAL_i>` elsewhere."""
    return [
        {"rank": i, "token_str": NAMED_SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(num_special)
    ]


def audio_block(delay_ms: int, left_pad_tokens: int) -> dict:
    """The `audio` block (docs/MODEL.md §2) with the given delay and left pad."""
    if delay_ms <= 0 or delay_ms % MS_PER_TOKEN != 0:
        raise ValueError(f"delay_ms={delay_ms} must be a positive multiple of {MS_PER_TOKEN:g}")
    if left_pad_tokens < 0:
        raise ValueError(f"left_pad_tokens={left_pad_tokens} must be >= 0")
    return {
        "sampling_rate": SAMPLE_RATE,
        "frame_rate": FRAME_RATE,
        "audio_encoding_config": {
            "num_mel_bins": NUM_MEL_BINS,
            "hop_length": HOP_LENGTH,
            "window_size": WINDOW_SIZE,
        },
        "transcription_delay_ms": delay_ms,
        "streaming_look_ahead_ms": STREAMING_LOOK_AHEAD_MS,
        "streaming_look_back_ms": STREAMING_LOOK_BACK_MS,
        "streaming_n_left_pad_tokens": left_pad_tokens,
        "transcription_format": STREAMING_FORMAT,
    }


def _random_word(rng: random.Random) -> bytes:
    """A short word, often with a space and a non-ASCII character, or a tail that starts mid-character."""
    letters = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 5)))
    low, high = rng.choice(_NON_ASCII_RANGES)
    char = chr(rng.randint(low, high))
    kind = rng.randrange(4)
    if kind == 0:
        word = letters.encode()
    elif kind == 1:
        word = (letters + char).encode()
    elif kind == 2:
        word = (char + letters).encode()
    else:  # continuation bytes of a character followed by letters: the second half of a split character
        word = char.encode()[rng.randint(1, len(char.encode()) - 1) :] + letters.encode()
    return b" " + word if kind != 3 and rng.random() < 0.5 else word


def merge_tokens(count: int, seed: int) -> list[bytes]:
    """`count` distinct multi-byte tokens; each is an earlier token plus one byte, so every prefix of a
    word (including those that end inside a UTF-8 character) is a token too."""
    rng = random.Random(seed)
    seen = {bytes([b]) for b in range(NUM_BYTE_TOKENS)}
    merges: list[bytes] = []
    while len(merges) < count:
        word = _random_word(rng)
        for end in range(2, len(word) + 1):
            piece = word[:end]
            if piece not in seen and len(merges) < count:
                seen.add(piece)
                merges.append(piece)
    return merges


def _vocab_entry(rank: int, token: bytes) -> dict:
    try:
        token_str: str | None = token.decode("utf-8")
    except UnicodeDecodeError:
        token_str = None
    return {"rank": rank, "token_bytes": base64.b64encode(token).decode("ascii"), "token_str": token_str}


def write_tiny_tekken(
    path: Path,
    *,
    num_normal_tokens: int = 1000,
    delay_ms: int = 480,
    left_pad_tokens: int = 32,
    seed: int = 0,
) -> None:
    """Write a tekken.json with 1000 specials, `num_normal_tokens` normal tokens (256 bytes + seeded merges)
    and the streaming audio block; mistral-common's Tekkenizer loads it."""
    if num_normal_tokens < NUM_BYTE_TOKENS:
        raise ValueError(f"num_normal_tokens={num_normal_tokens} must be at least {NUM_BYTE_TOKENS}")
    audio = audio_block(delay_ms, left_pad_tokens)
    tokens = [bytes([b]) for b in range(NUM_BYTE_TOKENS)]
    tokens += merge_tokens(num_normal_tokens - NUM_BYTE_TOKENS, seed)
    data = {
        "config": {
            "pattern": SPLIT_PATTERN,
            "num_vocab_tokens": num_normal_tokens,
            "default_vocab_size": NUM_SPECIAL_TOKENS + num_normal_tokens,
            "default_num_special_tokens": NUM_SPECIAL_TOKENS,
            "version": TOKENIZER_VERSION,
        },
        "vocab": [_vocab_entry(rank, token) for rank, token in enumerate(tokens)],
        "special_tokens": special_token_entries(),
        "audio": audio,
    }
    Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_streaming_tekken(
    source: Path,
    path: Path,
    *,
    delay_ms: int = 480,
    left_pad_tokens: int = 32,
) -> None:
    """Write `source`'s vocab and config (e.g. mistral-common's bundled tekken_240911.json, a real
    150000-token vocab) with this model's special tokens and the streaming audio block."""
    audio = audio_block(delay_ms, left_pad_tokens)
    data = json.loads(Path(source).read_text(encoding="utf-8"))
    data["special_tokens"] = special_token_entries(data["config"]["default_num_special_tokens"])
    data["audio"] = audio
    Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def main() -> None:
    """Command line: write a tiny tekken.json, or restamp an existing vocab with `--vocab-from`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="tekken.json to write")
    parser.add_argument("--num-normal-tokens", type=int, default=1000, help="byte tokens + merges (>= 256)")
    parser.add_argument("--delay-ms", type=int, default=480, help="transcription delay, a multiple of 80")
    parser.add_argument("--left-pad-tokens", type=int, default=32, help="streaming left pad in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the merges")
    parser.add_argument("--vocab-from", type=Path, help="take vocab and config from this tekken.json instead")
    args = parser.parse_args()
    audio_options = {"delay_ms": args.delay_ms, "left_pad_tokens": args.left_pad_tokens}
    try:
        if args.vocab_from is None:
            write_tiny_tekken(
                args.output,
                num_normal_tokens=args.num_normal_tokens,
                seed=args.seed,
                **audio_options,
            )
        else:
            write_streaming_tekken(args.vocab_from, args.output, **audio_options)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
