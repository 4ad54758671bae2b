"""The causal audio encoder: a conv stem (two GELU convs, the second of stride 2) and a sliding-window
transformer, run on a stream's log-mel frames as they arrive."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.audio.constants import CONV_STRIDE, NUM_MEL_BINS
from voxtral_run.stages.model.cache import KVCache, single_stream_cache
from voxtral_run.stages.model.checkpoint import ENCODER_PREFIX, ModelDir, TransformerParams
from voxtral_run.stages.model.layers import Block, RMSNorm, RotaryEmbedding, fuse_projections, position_inputs

CONV_KERNEL = 3
CONV1_CONTEXT = CONV_KERNEL - 1  # left pad of the stride-1 conv: (k - 1) + 1 - stride
CONV2_CONTEXT = CONV_KERNEL - CONV_STRIDE  # left pad of the stride-2 conv: 1 frame, not 2 (docs/MODEL.md §6)
# The stride-2 conv waits for pairs, so an odd count of mel frames so far leaves one more conv1 frame behind.
CONV1_TAIL_LENGTHS = (CONV2_CONTEXT, CONV2_CONTEXT + 1)
TOKEN_TAIL_LENGTH = CONV1_TAIL_LENGTHS[0]  # at a stream's start, so at every token boundary (8 frames are 4 pairs)
BLOCK_FRAMES = 64  # encoder frames attended in one forward at most: bounds the attention matrix and the ring


def stem_output(tail_length: int, mel_frames: int) -> tuple[int, int]:
    """(encoder frames, conv1 tail length after) of `mel_frames` new mel frames after a conv1 tail of
    `tail_length`, as `AudioEncoder.stem_frames` gives them."""
    pairs = (tail_length + mel_frames - CONV2_CONTEXT) // CONV_STRIDE
    return pairs, tail_length + mel_frames - CONV_STRIDE * pairs


class _Conv(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, CONV_KERNEL)


class _Transformer(nn.Module):
    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)


@dataclass
class EncoderState:
    """A batch of streams' encoder state: the conv tails, the KV cache and the next frame position."""

    mel_tail: torch.Tensor  # [batch, CONV1_CONTEXT, 128]
    conv1_tail: torch.Tensor  # [batch, one of CONV1_TAIL_LENGTHS, dim]
    cache: KVCache
    next_position: int = 0


class AudioEncoder(nn.Module):
    """Conv stem and causal transformer under the Mistral names (`conv_layers.*`, `transformer.*`)."""

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.params = params
        self.conv_layers = nn.ModuleList([_Conv(NUM_MEL_BINS, params.dim), _Conv(params.dim, params.dim)])
        self.transformer = _Transformer(params)
        self.rope = RotaryEmbedding(params.head_dim, params.rope_theta)

    def new_state(self, rows: int = 1) -> EncoderState:
        """Fresh state for `rows` streams: zero conv context (the reference's causal left padding), empty cache."""
        ref = self.conv_layers[0].conv.weight
        p = self.params
        cache = single_stream_cache(
            p.sliding_window, BLOCK_FRAMES, p.n_layers, p.n_kv_heads, p.head_dim, rows=rows, dtype=ref.dtype,
            device=ref.device,
        )  # fmt: skip
        return EncoderState(
            mel_tail=ref.new_zeros(rows, CONV1_CONTEXT, NUM_MEL_BINS),
            conv1_tail=ref.new_zeros(rows, CONV2_CONTEXT, p.dim),
            cache=cache,
        )

    def stem_frames(
        self, mel: torch.Tensor, mel_tail: torch.Tensor, conv1_tail: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stem frames [batch, m, dim] that mel [batch, k, 128] completes after the conv tails, and the
        tails after them."""
        x = torch.cat((mel_tail, mel), dim=1)
        c1 = self._conv(0, x, stride=1)
        buf = torch.cat((conv1_tail, c1), dim=1)
        pairs = (buf.shape[1] - CONV2_CONTEXT) // CONV_STRIDE
        if pairs == 0:
            return buf.new_zeros(buf.shape[0], 0, self.params.dim), x[:, -CONV1_CONTEXT:], buf
        # A valid stride-2 conv over the buffer yields exactly `pairs` frames; the rest waits for more input.
        return self._conv(1, buf, stride=CONV_STRIDE), x[:, -CONV1_CONTEXT:], buf[:, CONV_STRIDE * pairs :]

    def _conv(self, index: int, x: torch.Tensor, stride: int) -> torch.Tensor:
        """GELU of a valid conv over time-major x [batch, T, in]: one matrix product of every kernel-wide window
        (in-channel major, as the weight [out, in, k] is laid out), which the few frames of a step run faster
        than a convolution kernel does."""
        conv = self.conv_layers[index].conv
        windows = x.unfold(1, CONV_KERNEL, stride).flatten(2)
        return F.gelu(F.linear(windows, conv.weight.flatten(1), conv.bias))

    def blocks(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The transformer blocks over stem frames x [batch, T, dim] at positions [batch, T] (before the final
        norm); the new keys and values enter the cache."""
        rotations, bias = position_inputs(positions, self.rope, cache, x.dtype)
        for index, layer in enumerate(self.transformer.layers):
            x = layer(x, rotations, bias, cache, index)
        return x

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """mel frames [batch, k, 128] -> the encoder frames they complete [batch, m, dim], continuing `state`:
        any chunking of a stream gives the same frames."""
        ref = self.conv_layers[0].conv.weight
        if mel.shape[1] == 0:
            return ref.new_zeros(mel.shape[0], 0, self.params.dim)
        mel = mel.to(device=ref.device, dtype=ref.dtype)
        x, state.mel_tail, state.conv1_tail = self.stem_frames(mel, state.mel_tail, state.conv1_tail)
        outputs = []
        for start in range(0, x.shape[1], BLOCK_FRAMES):
            block = x[:, start : start + BLOCK_FRAMES]
            count = block.shape[1]
            state.cache.prepare(state.next_position + count)
            positions = torch.arange(state.next_position, state.next_position + count, device=x.device)
            block = self.blocks(block, positions.expand(x.shape[0], -1), state.cache)
            outputs.append(self.transformer.norm(block))
            state.next_position += count
        return torch.cat(outputs, dim=1) if outputs else x


def load_audio_encoder(model: ModelDir, *, dtype: torch.dtype, device: str | torch.device) -> AudioEncoder:
    """Build the encoder and load only its tensors from the model directory."""
    tensors = model.load_tensors([ENCODER_PREFIX], dtype=dtype, device=device)
    with torch.device("meta"):
        encoder = AudioEncoder(model.params.encoder)
    encoder.load_state_dict({name[len(ENCODER_PREFIX) :]: t for name, t in tensors.items()}, assign=True)
    encoder.rope.to(device)  # its table was computed on the CPU, not the meta device
    fuse_projections(encoder)
    return encoder.eval()
