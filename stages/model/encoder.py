"""The causal audio encoder (conv stem + sliding-window transformer) and the streaming stage that runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.audio.constants import CONV_STRIDE, ENCODER_FRAMES_PER_TOKEN, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from voxtral_run.stages.base import PerStreamStage, StageError
from voxtral_run.stages.kernels.graphs import StagedInput, StagedOutput, StepGraphs, StepPosition
from voxtral_run.stages.model.checkpoint import ENCODER_PREFIX, ModelDir, TransformerParams
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

CONV_KERNEL = 3
CONV1_CONTEXT = CONV_KERNEL - 1  # left pad of the stride-1 conv: (k - 1) + 1 - stride
CONV2_CONTEXT = CONV_KERNEL - CONV_STRIDE  # left pad of the stride-2 conv: 1 frame, not 2 (spec 5, D3)
# The stride-2 conv waits for pairs, so an odd count of mel frames so far leaves one more conv1 frame behind.
CONV1_TAIL_LENGTHS = (CONV2_CONTEXT, CONV2_CONTEXT + 1)
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
    """Fixed buffers of one stream's 80 ms encoder step (conv stem and transformer), and its graphs per cache
    span."""

    mel: StagedInput  # [8, 128] mel frames in
    mel_tail: torch.Tensor  # [CONV1_CONTEXT, 128] the stem's conv tails, carried from step to step
    conv1_tails: dict[int, torch.Tensor]  # [length, dim] for each of CONV1_TAIL_LENGTHS
    first_position: StepPosition  # [1] the step's first frame position
    out: StagedOutput  # [4, dim] encoder frames out, float32 on the host
    graphs: dict[int, StepGraphs]  # by the conv1 tail's length, which an 80 ms step keeps


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
        mel = mel.to(state.mel_tail.dtype)
        frames, state.mel_tail, state.conv1_tail = self.stem_frames(mel, state.mel_tail, state.conv1_tail)
        return frames

    def stem_frames(
        self, mel: torch.Tensor, mel_tail: torch.Tensor, conv1_tail: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stem frames that mel [k, 128] completes after the conv tails, and the tails after them."""
        x = torch.cat((mel_tail, mel))
        c1 = self._conv(0, x, stride=1)
        buf = torch.cat((conv1_tail, c1))
        pairs = (buf.shape[0] - CONV2_CONTEXT) // CONV_STRIDE
        if pairs == 0:
            return buf.new_zeros(0, self.params.dim), x[-CONV1_CONTEXT:], buf
        # A valid stride-2 conv over the buffer yields exactly `pairs` frames; the rest waits for more input.
        return self._conv(1, buf, stride=CONV_STRIDE), x[-CONV1_CONTEXT:], buf[CONV_STRIDE * pairs :]

    def _conv(self, index: int, x: torch.Tensor, stride: int) -> torch.Tensor:
        """GELU of a valid conv over time-major x [T, in]: one matrix product of every kernel-wide window
        (in-channel major, as the weight [out, in, k] is laid out), which the few frames of a step run
        faster than a convolution kernel does."""
        conv = self.conv_layers[index].conv
        windows = x.unfold(0, CONV_KERNEL, stride).flatten(1)
        return F.gelu(F.linear(windows, conv.weight.flatten(1), conv.bias))

    def layers(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The transformer and final norm over frames x [T, dim] at `positions` [T]; updates the cache."""
        rotations, bias = position_inputs(positions, self.rope, cache, self.params.sliding_window, x.dtype)
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
            positions = torch.arange(state.next_position, state.next_position + count, device=x.device)
            outputs.append(self.layers(block, positions, state.cache))
            state.next_position += count
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.params.dim)

    @torch.inference_mode()
    def graphed_step(self, mel: np.ndarray | torch.Tensor, state: EncoderState) -> np.ndarray:
        """The 80 ms step (8 mel frames in, 4 frames out in float32) of a stream with graphs, as its graph: the
        stream's tails are moved into the step's buffers if an eager push left them elsewhere, and after it they
        are those buffers."""
        step = state.step
        tail_length = state.conv1_tail.shape[0]
        step.mel.load(mel)
        for tail, buffer in ((state.mel_tail, step.mel_tail), (state.conv1_tail, step.conv1_tails[tail_length])):
            if tail is not buffer:
                buffer.copy_(tail)
        state.cache.prepare(state.next_position + ENCODER_FRAMES_PER_TOKEN)
        step.first_position.set(state.next_position)
        step.graphs[tail_length](state.cache.span)
        state.mel_tail, state.conv1_tail = step.mel_tail, step.conv1_tails[tail_length]
        state.next_position += ENCODER_FRAMES_PER_TOKEN
        return step.out.read()

    def enable_graphs(self, state: EncoderState) -> None:
        """Give a static-cache stream CUDA-graph buffers for its 80 ms steps."""
        ref = self.conv_layers[0].conv.weight
        mel = StagedInput(ref.new_zeros(MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS))
        mel_tail = torch.zeros_like(state.mel_tail)
        conv1_tails = {length: ref.new_zeros(length, self.params.dim) for length in CONV1_TAIL_LENGTHS}
        first_position = StepPosition(torch.zeros(1, dtype=torch.long, device=ref.device), ENCODER_FRAMES_PER_TOKEN)
        offsets = torch.arange(ENCODER_FRAMES_PER_TOKEN, device=ref.device)
        out = StagedOutput(ref.new_zeros(ENCODER_FRAMES_PER_TOKEN, self.params.dim), torch.float32)
        # The steps hold the cache, not the state that holds the steps: a finished stream's graphs are then freed
        # at once, never by the cycle collector in the middle of another graph's capture (which fails it).
        cache = state.cache

        def step_after(conv1_tail: torch.Tensor) -> Callable[[], None]:
            def step() -> None:
                mel.copy_in()
                frames, new_mel_tail, new_conv1_tail = self.stem_frames(mel.buffer, mel_tail, conv1_tail)
                mel_tail.copy_(new_mel_tail)
                conv1_tail.copy_(new_conv1_tail)
                out.copy_out(self.layers(frames, first_position.tensor + offsets, cache))
                first_position.advance_on_device()

            return step

        graphs = {length: StepGraphs(step_after(tail), ref.device) for length, tail in conv1_tails.items()}
        state.step = EncoderStep(mel, mel_tail, conv1_tails, first_position, out, graphs)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """mel frames [k, 128] of a stream (on any device) -> the encoder frames they complete [m, dim]. An 80 ms
        push (8 mel frames, so 4 frames out) of a stream with graphs replays its step's graph, whose frames come
        back on the host in float32."""
        if state.step is not None and mel.shape[0] == MEL_FRAMES_PER_TOKEN:
            return torch.from_numpy(self.graphed_step(mel, state))
        ref = self.conv_layers[0].conv.weight
        if mel.shape[0] == 0:
            return ref.new_zeros(0, self.params.dim)
        return self.transform(self.conv_stem(mel.to(device=ref.device, dtype=ref.dtype), state), state)


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
        """Capture the 80 ms step now rather than in a stream's step, after either conv tail (80 ms of silence,
        one mel frame more, 80 ms again), and warm attention at every span the cache can read
        (`warm_attention_spans`)."""
        silence = np.zeros((MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS), dtype=np.float32)
        state = self.push_and_forget(silence, silence[:1], silence)
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
        if state.step is not None and mel.shape[0] == MEL_FRAMES_PER_TOKEN:
            return [self.encoder.graphed_step(mel, state)]  # past torch's dispatch: host time delays the GPU
        frames = self.encoder(torch.from_numpy(mel), state)
        if frames.shape[0] == 0:
            return []
        return [frames.float().cpu().numpy()]

    def finish(self, stream_id: str) -> list[np.ndarray]:
        # Causal: nothing is held back that more input would not have released; an odd stem frame is dropped.
        self._states.pop(stream_id, None)
        return []
