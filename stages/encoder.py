"""The causal audio encoder (conv stem + sliding-window transformer) and the streaming stage that runs it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.audio import CONV_STRIDE, ENCODER_FRAMES_PER_TOKEN, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from stages.base import PerStreamStage, StageError
from stages.checkpoint import ENCODER_PREFIX, ModelDir, TransformerParams
from stages.graphs import StepGraphs
from stages.layers import (
    EAGER,
    Block,
    KVCache,
    RMSNorm,
    RollingKVCache,
    RotaryEmbedding,
    StaticKVCache,
    attention_bias,
    compiled_block_functions,
    fuse_projections,
    fused_block_functions,
    fused_products_serve,
    warm_attention_spans,
)

CONV_KERNEL = 3
CONV1_CONTEXT = CONV_KERNEL - 1  # left pad of the stride-1 conv: (k - 1) + 1 - stride
CONV2_CONTEXT = CONV_KERNEL - CONV_STRIDE  # left pad of the stride-2 conv: 1 frame, not 2 (spec 5, D3)
DEFAULT_BLOCK_FRAMES = 256  # encoder frames attended in one block; bounds the attention matrix


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
    """Per-stream encoder state: conv tails, the KV cache of every layer, and the next frame position."""

    mel_tail: torch.Tensor
    conv1_tail: torch.Tensor
    cache: KVCache
    next_position: int = 0
    step: EncoderStep | None = None  # CUDA-graph buffers of the 4-frame step, when graphs are used


@dataclass
class EncoderStep:
    """Fixed buffers of one stream's 4-frame (80 ms) encoder step, and its graphs per cache span."""

    frames: torch.Tensor  # [4, dim] stem frames in
    positions: torch.Tensor  # [4]
    out: torch.Tensor  # [4, dim] encoder frames out
    graphs: StepGraphs


