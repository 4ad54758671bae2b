"""Adapter and text decoder with the delay-conditioned Ada RMSNorm, and the streaming greedy decoder stage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN
from voxtral_run.stages.base import PerStreamStage, StageError
from voxtral_run.stages.kernels.graphs import StagedInput, StagedOutput, StepGraphs, StepPosition
from voxtral_run.stages.kernels.matvec import Norm, matvec
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP, Overlap
from voxtral_run.stages.model.checkpoint import ADAPTER_PREFIX, DECODER_PREFIXES, TOKEN_EMBEDDING, ModelDir, ModelParams
from voxtral_run.stages.model.layers import (
    EAGER,
    Block,
    KVCache,
    RMSNorm,
    RollingKVCache,
    RotaryEmbedding,
    StaticKVCache,
    compiled_block_functions,
    fuse_projections,
    fused_block_functions,
    fused_products_serve,
    position_inputs,
    warm_attention_spans,
)
from voxtral_run.stages.text.tekken import Tekken

TIME_EMBEDDING_THETA = 10_000.0


def time_conditioning(num_delay_tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sinusoidal embedding of the delay in tokens, cos half first; computed in `dtype` as the reference does."""
    half = dim // 2
    inv_freq = torch.exp(-math.log(TIME_EMBEDDING_THETA) * torch.arange(half).float() / half)
    t = torch.full((1,), float(num_delay_tokens), dtype=dtype, device=device)
    angles = t * inv_freq.to(device=device, dtype=dtype)
    return torch.cat((angles.cos(), angles.sin()))


