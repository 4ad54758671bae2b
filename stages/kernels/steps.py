"""The steps a stream repeats every 80 ms, from fixed buffers: the encoder's (8 mel frames in, 4 frames out)
and the decoder's (a position's 4 encoder frames in, the greedy token out). Each runs the model's own code
around its blocks, the blocks as the fused kernels when asked, and with CUDA graphs is captured once per shape
(conv tail length, cache span) and replayed: the host then writes the input, launches one graph and waits on
one event for the output.

A step holds the stream's cache, never the stage's state that holds the step: a finished stream's graphs are
then freed at once, not by the cycle collector in the middle of another graph's capture (which fails it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from voxtral_run.stages.kernels.fused import fused_adapt, fused_next_token
from voxtral_run.stages.kernels.graphs import StagedInput, StagedOutput, StepGraphs, StepPosition
from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.decoder import TextDecoder
from voxtral_run.stages.model.encoder import CONV1_TAIL_LENGTHS, AudioEncoder, EncoderState

Blocks = Callable[..., torch.Tensor]  # a model's `blocks`, or the `FusedBlocks` of them


class EncoderStep:
    """One stream's 80 ms encoder step: the model's conv stem, its blocks (`blocks`) and final norm, continuing
    `state`; replayed as CUDA graphs keyed by the conv1 tail's length and the cache span when `graphs`."""

    def __init__(self, encoder: AudioEncoder, state: EncoderState, blocks: Blocks, *, graphs: bool) -> None:
        ref = encoder.conv_layers[0].conv.weight
        dim = encoder.params.dim
        self.mel = StagedInput(ref.new_zeros(1, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS))
        self.mel_tail = torch.zeros_like(state.mel_tail)
        self.conv1_tails = {length: ref.new_zeros(1, length, dim) for length in CONV1_TAIL_LENGTHS}
        self.first_position = StepPosition(
            torch.zeros(1, 1, dtype=torch.long, device=ref.device), MEL_FRAMES_PER_TOKEN // 2
        )
        self.out = StagedOutput(ref.new_zeros(1, ENCODER_FRAMES_PER_TOKEN, dim), torch.float32)
        self.state = state
        mel, mel_tail, first_position, out, cache = self.mel, self.mel_tail, self.first_position, self.out, state.cache
        offsets = torch.arange(ENCODER_FRAMES_PER_TOKEN, device=ref.device)

        def step_after(conv1_tail: torch.Tensor) -> Callable[[], None]:
            def step() -> None:
                mel.copy_in()
                frames, new_mel_tail, new_conv1_tail = encoder.stem_frames(mel.buffer, mel_tail, conv1_tail)
                mel_tail.copy_(new_mel_tail)
                conv1_tail.copy_(new_conv1_tail)
                out.copy_out(encoder.transformer.norm(blocks(frames, first_position.tensor + offsets, cache)))
                first_position.advance_on_device()

            return step

        self.graphs = {
            length: StepGraphs(step_after(tail), ref.device, capture=graphs)
            for length, tail in self.conv1_tails.items()
        }

    @torch.inference_mode()
    def __call__(self, mel: np.ndarray) -> np.ndarray:
        """8 mel frames [8, 128] -> 4 encoder frames [4, dim] in float32. The stream's tails move into the step's
        buffers if an eager forward left them elsewhere, and after it they are those buffers."""
        state, length = self.state, self.state.conv1_tail.shape[1]
        self.mel.load(mel[None])
        for tail, buffer in ((state.mel_tail, self.mel_tail), (state.conv1_tail, self.conv1_tails[length])):
            if tail is not buffer:
                buffer.copy_(tail)
        state.cache.prepare(state.next_position + ENCODER_FRAMES_PER_TOKEN)
        self.first_position.set(state.next_position)
        self.graphs[length](state.cache.span)
        state.mel_tail, state.conv1_tail = self.mel_tail, self.conv1_tails[length]
        state.next_position += ENCODER_FRAMES_PER_TOKEN
        return self.out.read()[0]


class DecoderStep:
    """One stream's one-position decoder step (`step`, the production path of every token): the adapter over the
    position's 4 encoder frames, the previous token's embedding, the blocks (`blocks`) and the LM head's greedy id,
    the adapter and head as the fused kernels when `fused`; replayed as CUDA graphs keyed by the cache span when
    `graphs`. The previous token stays on the device between steps."""

    def __init__(
        self,
        decoder: TextDecoder,
        cache: KVCache,
        ffn_scales: list[torch.Tensor],
        blocks: Blocks,
        *,
        fused: bool,
        graphs: bool,
    ) -> None:
        weight = decoder.tok_embeddings.weight
        self.frames = StagedInput(weight.new_zeros(1, ENCODER_FRAMES_PER_TOKEN, decoder.params.encoder.dim))
        self.token = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
        self.token_out = StagedOutput(self.token, torch.long)
        self.position = StepPosition(torch.zeros(1, 1, dtype=torch.long, device=weight.device), 1)
        self.cache = cache
        frames, token, token_out, position = self.frames, self.token, self.token_out, self.position
        adapt, next_token = decoder.adapt, decoder.next_token
        if fused:  # the adapter and head launched as the fused blocks are
            adapt = functools.partial(fused_adapt, decoder, overlap=blocks.overlap)
            next_token = functools.partial(fused_next_token, decoder, overlap=blocks.overlap)

        def step() -> None:
            frames.copy_in()
            x = adapt(frames.buffer) + decoder.tok_embeddings(token)
            token.copy_(next_token(blocks(x, position.tensor, cache, ffn_scales))[:, None])
            token_out.copy_out(token)
            position.advance_on_device()

        self.graphs = StepGraphs(step, weight.device, capture=graphs)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray, position: int) -> int:
        """The greedy token at `position` of a position's encoder frames [4, enc_dim]."""
        self.cache.prepare(position + 1)
        self.frames.load(frames[None])
        self.position.set(position)
        self.graphs(self.cache.span)
        return int(self.token_out.read()[0, 0])

    def set_token(self, token: int) -> None:
        """The previous token, when a forward outside the step (the prompt's) produced it."""
        self.token.fill_(token)
