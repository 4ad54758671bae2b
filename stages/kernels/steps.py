"""The steps streams repeat every 80 ms, batched: one step runs the same step of up to `bucket` streams at once,
each in its own row of the KV pool at its own position. The encoder's takes 8 mel frames a row and gives 4
frames (or another count of mel frames: a stream's first item, its last); the decoder's takes a position's 4
encoder frames a row and gives the greedy token, and its prefill a new stream's prompt. Each runs the model's
own code around its blocks, the blocks as the fused kernels when asked, and with CUDA graphs is captured once per
shape (cache span, and the encoder's conv tail length) and replayed: the host writes the rows' inputs, launches
one graph and waits on one event for the outputs. Rows past the batch are padding: they compute in the pool's
scratch row, whose writes land in its scratch page, never in a stream's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from voxtral_run.stages.audio.constants import ENCODER_FRAMES_PER_TOKEN, MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS
from voxtral_run.stages.kernels.fused import fused_adapt, fused_next_token
from voxtral_run.stages.kernels.graphs import GraphPool, StagedInput, StagedOutput, StepGraphs
from voxtral_run.stages.model.cache import KVPool
from voxtral_run.stages.model.decoder import TextDecoder
from voxtral_run.stages.model.encoder import CONV1_TAIL_LENGTHS, AudioEncoder, stem_output

Blocks = Callable[..., torch.Tensor]  # a model's `blocks`, or the `FusedBlocks` of them


class RowInputs:
    """A batch's rows and first positions, staged like any step input: [bucket, 2] int64 on the device."""

    def __init__(self, pool: KVPool, bucket: int) -> None:
        self.pool = pool
        self.staged = StagedInput(pool.table.new_zeros(bucket, 2), host_dtype=torch.long)
        self.rows = pool.table.new_zeros(bucket)
        self.cache = pool.cache(self.rows)

    def load(self, rows: Sequence[int], positions: Sequence[int], step_positions: int) -> None:
        """The batch's rows at their first positions (padding to the bucket in the scratch row); their pages
        for `step_positions` more positions, and the span the step reads."""
        padding = self.rows.shape[0] - len(rows)
        all_rows = [*rows, *[self.pool.scratch_row] * padding]
        all_positions = [*positions, *[0] * padding]
        self.staged.load(np.array([all_rows, all_positions], dtype=np.int64).T)
        self.cache.prepare([position + step_positions for position in all_positions], rows=all_rows)

    def load_padding(self, span: int, step_positions: int) -> None:
        """Every row a padding row, at positions whose step reads `span` slots: a step that captures the span's
        graph before any stream needs it, writing only the scratch row's."""
        rows = [self.pool.scratch_row] * self.rows.shape[0]
        first = max(0, span - step_positions)
        self.staged.load(np.array([rows, [first] * len(rows)], dtype=np.int64).T)
        self.cache.prepare(first + step_positions, rows=rows)

    def copy_in(self) -> torch.Tensor:
        """In the step: the rows into the cache's row buffer; the first positions [bucket, 1]."""
        self.staged.copy_in()
        self.rows.copy_(self.staged.buffer[:, 0])
        return self.staged.buffer[:, 1:]