class DecoderLayer(Block):
    """Decoder block; its FFN input is scaled by (1 + s), s from the delay conditioning."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__(params.decoder)
        self.ada_rms_norm_t_cond = nn.Sequential(
            nn.Linear(params.decoder.dim, params.ada_norm_dim, bias=False),
            nn.GELU(),
            nn.Linear(params.ada_norm_dim, params.decoder.dim, bias=False),
        )


class TextDecoder(nn.Module):
    """Adapter, token embeddings (also the tied LM head), decoder layers and final norm."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        dec = params.decoder
        self.params = params
        self.adapter = nn.Sequential(
            nn.Linear(params.adapter_input_dim, dec.dim, bias=False),
            nn.GELU(),
            nn.Linear(dec.dim, dec.dim, bias=False),
        )
        self.tok_embeddings = nn.Embedding(params.vocab_size, dec.dim)
        self.layers = nn.ModuleList(DecoderLayer(params) for _ in range(dec.n_layers))
        self.norm = RMSNorm(dec.dim, dec.norm_eps)
        self.rope = RotaryEmbedding(dec.head_dim, dec.rope_theta)
        self.step_functions = EAGER  # see `compile_steps`
        # The one-position step's adapter and LM head as `matvec` kernels under this overlap, or torch's ops.
        self.fused_ends: Overlap | None = None

    def compile_steps(self) -> None:
        """Run the one-position step's blocks as the fused product kernels where they run (see
        `fused_block_functions`), and its adapter and LM head too; else the blocks as compiled code
        (`compiled_block_functions`)."""
        fused = fused_products_serve(self.layers)
        self.step_functions = fused_block_functions(self.layers) if fused else compiled_block_functions()
        self.fused_ends = DEFAULT_OVERLAP if fused else None

    def ffn_scales(self, num_delay_tokens: int) -> list[torch.Tensor]:
        """(1 + s_j) for every layer: constant for a delay, so computed once, not per step."""
        weight = self.tok_embeddings.weight
        t_cond = time_conditioning(num_delay_tokens, self.params.decoder.dim, weight.dtype, weight.device)
        with torch.inference_mode():
            return [1 + layer.ada_rms_norm_t_cond(t_cond) for layer in self.layers]

    def adapt(self, frames: torch.Tensor) -> torch.Tensor:
        """Encoder frames [4n, enc_dim] -> adapter vectors [n, dim]; frame 4p fills the first slot of p. One
        position's as two `matvec` kernels (the first with its GELU) under `fused_ends`."""
        grouped = frames.reshape(-1, self.params.adapter_input_dim)
        if self.fused_ends is None or grouped.shape[0] != 1:
            return self.adapter(grouped)
        first, _, second = self.adapter
        hidden = matvec(grouped, first.weight, gelu=True, prefetch=second.weight, overlap=self.fused_ends)
        return matvec(hidden, second.weight, overlap=self.fused_ends)

    def forward(
        self,
        audio: torch.Tensor,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        ffn_scales: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states [T, dim] after the last layer (before the final norm) at `positions` [T]; updates the
        cache."""
        x = audio + self.tok_embeddings(token_ids)
        rotations, bias = position_inputs(positions, self.rope, cache, self.params.decoder.sliding_window, x.dtype)
        # Compiled code serves the one-position step only; the prompt's block runs eager.
        functions = self.step_functions if x.shape[0] == 1 else EAGER
        for index, (layer, scale) in enumerate(zip(self.layers, ffn_scales, strict=True)):
            x = layer(x, rotations, cache, index, bias, scale, functions)
        cache.end()
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] of `forward`'s hidden states: the final norm, then the tied LM head."""
        return F.linear(self.norm(hidden), self.tok_embeddings.weight)

    def next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy id [1] after the last of `forward`'s hidden states: its logits as one `matvec` kernel with
        the final norm under `fused_ends` (cuBLAS read the 0.8 GB head slower), else `logits`."""
        last = hidden[-1:]
        if self.fused_ends is None:
            return self.logits(last).argmax(-1)
        norm = Norm(self.norm.weight, self.norm.eps)
        return matvec(last, self.tok_embeddings.weight, norm=norm, overlap=self.fused_ends).argmax(-1)


def load_text_decoder(model: ModelDir, *, dtype: torch.dtype, device: str | torch.device) -> TextDecoder:
    """Build the adapter + decoder and load only their tensors (and the embeddings) from the model directory."""
    tensors = model.load_tensors(DECODER_PREFIXES, dtype=dtype, device=device)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith(ADAPTER_PREFIX):
            name = "adapter." + name[len(ADAPTER_PREFIX) :]
        elif name == TOKEN_EMBEDDING:
            name = "tok_embeddings.weight"
        renamed[name] = tensor
    with torch.device("meta"):
        decoder = TextDecoder(model.params)
    decoder.load_state_dict(renamed, assign=True)
    decoder.rope = RotaryEmbedding(model.params.decoder.head_dim, model.params.decoder.rope_theta).to(device)
    fuse_projections(decoder)
    return decoder.eval()


def streaming_prompt(tekken: Tekken, num_delay_tokens: int) -> list[int]:
    """[BOS] + [STREAMING_PAD] x (left pad tokens + delay tokens): the forced ids of the first positions."""
    return [tekken.bos_id] + [tekken.streaming_pad_id] * (tekken.audio.streaming_n_left_pad_tokens + num_delay_tokens)


PREFILL_BLOCK = 64  # positions decoded in one call at most (the longest prompt is 33 + 30 delay tokens)


@dataclass
class DecoderStep:
    """Fixed buffers of one stream's one-position step, and its CUDA graphs per cache span."""

    frames: StagedInput  # [4, enc_dim] the position's encoder frames in (the adapter runs in the graph)
    token: torch.Tensor  # [1] previous token in, greedy token out (stays on the device between steps)
    token_out: StagedOutput  # [1] the greedy token, on the host
    position: StepPosition  # [1]
    graphs: StepGraphs


@dataclass
class DecoderState:
    """Per-stream decoder state: frames awaiting a group of 4, groups awaiting decoding (the whole prompt's
    first), caches."""

    cache: KVCache
    frames: np.ndarray | None = None  # [< 4, enc_dim] float32 frames awaiting the rest of their group
    pending: list[np.ndarray] = field(default_factory=list)  # [4, enc_dim] groups awaiting decoding
    next_position: int = 0
    last_token: int | None = None
    ended: bool = False  # EOS generated: later positions are ignored
    step: DecoderStep | None = None


class DecoderStage(PerStreamStage):
    """Streaming adapter + decoder: encoder frames in, greedy token ids (int64 arrays) out, one per position.

    `static_cache` preallocates ring caches; `cuda_graphs` (needs static caches on a GPU) replays each
    one-position step as a CUDA graph, the only host synchronisation being the read of the token id.
    `stop_at_eos=False` keeps decoding after EOS.
    """

    name = "decoder"

    def __init__(
        self,
        decoder: TextDecoder,
        tekken: Tekken,
        num_delay_tokens: int,
        *,
        static_cache: bool = False,
        cuda_graphs: bool = False,
        stop_at_eos: bool = True,
    ) -> None:
        if cuda_graphs and not (static_cache and decoder.tok_embeddings.weight.is_cuda):
            raise StageError("decoder: cuda_graphs needs a CUDA device and cache: static")
        self.decoder = decoder
        self.prompt = streaming_prompt(tekken, num_delay_tokens)
        if len(self.prompt) > PREFILL_BLOCK:
            raise StageError(f"decoder: a prompt of {len(self.prompt)} positions exceeds {PREFILL_BLOCK}")
        # Without stopping, EOS is fed back like any token (benchmarks need steps to go on).
        self.eos_id = tekken.eos_id if stop_at_eos else None
        self.ffn_scales = decoder.ffn_scales(num_delay_tokens)
        super().__init__()
        self.static_cache = static_cache
        self.cuda_graphs = cuda_graphs

    def _new_state(self) -> DecoderState:
        dec = self.decoder.params.decoder
        weight = self.decoder.tok_embeddings.weight
        shape = (dec.sliding_window, PREFILL_BLOCK, dec.n_layers, dec.n_kv_heads, dec.head_dim)
        cache: KVCache = (
            StaticKVCache(*shape, dtype=weight.dtype, device=weight.device)
            if self.static_cache
            else RollingKVCache(dec.sliding_window, dec.n_layers)
        )
        state = DecoderState(cache=cache)
        if self.cuda_graphs:
            state.step = self._graph_step(state)
        return state

    def _graph_step(self, state: DecoderState) -> DecoderStep:
        weight = self.decoder.tok_embeddings.weight
        frames = StagedInput(weight.new_zeros(ENCODER_FRAMES_PER_TOKEN, self.decoder.params.encoder.dim))
        token = torch.zeros(1, dtype=torch.long, device=weight.device)
        position = StepPosition(torch.zeros(1, dtype=torch.long, device=weight.device), 1)
        cache = state.cache  # not the state, which holds the step (see AudioEncoder.enable_graphs)

        token_out = StagedOutput(token, torch.long)

        def step() -> None:
            frames.copy_in()
            hidden = self.decoder(self.decoder.adapt(frames.buffer), token, position.tensor, cache, self.ffn_scales)
            token.copy_(self.decoder.next_token(hidden))
            token_out.copy_out(token)
            position.advance_on_device()

        return DecoderStep(frames, token, token_out, position, StepGraphs(step, weight.device))

    def warm_up(self) -> None:
        """Compile and capture the one-position step now: silence through the prompt and one step more, then
        attention at every span the cache can read (`warm_attention_spans`)."""
        frames = (len(self.prompt) + 1) * ENCODER_FRAMES_PER_TOKEN
        eos_id, self.eos_id = self.eos_id, None  # an EOS from the prompt would end the warm-up before its step
        try:
            state = self.push_and_forget(np.zeros((frames, self.decoder.params.encoder.dim), dtype=np.float32))
        finally:
            self.eos_id = eos_id
        if isinstance(state.cache, StaticKVCache):
            warm_attention_spans(
                self.decoder.step_functions.attend, state.cache, self.decoder.params.decoder.n_heads, 1
            )

    def push(self, stream_id: str, item: np.ndarray) -> list[np.ndarray]:
        frames = np.asarray(item)
        enc_dim = self.decoder.params.encoder.dim
        if frames.ndim != 2 or frames.shape[1] != enc_dim:
            raise StageError(f"decoder: expected encoder frames of shape [k, {enc_dim}], got {list(frames.shape)}")
        state = self._states.get(stream_id)
        if state is None:
            state = self._states[stream_id] = self._new_state()
        if state.ended or frames.shape[0] == 0:
            return []
        # Buffered on the host in numpy: the prompt's frames leave some over, so a stream's 80 ms pushes each
        # complete a position whose frames straddle two pushes, and torch's CPU ops here cost a graphed step
        # about 0.09 ms of host time on an H200 (copied: groups may wait for later pushes).
        arrived = np.asarray(frames, dtype=np.float32)
        buffered = arrived.copy() if state.frames is None else np.concatenate((state.frames, arrived))
        usable = buffered.shape[0] - buffered.shape[0] % ENCODER_FRAMES_PER_TOKEN
        state.frames = buffered[usable:] if usable < buffered.shape[0] else None
        if usable == 0:
            return []
        state.pending.extend(buffered[:usable].reshape(-1, ENCODER_FRAMES_PER_TOKEN, enc_dim))
        with torch.inference_mode():
            tokens = self._decode(state)
        return [np.asarray(tokens, dtype=np.int64)] if tokens else []

    def _decode(self, state: DecoderState) -> list[int]:
        tokens: list[int] = []
        prompt_len = len(self.prompt)
        if state.next_position < prompt_len:
            if state.next_position + len(state.pending) < prompt_len:
                return tokens
            audio = self.decoder.adapt(self._on_device(np.concatenate(state.pending[:prompt_len])))
            ids = torch.tensor(self.prompt, device=audio.device)
            tokens.append(self._run(state, audio, ids))
            del state.pending[:prompt_len]
        while state.pending and not state.ended:
            frames = state.pending.pop(0)
            if state.step is None:
                audio = self.decoder.adapt(self._on_device(frames))
                tokens.append(self._run(state, audio, torch.tensor([state.last_token], device=audio.device)))
            else:
                tokens.append(self._replay(state, frames))
        if state.ended:
            state.pending.clear()
        return tokens

    def _on_device(self, frames: np.ndarray) -> torch.Tensor:
        weight = self.decoder.tok_embeddings.weight
        return torch.from_numpy(frames).to(device=weight.device, dtype=weight.dtype)

    def _run(self, state: DecoderState, audio: torch.Tensor, ids: torch.Tensor) -> int:
        count = audio.shape[0]
        state.cache.prepare(state.next_position + count)
        positions = torch.arange(state.next_position, state.next_position + count, device=audio.device)
        hidden = self.decoder(audio, ids, positions, state.cache, self.ffn_scales)
        greedy = self.decoder.next_token(hidden)
        if state.step is not None:
            state.step.token.copy_(greedy)
        return self._advance(state, count, int(greedy))

    def _replay(self, state: DecoderState, frames: np.ndarray) -> int:
        step = state.step
        state.cache.prepare(state.next_position + 1)
        step.frames.load(frames)
        step.position.set(state.next_position)
        step.graphs(state.cache.span)
        return self._advance(state, 1, int(step.token_out.read()[0]))

    def _advance(self, state: DecoderState, count: int, token: int) -> int:
        state.next_position += count
        state.last_token = token
        state.ended = token == self.eos_id
        return token

    def finish(self, stream_id: str) -> list[np.ndarray]:
        # Every complete position was decoded on arrival; a partial group of frames carries no position.
        self._states.pop(stream_id, None)
        return []