class AudioEncoder(nn.Module):
    """Conv stem and causal transformer under the Mistral names (`conv_layers.*`, `transformer.*`)."""

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.params = params
        self.conv_layers = nn.ModuleList([_Conv(NUM_MEL_BINS, params.dim), _Conv(params.dim, params.dim)])
        self.transformer = _Transformer(params)
        self.rope = RotaryEmbedding(params.head_dim, params.rope_theta)
        self.step_functions = EAGER  # see `compile_steps`

    def compile_steps(self) -> None:
        """Run the 80 ms step's blocks as the fused product kernels where they run (`fused_block_functions`),
        else as compiled code (`compiled_block_functions`)."""
        fused = fused_products_serve(self.transformer.layers)
        self.step_functions = fused_block_functions(self.transformer.layers) if fused else compiled_block_functions()

    def new_state(self, *, static_cache: bool = False) -> EncoderState:
        """Fresh stream state: zero conv context (the reference's causal left padding), empty caches."""
        ref = self.conv_layers[0].conv.weight
        p = self.params
        shape = (p.sliding_window, DEFAULT_BLOCK_FRAMES, p.n_layers, p.n_kv_heads, p.head_dim)
        cache: KVCache = (
            StaticKVCache(*shape, dtype=ref.dtype, device=ref.device)
            if static_cache
            else RollingKVCache(p.sliding_window, p.n_layers)
        )
        return EncoderState(
            mel_tail=ref.new_zeros(CONV1_CONTEXT, NUM_MEL_BINS),
            conv1_tail=ref.new_zeros(CONV2_CONTEXT, p.dim),
            cache=cache,
        )

    def conv_stem(self, mel: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """mel [k, 128] -> new stem frames [m, dim]; carries the conv tails so any chunking gives the same."""
        x = torch.cat((state.mel_tail, mel.to(state.mel_tail.dtype)))
        state.mel_tail = x[-CONV1_CONTEXT:]
        c1 = self._conv(0, x, stride=1)
        buf = torch.cat((state.conv1_tail, c1))
        pairs = (buf.shape[0] - CONV2_CONTEXT) // CONV_STRIDE
        if pairs == 0:
            state.conv1_tail = buf
            return buf.new_zeros(0, self.params.dim)
        # A valid stride-2 conv over the buffer yields exactly `pairs` frames; the rest waits for more input.
        c2 = self._conv(1, buf, stride=CONV_STRIDE)
        state.conv1_tail = buf[CONV_STRIDE * pairs :]
        return c2

    def _conv(self, index: int, x: torch.Tensor, stride: int) -> torch.Tensor:
        """GELU of a valid conv over time-major x [T, in]: one matrix product of every kernel-wide window
        (in-channel major, as the weight [out, in, k] is laid out), which the few frames of a step run
        faster than a convolution kernel does."""
        conv = self.conv_layers[index].conv
        windows = x.unfold(0, CONV_KERNEL, stride).flatten(1)
        return F.gelu(F.linear(windows, conv.weight.flatten(1), conv.bias))

    def layers(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The transformer and final norm over frames x [T, dim] at `positions` [T]; updates the cache."""
        rotations = self.rope.rotations(positions, x.dtype)
        bias = attention_bias(positions, cache.begin(positions), self.params.sliding_window, x.dtype)
        # Compiled code serves the 80 ms step's shape only; other block lengths (a file's first push) run eager.
        functions = self.step_functions if x.shape[0] == ENCODER_FRAMES_PER_TOKEN else EAGER
        for index, layer in enumerate(self.transformer.layers):
            x = layer(x, rotations, cache, index, bias, functions=functions)
        cache.end()
        return self.transformer.norm(x)

    def transform(self, x: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """Run the transformer over new stem frames [m, dim] at the stream's next absolute positions."""
        outputs = []
        for start in range(0, x.shape[0], DEFAULT_BLOCK_FRAMES):
            block = x[start : start + DEFAULT_BLOCK_FRAMES]
            count = block.shape[0]
            state.cache.prepare(state.next_position + count)
            if state.step is not None and count == ENCODER_FRAMES_PER_TOKEN:
                outputs.append(self._graphed_step(block, state).clone())
            else:
                positions = torch.arange(state.next_position, state.next_position + count, device=x.device)
                outputs.append(self.layers(block, positions, state.cache))
            state.next_position += count
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.params.dim)

    def _graphed_step(self, block: torch.Tensor, state: EncoderState) -> torch.Tensor:
        step = state.step
        step.frames.copy_(block)
        step.positions.copy_(torch.arange(state.next_position, state.next_position + len(block)), non_blocking=True)
        step.graphs(state.cache.span)
        return step.out

    def enable_graphs(self, state: EncoderState) -> None:
        """Give a static-cache stream CUDA-graph buffers for its 80 ms steps."""
        ref = self.conv_layers[0].conv.weight
        frames = ref.new_zeros(ENCODER_FRAMES_PER_TOKEN, self.params.dim)
        positions = torch.zeros(ENCODER_FRAMES_PER_TOKEN, dtype=torch.long, device=ref.device)
        out = torch.zeros_like(frames)
        # The step holds the cache, not the state that holds the step: a finished stream's graphs are then freed
        # at once, never by the cycle collector in the middle of another graph's capture (which fails it).
        cache = state.cache

        def step() -> None:
            out.copy_(self.layers(frames, positions, cache))

        state.step = EncoderStep(frames, positions, out, StepGraphs(step, ref.device))

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """mel frames [k, 128] of a stream -> the encoder frames they complete [m, dim]."""
        return self.transform(self.conv_stem(mel, state), state)


def load_audio_encoder(model: ModelDir, *, dtype: torch.dtype, device: str | torch.device) -> AudioEncoder:
    """Build the encoder and load only its tensors from the model directory."""
    tensors = model.load_tensors([ENCODER_PREFIX], dtype=dtype, device=device)
    with torch.device("meta"):
        encoder = AudioEncoder(model.params.encoder)
    encoder.load_state_dict({name[len(ENCODER_PREFIX) :]: t for name, t in tensors.items()}, assign=True)
    encoder.rope = RotaryEmbedding(model.params.encoder.head_dim, model.params.encoder.rope_theta).to(device)
    fuse_projections(encoder)
    return encoder.eval()


class EncoderStage(PerStreamStage):
    """Streaming encoder: mel frames [k, 128] in, encoder frames [m, dim] (float32) out, per stream.

    `static_cache` preallocates ring caches; `cuda_graphs` (needs static caches on a GPU) replays each
    80 ms step as a CUDA graph.
    """

    name = "encoder"

    def __init__(self, encoder: AudioEncoder, *, static_cache: bool = False, cuda_graphs: bool = False) -> None:
        if cuda_graphs and not (static_cache and encoder.conv_layers[0].conv.weight.is_cuda):
            raise StageError("encoder: cuda_graphs needs a CUDA device and cache: static")
        self.encoder = encoder
        super().__init__()
        self.static_cache = static_cache
        self.cuda_graphs = cuda_graphs

    def warm_up(self) -> None:
        """Compile and capture the 80 ms step now rather than in the first stream's first step, and warm
        attention at every span the cache can read (`warm_attention_spans`)."""
        state = self.push_and_forget(np.zeros((MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS), dtype=np.float32))
        if isinstance(state.cache, StaticKVCache):
            heads = self.encoder.params.n_heads
            warm_attention_spans(self.encoder.step_functions.attend, state.cache, heads, ENCODER_FRAMES_PER_TOKEN)

    def push(self, stream_id: str, item: np.ndarray) -> list[np.ndarray]:
        mel = np.asarray(item)
        if mel.ndim != 2 or mel.shape[1] != NUM_MEL_BINS:
            raise StageError(f"encoder: expected mel frames of shape [k, {NUM_MEL_BINS}], got {list(mel.shape)}")
        state = self._states.get(stream_id)
        if state is None:
            state = self._states[stream_id] = self.encoder.new_state(static_cache=self.static_cache)
            if self.cuda_graphs:
                self.encoder.enable_graphs(state)
        weight = self.encoder.conv_layers[0].conv.weight
        frames = self.encoder(torch.from_numpy(mel).to(device=weight.device, dtype=weight.dtype), state)
        if frames.shape[0] == 0:
            return []
        return [frames.float().cpu().numpy()]

    def finish(self, stream_id: str) -> list[np.ndarray]:
        # Causal: nothing is held back that more input would not have released; an odd stem frame is dropped.
        self._states.pop(stream_id, None)
        return []