class EncoderStep:
    """The encoder's 80 ms step for up to `bucket` streams: the conv stem over each row's 8 mel frames (or
    `mel_frames`) after its conv tails (`mel_tails`, `conv1_tails`: [rows, ...] buffers the step reads and
    writes), the blocks and the final norm; replayed as CUDA graphs keyed by the conv1 tail length and the span
    when `graphs`."""

    def __init__(
        self,
        encoder: AudioEncoder,
        pool: KVPool,
        tails: tuple[torch.Tensor, torch.Tensor],
        blocks: Blocks,
        bucket: int,
        *,
        graphs: bool,
        graph_pool: GraphPool | None = None,
        mel_frames: int = MEL_FRAMES_PER_TOKEN,
    ) -> None:
        ref = encoder.conv_layers[0].conv.weight
        self.bucket = bucket
        self.mel = StagedInput(ref.new_zeros(bucket, mel_frames, NUM_MEL_BINS))
        self.inputs = RowInputs(pool, bucket)
        # Per conv1 tail length: the encoder frames a row gets and its tail length after (the stage keeps both).
        self.outputs = {length: stem_output(length, mel_frames) for length in CONV1_TAIL_LENGTHS}
        mel, inputs, cache = self.mel, self.inputs, self.inputs.cache
        mel_tails, conv1_tails = tails
        offsets = torch.arange(max(frames for frames, _ in self.outputs.values()), device=ref.device)
        self.out = {
            length: StagedOutput(ref.new_zeros(bucket, frames, encoder.params.dim), torch.float32)
            for length, (frames, _) in self.outputs.items()
        }

        def step_after(length: int) -> Callable[[], None]:
            frames_out, tail_after = self.outputs[length]
            out = self.out[length]

            def step() -> None:
                mel.copy_in()
                first = inputs.copy_in()
                rows = inputs.rows
                frames, mel_tail, conv1_tail = encoder.stem_frames(
                    mel.buffer, mel_tails[rows], conv1_tails[rows, :length]
                )
                mel_tails[rows] = mel_tail
                conv1_tails[rows, :tail_after] = conv1_tail
                if frames_out:  # a lone mel frame may only lengthen the tail
                    out.copy_out(encoder.transformer.norm(blocks(frames, first + offsets[:frames_out], cache)))

            return step

        self.graphs = {
            length: StepGraphs(step_after(length), ref.device, capture=graphs, pool=graph_pool)
            for length in CONV1_TAIL_LENGTHS
        }

    @torch.inference_mode()
    def __call__(self, mel: np.ndarray, rows: Sequence[int], positions: Sequence[int], tail_length: int) -> np.ndarray:
        """The step's mel frames a row [n, mel_frames, 128] of streams at `rows`, whose next encoder frames are at
        `positions` and whose conv1 tails are `tail_length` long -> the encoder frames they complete a row [n, m,
        dim] in float32 (m from `stem_output`: 4 for 8 mel frames)."""
        self.mel.load_rows(mel)
        self.inputs.load(rows, positions, self.outputs[tail_length][0])
        self.graphs[tail_length](self.inputs.cache.span)
        return self.out[tail_length].read()[: len(rows)]

    @torch.inference_mode()
    def capture(self, span: int, tail_length: int) -> None:
        """Capture (or, without graphs, run) the step reading `span` slots after conv1 tails of `tail_length`,
        in padding rows only."""
        if span in self.graphs[tail_length]:
            return
        self.mel.load_rows(np.zeros((0, *self.mel.buffer.shape[1:]), dtype=np.float32))
        self.inputs.load_padding(span, self.outputs[tail_length][0])
        self.graphs[tail_length](self.inputs.cache.span)
        self.out[tail_length].read()


class DecoderStep:
    """The decoder's one-position step for up to `bucket` streams (the production path of every token after the
    prompt): the adapter over each row's 4 encoder frames, its previous token's embedding (`tokens`: [rows]
    on the device, which the step reads and writes), the blocks with each row's FFN scales (`ffn_scales`:
    [layers, rows, dim]) and the LM head's greedy id; the adapter and head as the fused kernels for one row when
    `fused`; replayed as CUDA graphs keyed by the span when `graphs`."""

    def __init__(
        self,
        decoder: TextDecoder,
        pool: KVPool,
        tokens: torch.Tensor,
        ffn_scales: torch.Tensor,
        blocks: Blocks,
        bucket: int,
        *,
        fused: bool,
        graphs: bool,
        graph_pool: GraphPool | None = None,
    ) -> None:
        weight = decoder.tok_embeddings.weight
        self.bucket = bucket
        self.frames = StagedInput(weight.new_zeros(bucket, ENCODER_FRAMES_PER_TOKEN, decoder.params.encoder.dim))
        self.inputs = RowInputs(pool, bucket)
        self.token_out = StagedOutput(tokens.new_zeros(bucket), torch.long)
        frames, inputs, token_out, cache = self.frames, self.inputs, self.token_out, self.inputs.cache
        adapt, next_token = decoder.adapt, decoder.next_token
        if fused and bucket == 1:  # the adapter and head launched as the fused blocks are
            adapt = functools.partial(fused_adapt, decoder, overlap=blocks.overlap)
            next_token = functools.partial(fused_next_token, decoder, overlap=blocks.overlap)

        def step() -> None:
            frames.copy_in()
            positions = inputs.copy_in()
            rows = inputs.rows
            x = adapt(frames.buffer) + decoder.tok_embeddings(tokens[rows][:, None])
            new_tokens = next_token(blocks(x, positions, cache, list(ffn_scales[:, rows, None])))
            tokens[rows] = new_tokens
            token_out.copy_out(new_tokens)

        self.graphs = StepGraphs(step, weight.device, capture=graphs, pool=graph_pool)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray, rows: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """The greedy tokens [n] at `positions` of the streams at `rows`, from a position's encoder frames a row
        [n, 4, enc_dim]."""
        self.frames.load_rows(frames)
        self.inputs.load(rows, positions, 1)
        self.graphs(self.inputs.cache.span)
        return self.token_out.read()[: len(rows)]

    @torch.inference_mode()
    def capture(self, span: int) -> None:
        """Capture (or, without graphs, run) the step reading `span` slots, in padding rows only."""
        if span in self.graphs:
            return
        self.frames.load_rows(np.zeros((0, *self.frames.buffer.shape[1:]), dtype=np.float32))
        self.inputs.load_padding(span, 1)
        self.graphs(self.inputs.cache.span)
        self.token_out.read()


