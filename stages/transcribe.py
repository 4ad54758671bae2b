"""In-process transcription: the pipeline's stage objects chained in one process (reference and debugging)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxtral_run.stages.base import Item, Stage
from voxtral_run.stages.factory import build_stage

MODEL_CHAIN = ("mel", "encoder", "decoder", "detokenize")


@dataclass(frozen=True)
class Transcript:
    """Every id the decoder generated (specials included, in order) and the decoded text."""

    token_ids: list[int]
    text: str


def run_chain(chain: Sequence[Stage], stream_id: str, chunks: Iterable[Item]) -> list[Item]:
    """Push chunks through stages in order, then finish the stream stage by stage; the last stage's items."""
    outputs: list[Item] = []

    def feed(index: int, items: list[Item]) -> None:
        if index == len(chain):
            outputs.extend(items)
            return
        for item in items:
            feed(index + 1, chain[index].push(stream_id, item))

    for chunk in chunks:
        feed(0, [chunk])
    for index, stage in enumerate(chain):
        feed(index + 1, stage.finish(stream_id))
    return outputs


def build_chain(model_dir: Path, *, delay_ms: float | None = None, device: str = "cpu") -> list[Stage]:
    """mel -> encoder -> decoder -> detokenize stage objects for one model, delay and device."""
    return [build_stage(kind, model_dir=model_dir, device=device, delay_ms=delay_ms) for kind in MODEL_CHAIN]


def transcript_of(events: Iterable[Item]) -> Transcript:
    """The transcript carried by a detokenize stage's final `done` event."""
    done = [event for event in events if event["type"] == "done"]
    return Transcript(token_ids=list(done[-1]["token_ids"]), text=done[-1]["text"])


def transcribe_audio(
    audio: np.ndarray,
    *,
    model_dir: Path,
    delay_ms: float | None = None,
    device: str = "cpu",
    chunk_samples: int | None = None,
) -> Transcript:
    """Transcribe 16 kHz mono float32 audio; `chunk_samples` feeds it in pieces as a live stream would."""
    audio = np.asarray(audio, dtype=np.float32)
    step = chunk_samples or max(len(audio), 1)
    chunks = [audio[i : i + step] for i in range(0, len(audio), step)]
    return transcript_of(run_chain(build_chain(model_dir, delay_ms=delay_ms, device=device), "stream", chunks))
