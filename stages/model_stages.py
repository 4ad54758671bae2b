"""The encoder and decoder stage cores: a model, per-stream state, and the 80 ms steps of `kernels.steps`."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from voxtral_run.stages.base import Item, PerStreamStage, StageError
from voxtral_run.stages.kernels.fused import FusedBlocks, fused_kernels_available, fused_next_token
from voxtral_run.stages.kernels.steps import DecoderStep, EncoderStep
from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.decoder import PREFILL_BLOCK, TextDecoder, streaming_prompt
from voxtral_run.stages.model.encoder import AudioEncoder, EncoderState
from voxtral_run.stages.text.tekken import Tekken


class ModelStage(PerStreamStage):
    """What the encoder and decoder stages share: the fast-path settings, the blocks a step runs, and the warm-up.
    With `fused_kernels` the 80 ms step's blocks run as the fused kernels; with `cuda_graphs` the step is replayed
    as CUDA graphs."""

    _step_rows: int  # query rows of a step's attention

    def __init__(
        self, model: AudioEncoder | TextDecoder, layers: nn.ModuleList, *, fused_kernels: bool, cuda_graphs: bool
    ) -> None:
        super().__init__()
        device = layers[0].attention.wqkv.weight.device
        if cuda_graphs and device.type != "cuda":
            raise StageError(f"{self.name}: cuda_graphs needs a CUDA device")
        if fused_kernels and not fused_kernels_available(device):
            raise StageError(f"{self.name}: fused_kernels needs Triton on a CUDA device (or its CPU interpreter)")
        self.fused_kernels = fused_kernels
        self.cuda_graphs = cuda_graphs
        self.blocks = FusedBlocks(layers, model.rope) if fused_kernels else model.blocks

    @property
    def steps(self) -> bool:
        """Whether a stream's 80 ms pushes go through a step object (`kernels.steps`) rather than the model."""
        return self.fused_kernels or self.cuda_graphs

    def warm_up(self) -> None:
        """Compile and capture the step now, not in a stream: silence through a stream that is then dropped; with
        the fused kernels, attention at every span the cache can read too."""
        record = self.push_and_forget(*self._warm_up_items())
        if self.fused_kernels:
            self.blocks.warm_spans(self._cache_of(record), self._step_rows)

    @abstractmethod
    def _warm_up_items(self) -> list[Item]:
        """Silence that takes a new stream through every step shape."""

    @abstractmethod
    def _cache_of(self, record: Any) -> KVCache:
        """The KV cache of a stream's record."""


@dataclass
class _EncoderStream:
    state: EncoderState
    step: EncoderStep | None


class EncoderStage(ModelStage):
    """Streaming encoder: mel frames [k, 128] in, encoder frames [m, dim] (float32) out, per stream."""

    name = "encoder"
    _step_rows = ENCODER_FRAMES_PER_TOKEN

    def __init__(self, encoder: AudioEncoder, *, fused_kernels: bool = False, cuda_graphs: bool = False) -> None:
        self.encoder = encoder
        super().__init__(encoder, encoder.transformer.layers, fused_kernels=fused_kernels, cuda_graphs=cuda_graphs)

    def push(self, stream_id: str, item: Item) -> list[np.ndarray]:
        mel = np.asarray(item)
        if mel.ndim != 2 or mel.shape[1] != NUM_MEL_BINS:
            raise StageError(f"encoder: expected mel frames of shape [k, {NUM_MEL_BINS}], got {list(mel.shape)}")
        stream = self._states.get(stream_id)
        if stream is None:
            state = self.encoder.new_state()
            step = EncoderStep(self.encoder, state, self.blocks, graphs=self.cuda_graphs) if self.steps else None
            stream = self._states[stream_id] = _EncoderStream(state, step)
        if stream.step is not None and mel.shape[0] == MEL_FRAMES_PER_TOKEN:
            return [stream.step(mel)]
        frames = self.encoder(torch.from_numpy(mel)[None], stream.state)[0]
        return [frames.float().cpu().numpy()] if frames.shape[0] else []

    def finish(self, stream_id: str) -> list[np.ndarray]:
        # Causal: nothing is held back that more input would not have released; an odd stem frame is dropped.
        self._states.pop(stream_id, None)
        return []

    def _warm_up_items(self) -> list[Item]:
        # After either conv1 tail length: 80 ms of silence, one mel frame more, 80 ms again.
        silence = np.zeros((MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS), dtype=np.float32)
        return [silence, silence[:1], silence]

    def _cache_of(self, record: _EncoderStream) -> KVCache:
        return record.state.cache


@dataclass
class _DecoderStream:
    """A stream's frames awaiting a group of 4, groups awaiting decoding (the whole prompt's first), its cache."""

    cache: KVCache
    step: DecoderStep | None
    frames: np.ndarray | None = None  # [< 4, enc_dim] float32 frames awaiting the rest of their group
    pending: list[np.ndarray] = field(default_factory=list)  # [4, enc_dim] groups awaiting decoding
    next_position: int = 0
    last_token: int | None = None
    ended: bool = False  # EOS generated: later positions are ignored