class PrefillStep:
    """The prompts of up to `bucket` new streams, `length` positions each: the adapter over their encoder frames,
    the prompt ids, the blocks (the model's own: a prompt is many positions, no step) and the greedy id after
    them, which enters `tokens` as the first step's input; replayed as CUDA graphs keyed by the span when
    `graphs`. With `fused`, one row's id comes from the fused LM head, as the one-row step computes it."""

    def __init__(
        self,
        decoder: TextDecoder,
        pool: KVPool,
        tokens: torch.Tensor,
        ffn_scales: torch.Tensor,
        bucket: int,
        length: int,
        *,
        fused: bool,
        graphs: bool,
        graph_pool: GraphPool | None = None,
    ) -> None:
        weight = decoder.tok_embeddings.weight
        self.bucket = bucket
        self.length = length
        enc_dim = decoder.params.encoder.dim
        self.frames = StagedInput(weight.new_zeros(bucket, length * ENCODER_FRAMES_PER_TOKEN, enc_dim))
        self.ids = StagedInput(tokens.new_zeros(bucket, length), host_dtype=torch.long)
        self.inputs = RowInputs(pool, bucket)
        self.token_out = StagedOutput(tokens.new_zeros(bucket), torch.long)
        frames, ids, inputs, token_out, cache = self.frames, self.ids, self.inputs, self.token_out, self.inputs.cache
        next_token = functools.partial(fused_next_token, decoder) if fused and bucket == 1 else decoder.next_token
        offsets = torch.arange(length, device=weight.device)

        def step() -> None:
            frames.copy_in()
            ids.copy_in()
            first = inputs.copy_in()
            rows = inputs.rows
            hidden = decoder(
                decoder.adapt(frames.buffer), ids.buffer, first + offsets, cache, list(ffn_scales[:, rows, None])
            )
            new_tokens = next_token(hidden)
            tokens[rows] = new_tokens
            token_out.copy_out(new_tokens)

        self.graphs = StepGraphs(step, weight.device, capture=graphs, pool=graph_pool)

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray, prompts: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """The greedy ids [n] after the prompts [n, length] of the new streams at `rows`, from their encoder frames
        [n, 4 * length, enc_dim]; PoolFull (before any work) when their pages do not fit."""
        self.inputs.load(rows, [0] * len(rows), self.length)
        self.frames.load_rows(frames)
        self.ids.load_rows(prompts)
        self.graphs(self.inputs.cache.span)
        return self.token_out.read()[: len(rows)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture (or, without graphs, run) the prefill, in padding rows only."""
        self.inputs.load([], [], self.length)
        if self.inputs.cache.span in self.graphs:
            return
        self.frames.load_rows(np.zeros((0, *self.frames.buffer.shape[1:]), dtype=np.float32))
        self.ids.load_rows(np.zeros((0, self.length), dtype=np.int64))
        self.graphs(self.inputs.cache.span)
        self.token_out.read()