class DecoderStage(ModelStage):
    """Streaming adapter + decoder: encoder frames in, greedy token ids (int64 arrays) out, one per position
    after the prompt. `stop_at_eos=False` keeps decoding after EOS."""

    name = "decoder"
    _step_rows = 1

    def __init__(
        self,
        decoder: TextDecoder,
        tekken: Tekken,
        num_delay_tokens: int,
        *,
        fused_kernels: bool = False,
        cuda_graphs: bool = False,
        stop_at_eos: bool = True,
    ) -> None:
        self.decoder = decoder
        super().__init__(decoder, decoder.layers, fused_kernels=fused_kernels, cuda_graphs=cuda_graphs)
        self.prompt = streaming_prompt(tekken, num_delay_tokens)
        if len(self.prompt) > PREFILL_BLOCK:
            raise StageError(f"decoder: a prompt of {len(self.prompt)} positions exceeds {PREFILL_BLOCK}")
        # Without stopping, EOS is fed back like any token (benchmarks need steps to go on).
        self.eos_id = tekken.eos_id if stop_at_eos else None
        self.ffn_scales = decoder.ffn_scales(num_delay_tokens)

    def push(self, stream_id: str, item: Item) -> list[np.ndarray]:
        frames = np.asarray(item)
        enc_dim = self.decoder.params.encoder.dim
        if frames.ndim != 2 or frames.shape[1] != enc_dim:
            raise StageError(f"decoder: expected encoder frames of shape [k, {enc_dim}], got {list(frames.shape)}")
        stream = self._states.get(stream_id)
        if stream is None:
            cache = self.decoder.new_cache()
            step = None
            if self.steps:
                step = DecoderStep(
                    self.decoder, cache, self.ffn_scales, self.blocks, fused=self.fused_kernels, graphs=self.cuda_graphs
                )
            stream = self._states[stream_id] = _DecoderStream(cache, step)
        if stream.ended or frames.shape[0] == 0:
            return []
        # Buffered on the host in numpy: the prompt's frames leave some over, so each 80 ms push completes a
        # position whose frames straddle two pushes (copied: groups may wait for later pushes).
        arrived = np.asarray(frames, dtype=np.float32)
        buffered = arrived.copy() if stream.frames is None else np.concatenate((stream.frames, arrived))
        usable = buffered.shape[0] - buffered.shape[0] % ENCODER_FRAMES_PER_TOKEN
        stream.frames = buffered[usable:] if usable < buffered.shape[0] else None
        if usable == 0:
            return []
        stream.pending.extend(buffered[:usable].reshape(-1, ENCODER_FRAMES_PER_TOKEN, enc_dim))
        with torch.inference_mode():
            tokens = self._decode(stream)
        return [np.asarray(tokens, dtype=np.int64)] if tokens else []

    def _decode(self, stream: _DecoderStream) -> list[int]:
        tokens: list[int] = []
        prompt_len = len(self.prompt)
        if stream.next_position < prompt_len:
            if stream.next_position + len(stream.pending) < prompt_len:
                return tokens
            frames = np.concatenate(stream.pending[:prompt_len])
            tokens.append(self._forward(stream, frames, self.prompt))
            del stream.pending[:prompt_len]
        while stream.pending and not stream.ended:
            frames = stream.pending.pop(0)
            if stream.step is None:
                tokens.append(self._forward(stream, frames, [stream.last_token]))
            else:
                tokens.append(self._advance(stream, 1, stream.step(frames, stream.next_position)))
        if stream.ended:
            stream.pending.clear()
        return tokens

    def _forward(self, stream: _DecoderStream, frames: np.ndarray, ids: list[int]) -> int:
        """The model's forward over positions of `frames` [4n, enc_dim] with the previous tokens `ids` [n]."""
        weight = self.decoder.tok_embeddings.weight
        audio = self.decoder.adapt(torch.from_numpy(frames).to(device=weight.device, dtype=weight.dtype)[None])
        count = audio.shape[1]
        stream.cache.prepare(stream.next_position + count)
        positions = torch.arange(stream.next_position, stream.next_position + count, device=weight.device)[None]
        ids_tensor = torch.tensor([ids], device=weight.device)
        hidden = self.decoder(audio, ids_tensor, positions, stream.cache, self.ffn_scales)
        # The greedy id as the step computes it, so a prompt's token is the one the step would give.
        greedy = int(fused_next_token(self.decoder, hidden) if self.fused_kernels else self.decoder.next_token(hidden))
        if stream.step is not None:
            stream.step.set_token(greedy)
        return self._advance(stream, count, greedy)

    def _advance(self, stream: _DecoderStream, count: int, token: int) -> int:
        stream.next_position += count
        stream.last_token = token
        stream.ended = token == self.eos_id
        return token

    def finish(self, stream_id: str) -> list[np.ndarray]:
        # Every complete position was decoded on arrival; a partial group of frames carries no position.
        self._states.pop(stream_id, None)
        return []

    def _warm_up_items(self) -> list[Item]:
        return [
            np.zeros(((len(self.prompt) + 1) * ENCODER_FRAMES_PER_TOKEN, self.decoder.params.encoder.dim), np.float32)
        ]

    def warm_up(self) -> None:
        eos_id, self.eos_id = self.eos_id, None  # an EOS from the prompt would end the warm-up before its step
        try:
            super().warm_up()
        finally:
            self.eos_id = eos_id

    def _cache_of(self, record: _DecoderStream) -> KVCache:
        return record.cache
