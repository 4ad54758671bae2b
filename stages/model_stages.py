"""The encoder and decoder stage cores: a model, the KV pool its streams share, and batched 80 ms steps.

A call to `step` takes the work of many streams at once and runs ONE batched step for every stream with a step
to take, again while any has more (continuous batching: streams join and leave between steps). A stream holds a
row of the pool from its first item to its end; past the ceiling (`max_streams` rows, or pages too few for its
reservation) a new stream waits for a row or is refused, as `when_full` says, and never disturbs the others.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    MEL_FRAMES_PER_TOKEN,
    NUM_MEL_BINS,
    SECONDS_PER_TOKEN,
    delay_tokens,
)
from voxtral_run.stages.base import (
    END,
    WARM_UP_STREAM,
    Item,
    Output,
    Stage,
    StageError,
    StreamEnd,
    StreamFailed,
    StreamStart,
    Work,
)
from voxtral_run.stages.kernels.fused import FusedBlocks, fused_kernels_available
from voxtral_run.stages.kernels.graphs import GraphPool
from voxtral_run.stages.kernels.steps import DecoderStep, EncoderStep, PrefillStep
from voxtral_run.stages.model.cache import PAGE_SLOTS, KVPool, PoolFull, all_spans, ring_capacity
from voxtral_run.stages.model.decoder import PREFILL_BLOCK, TextDecoder, streaming_prompt
from voxtral_run.stages.model.encoder import (
    BLOCK_FRAMES,
    CONV1_CONTEXT,
    CONV1_TAIL_LENGTHS,
    CONV_STRIDE,
    TOKEN_TAIL_LENGTH,
    AudioEncoder,
)
from voxtral_run.stages.model.fp8 import FP8, Fp8Linear
from voxtral_run.stages.text.tekken import Tekken

WHEN_FULL = ("wait", "refuse")
MAX_HELD_ITEMS = 4096  # items a stage holds for streams waiting for a row; past it the newest is refused
BUCKET_STEP = 32  # batch buckets past 32 rows go up in steps of 32 (a padding row costs most of a real one)
FAILED_MEMORY = 4096  # ids of streams this stage gave up on, remembered to ignore what else arrives for them
# Rows a prefill takes at once: its activations grow with rows and the prompt's positions, and prefills come only
# as streams join.
MAX_PROMPT_ROWS = 16


@dataclass
class StreamState:
    """What a stage keeps of one stream: its row of the pool (None while it waits for one), its options, the
    items not yet stepped, and whether its input is over."""

    options: StreamStart
    row: int | None = None
    pending: list[np.ndarray] = field(default_factory=list)
    ended: bool = False
    place: Any = None  # the stage's own record of the stream's progress (EncoderRow, DecoderRow)


class ModelStage(Stage):
    """What the encoder and decoder stages share: the pool and its ceiling, admission, per-stream failure, the
    batch buckets of the steps, and the warm-up. With `fused_kernels` the steps' blocks run as the fused kernels;
    with `cuda_graphs` each step is replayed as CUDA graphs, one set per batch bucket (1, 2, 4, ...)."""

    def __init__(
        self,
        model: AudioEncoder | TextDecoder,
        layers: nn.ModuleList,
        pool: KVPool,
        *,
        fused_kernels: bool,
        cuda_graphs: bool,
        when_full: str,
        reserve_positions: int,
    ) -> None:
        device = layers[0].attention.wqkv.weight.device
        if cuda_graphs and device.type != "cuda":
            raise StageError(f"{self.name}: cuda_graphs needs a CUDA device")
        if fused_kernels and not fused_kernels_available(device):
            raise StageError(f"{self.name}: fused_kernels needs Triton on a CUDA device (or its CPU interpreter)")
        if when_full not in WHEN_FULL:
            raise StageError(f"{self.name}: when_full must be one of {', '.join(WHEN_FULL)}, got {when_full!r}")
        self.fused_kernels = fused_kernels
        self.cuda_graphs = cuda_graphs
        self.when_full = when_full
        self.reserve_positions = reserve_positions
        self.pool = pool
        dtype = str(layers[0].attention_norm.weight.dtype).removeprefix("torch.")
        # What the stage computes in: the activations, the KV cache, the layers' linear weights (fp8: e4m3).
        self._number_formats = {
            "dtype": dtype,
            "kv_dtype": "fp8" if pool.keys.dtype == FP8 else dtype,
            "weights": "fp8" if isinstance(layers[0].attention.wqkv, Fp8Linear) else dtype,
        }
        self.blocks = FusedBlocks(layers, model.rope) if fused_kernels else model.blocks
        self.device = device
        self._graph_pool = GraphPool() if cuda_graphs else None
        self._streams: dict[str, StreamState] = {}
        self._failed: OrderedDict[str, None] = OrderedDict()
        self._steps: dict[Any, Any] = {}
        self.batch_sizes: list[int] = []

    @property
    def max_streams(self) -> int:
        return self.pool.max_streams

    def settings(self) -> dict[str, str]:
        return dict(self._number_formats)

    def kv_usage(self) -> dict[str, int]:
        return {"pages_in_use": self.pool.pages_in_use, "pages": self.pool.total_pages}

    def graph_captures(self) -> dict[str, float]:
        if self._graph_pool is None:
            return {}
        return {"captured": self._graph_pool.captured, "capture_s": self._graph_pool.capture_s}

    def streams(self) -> list[str]:
        return list(self._streams)

    def state(self, stream_id: str) -> StreamState:
        """A stream's live state (for inspection)."""
        return self._streams[stream_id]

    def bucket(self, count: int) -> int:
        """The batch size a step of `count` rows runs at, with CUDA graphs (one graph set each): the next power
        of two up to BUCKET_STEP rows, then the next multiple of it, so a big batch pads at most BUCKET_STEP - 1
        rows; without graphs exactly `count`."""
        if not self.cuda_graphs:
            return count
        if count <= BUCKET_STEP:
            return min(1 << (count - 1).bit_length(), self.max_streams)
        return min(-(-count // BUCKET_STEP) * BUCKET_STEP, self.max_streams)

    def push(self, stream_id: str, item: Item) -> list[Item]:
        return self._single(self.step([(stream_id, item)]))

    def finish(self, stream_id: str) -> list[Item]:
        return self._single(self.step([(stream_id, END)]))

    @staticmethod
    def _single(outputs: list[Output]) -> list[Item]:
        """The items of a one-stream step; a failure is the caller's StageError."""
        items = []
        for _, item in outputs:
            if isinstance(item, StreamFailed):
                raise StageError(item.message)
            if not isinstance(item, StreamEnd):
                items.append(item)
        return items

    def step(self, work: list[Work]) -> list[Output]:
        return self._run(work, one_round=False)

    def step_round(self, work: list[Work]) -> list[Output]:
        return self._run(work, one_round=True)

    @property
    def has_work(self) -> bool:
        return any(self._runnable(stream) for stream in self._streams.values())

    @property
    def backlog(self) -> int:
        return sum(self._held(stream) for stream in self._streams.values() if stream.row is not None)

    def _run(self, work: list[Work], one_round: bool) -> list[Output]:
        """Take the work, then run batched steps: all of them, or one round (each stream with work one step)."""
        outputs: list[Output] = []
        self.batch_sizes = []
        for stream_id, item in work:
            if stream_id in self._failed:
                if isinstance(item, (StreamEnd, StreamFailed)):
                    del self._failed[stream_id]
                continue
            if isinstance(item, StreamFailed):
                self._drop(stream_id)
                outputs.append((stream_id, item))
                continue
            stream = self._streams.get(stream_id)
            if stream is None:
                try:
                    stream = self._open(stream_id, item if isinstance(item, StreamStart) else StreamStart())
                except StageError as error:
                    self._fail(stream_id, str(error), outputs)
                    continue
            if isinstance(item, StreamStart):
                continue
            if isinstance(item, StreamEnd):
                stream.ended = True
                continue
            if self._done(stream):
                continue
            try:
                stream.pending.append(self._checked(item))
            except StageError as error:
                self._fail(stream_id, str(error), outputs)
        with torch.inference_mode():
            self._admit(outputs)
            self._compute(outputs, one_round)
            # A stream that ends frees its row: streams waiting for one get it in this call, not the next (and
            # step in it, unless the call is one round).
            while self._end_finished(outputs) and any(s.row is None and s.pending for s in self._streams.values()):
                self._admit(outputs)
                if one_round:
                    break
                self._compute(outputs, one_round)
        return outputs

    def _end_finished(self, outputs: list[Output]) -> bool:
        """END for every stream whose input is over and stepped; whether any did end."""
        finished = [
            stream_id
            for stream_id, stream in self._streams.items()
            if stream.ended and not stream.pending and not self._runnable(stream)
        ]
        for stream_id in finished:
            self._drop(stream_id)
            outputs.append((stream_id, END))
        return bool(finished)

    def _done(self, stream: StreamState) -> bool:
        """Whether a stream takes no more input (the decoder's after EOS)."""
        return False

    def _runnable(self, stream: StreamState) -> bool:
        """Whether a stream has a step to take now."""
        return stream.row is not None and bool(stream.pending)

    def _held(self, stream: StreamState) -> int:
        """Items of an admitted stream awaiting their steps."""
        return len(stream.pending)

    def _open(self, stream_id: str, options: StreamStart) -> StreamState:
        stream = StreamState(options)
        self._streams[stream_id] = stream
        return stream

    def _admit(self, outputs: list[Output]) -> None:
        """Rows for waiting streams, oldest first; past the ceiling a stream waits or is refused."""
        held = 0
        for stream_id, stream in list(self._streams.items()):
            if stream.row is not None or not stream.pending:
                continue
            row = self.pool.admit(self.reserve_positions)
            if row is not None:
                stream.row = row
                self._on_admit(stream)
                continue
            held += len(stream.pending)
            if self.when_full == "refuse" or held > MAX_HELD_ITEMS:
                self._fail(stream_id, f"{self.name} at capacity ({self.capacity_line()})", outputs, at_capacity=True)

    def capacity_line(self) -> str:
        """The ceiling in words: streams, and the KV pages in use."""
        pool = self.pool
        return (
            f"{pool.rows_in_use} of {pool.max_streams} streams, {pool.pages_in_use} of {pool.total_pages} KV pages "
            "in use"
        )

    def _fail(self, stream_id: str, message: str, outputs: list[Output], at_capacity: bool = False) -> None:
        self._drop(stream_id)
        self._failed[stream_id] = None
        while len(self._failed) > FAILED_MEMORY:
            self._failed.popitem(last=False)
        outputs.append((stream_id, StreamFailed(message, at_capacity)))

    def _drop(self, stream_id: str) -> None:
        """Forget a stream and free its row and pages at once."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.row is not None:
            self.pool.release(stream.row)

    def _grow_failed(self, stream_id: str, error: PoolFull, outputs: list[Output]) -> None:
        self._fail(stream_id, f"{self.name}: {error}", outputs)

    def _grown_or_failed(
        self, stream_id: str, stream: StreamState, positions: int, error: PoolFull, outputs: list[Output]
    ) -> bool:
        """After a step that ran nothing for want of a page: whether the stream now has the pages for `positions`
        (it steps again next round), or failed (`error`) for want of them."""
        try:
            self.pool.grow(stream.row, positions)
        except PoolFull:
            self._grow_failed(stream_id, error, outputs)
            return False
        return True

    def _batched(self, kind: Any, count: int, build: Any) -> Any:
        """The step object of a batch of `count` rows (built once per bucket and `kind`)."""
        self.batch_sizes.append(count)
        return self._step_object(kind, self.bucket(count), build)

    def _step_object(self, kind: Any, bucket: int, build: Any) -> Any:
        step = self._steps.get((kind, bucket))
        if step is None:
            step = self._steps[kind, bucket] = build(bucket)
        return step

    def capture_all(self) -> None:
        """Capture the graphs of every batch bucket's 80 ms step at every cache span (and the decoder's prefill of
        the default prompt), in padding rows: a stream then never waits for a capture, at the cost of start-up
        time. Without `cuda_graphs` the same steps just run."""
        for bucket in sorted({self.bucket(count) for count in range(1, self.max_streams + 1)}):
            self._capture_bucket(bucket)

    @abstractmethod
    def _capture_bucket(self, bucket: int) -> None:
        """Capture one bucket's graphs (see `capture_all`)."""

    def warm_up(self, capture_all: bool = False) -> None:
        """Compile and capture the one-stream step now, not in a stream: silence through a stream dropped after;
        every bucket and span too when `capture_all`. The capture tally starts after it (`graph_captures`: what
        streams waited for)."""
        self.step([(WARM_UP_STREAM, item) for item in self._warm_up_items()] + [(WARM_UP_STREAM, END)])
        if capture_all:
            self.capture_all()
        if self._graph_pool is not None:
            self._graph_pool.captured, self._graph_pool.capture_s = 0, 0.0

    @abstractmethod
    def _warm_up_items(self) -> list[Item]:
        """Silence that takes a new stream through every step shape."""

    @abstractmethod
    def _checked(self, item: Item) -> np.ndarray:
        """An input item as the stage's array; StageError when it is malformed."""

    @abstractmethod
    def _on_admit(self, stream: StreamState) -> None:
        """Set up a stream's row once it has one."""

    @abstractmethod
    def _compute(self, outputs: list[Output], one_round: bool) -> None:
        """Run batched steps until no admitted stream has one to take, or one round of them (a step for each stream
        with work); outputs in stream order."""


@dataclass
class EncoderRow:
    """An encoder stream's place: the next encoder frame position (its steps start at token boundaries, so its
    conv1 tail is always TOKEN_TAIL_LENGTH long before one)."""

    next_position: int = 0


class EncoderStage(ModelStage):
    """Streaming encoder: mel frames [k, 128] in, encoder frames [m, dim] (float32) out, per stream. A stream's
    frames step in whole tokens (8 frames), one row of a batched step per round, whatever the items' sizes: with
    CUDA graphs a token a round (a stream's first item, the left pad's frames, takes 32 rounds), without them
    up to a block's 16 tokens."""

    name = "encoder"

    def __init__(
        self,
        encoder: AudioEncoder,
        *,
        fused_kernels: bool = False,
        cuda_graphs: bool = False,
        max_streams: int = 1,
        kv_pages: int | None = None,
        when_full: str = "wait",
        reserve_s: float | None = None,
        kv_fp8: bool = False,
    ) -> None:
        self.encoder = encoder
        params = encoder.params
        ref = encoder.conv_layers[0].conv.weight
        pool = new_pool(params, BLOCK_FRAMES, max_streams, kv_pages, FP8 if kv_fp8 else ref.dtype, ref.device)
        frames = pool.capacity if reserve_s is None else round(reserve_s / SECONDS_PER_TOKEN) * ENCODER_FRAMES_PER_TOKEN
        super().__init__(
            encoder, encoder.transformer.layers, pool, fused_kernels=fused_kernels, cuda_graphs=cuda_graphs,
            when_full=when_full, reserve_positions=frames,
        )  # fmt: skip
        # With graphs every step is one token's, the shape captured at start; without, a stream's waiting tokens
        # (a first item's 32, a backlog) step together, up to a block, each weight read once for them all.
        self.piece_frames = MEL_FRAMES_PER_TOKEN if cuda_graphs else CONV_STRIDE * BLOCK_FRAMES
        rows = max_streams + 1
        self.mel_tails = ref.new_zeros(rows, CONV1_CONTEXT, NUM_MEL_BINS)
        self.conv1_tails = ref.new_zeros(rows, max(CONV1_TAIL_LENGTHS), params.dim)

    def _checked(self, item: Item) -> np.ndarray:
        mel = np.asarray(item)
        if mel.ndim != 2 or mel.shape[1] != NUM_MEL_BINS:
            raise StageError(f"encoder: expected mel frames of shape [k, {NUM_MEL_BINS}], got {list(mel.shape)}")
        return mel.astype(np.float32, copy=False)

    def _on_admit(self, stream: StreamState) -> None:
        stream.place = EncoderRow()
        self.mel_tails[stream.row] = 0
        self.conv1_tails[stream.row] = 0

    def _runnable(self, stream: StreamState) -> bool:
        # Frames short of a token wait for the rest: the decoder takes tokens whole, so stepping them early would
        # gain no token and cost a step of another shape. A stream's frames are whole tokens (the mel stage pads
        # its end), so only an input of other items ends with fewer.
        if stream.row is None or not stream.pending:
            return False
        return stream.ended or sum(len(frames) for frames in stream.pending) >= MEL_FRAMES_PER_TOKEN

    def _compute(self, outputs: list[Output], one_round: bool) -> None:
        while self.has_work:
            steps: dict[int, list[tuple[str, StreamState, np.ndarray]]] = {}
            for stream_id, stream in list(self._streams.items()):
                if self._runnable(stream) and len(piece := next_piece(stream.pending, self.piece_frames)):
                    steps.setdefault(len(piece), []).append((stream_id, stream, piece))
            for mel_frames, batch in steps.items():
                self._step(batch, mel_frames, outputs)
            if one_round:
                return

    def _step(self, batch: list[tuple[str, StreamState, np.ndarray]], mel_frames: int, outputs: list[Output]) -> None:
        step = self._batched(("step", mel_frames), len(batch), functools.partial(self._new_step, mel_frames))
        places = [stream.place for _, stream, _ in batch]
        mel = np.stack([piece for _, _, piece in batch])
        count, _ = step.outputs[TOKEN_TAIL_LENGTH]
        try:
            frames = step(mel, [s.row for _, s, _ in batch], [p.next_position for p in places], TOKEN_TAIL_LENGTH)
        except PoolFull as error:  # no step ran: each stream that needed a page fails, the rest go on next round
            for stream_id, stream, piece in batch:
                if self._grown_or_failed(stream_id, stream, stream.place.next_position + count, error, outputs):
                    stream.pending.insert(0, piece)
            return
        for (stream_id, _, _), place, out in zip(batch, places, frames, strict=True):
            place.next_position += count
            if count:
                outputs.append((stream_id, out))

    def _new_step(self, mel_frames: int, bucket: int) -> EncoderStep:
        # The 80 ms step runs the stage's blocks (the fused kernels on a GPU) as graphs; the few frames an input
        # of odd items ends with, the model's blocks without a graph.
        regular = mel_frames == MEL_FRAMES_PER_TOKEN
        blocks = self.blocks if regular else self.encoder.blocks
        return EncoderStep(
            self.encoder, self.pool, (self.mel_tails, self.conv1_tails), blocks, bucket,
            graphs=self.cuda_graphs and regular, graph_pool=self._graph_pool, mel_frames=mel_frames,
        )  # fmt: skip

    def _capture_bucket(self, bucket: int) -> None:
        step = self._step_object(
            ("step", MEL_FRAMES_PER_TOKEN), bucket, functools.partial(self._new_step, MEL_FRAMES_PER_TOKEN)
        )
        for span in all_spans(self.pool.capacity):
            step.capture(span, TOKEN_TAIL_LENGTH)

    def _warm_up_items(self) -> list[Item]:
        return [np.zeros((MEL_FRAMES_PER_TOKEN, NUM_MEL_BINS), dtype=np.float32)]


@dataclass
class DecoderRow:
    """A decoder stream's place: its prompt, frames awaiting a group of 4, the next position, EOS seen, and
    whether its prefill already gave way to a round of steps."""

    prompt: list[int]
    delay: int  # in tokens
    frames: np.ndarray | None = None  # [< 4, enc_dim] float32 frames awaiting the rest of their group
    groups: list[np.ndarray] = field(default_factory=list)  # [4, enc_dim] groups awaiting decoding
    next_position: int = 0
    ended: bool = False  # EOS generated: later positions are ignored
    deferred: bool = False


class DecoderStage(ModelStage):
    """Streaming adapter + decoder: encoder frames in, greedy token ids (int64 arrays) out, one per position
    after the prompt. Each stream may have its own delay (its StreamStart's). `stop_at_eos=False` keeps
    decoding after EOS."""

    name = "decoder"

    def __init__(
        self,
        decoder: TextDecoder,
        tekken: Tekken,
        num_delay_tokens: int,
        *,
        fused_kernels: bool = False,
        cuda_graphs: bool = False,
        stop_at_eos: bool = True,
        max_streams: int = 1,
        kv_pages: int | None = None,
        when_full: str = "wait",
        reserve_s: float | None = None,
        kv_fp8: bool = False,
    ) -> None:
        self.decoder = decoder
        weight = decoder.tok_embeddings.weight
        kv_dtype = FP8 if kv_fp8 else weight.dtype
        pool = new_pool(decoder.params.decoder, PREFILL_BLOCK, max_streams, kv_pages, kv_dtype, weight.device)
        positions = pool.capacity if reserve_s is None else round(reserve_s / SECONDS_PER_TOKEN)
        super().__init__(
            decoder, decoder.layers, pool, fused_kernels=fused_kernels, cuda_graphs=cuda_graphs,
            when_full=when_full, reserve_positions=positions,
        )  # fmt: skip
        self.tekken = tekken
        self.num_delay_tokens = num_delay_tokens
        self.prompt = streaming_prompt(tekken, num_delay_tokens)  # a stream's without a delay of its own
        # Without stopping, EOS is fed back like any token (benchmarks need steps to go on).
        self.eos_id = tekken.eos_id if stop_at_eos else None
        self._scales: dict[int, torch.Tensor] = {}  # delay tokens -> FFN scales [layers, dim]
        self.tokens = torch.zeros(max_streams + 1, dtype=torch.long, device=weight.device)
        self.ffn_scales = weight.new_zeros(len(decoder.layers), max_streams + 1, decoder.params.decoder.dim)
        self._number_formats["lm_head"] = "fp8" if decoder.lm_head is not None else self._number_formats["dtype"]

    def _open(self, stream_id: str, options: StreamStart) -> StreamState:
        delay = self.num_delay_tokens if options.delay_ms is None else delay_tokens(options.delay_ms)
        prompt = streaming_prompt(self.tekken, delay)
        if len(prompt) > PREFILL_BLOCK:
            raise StageError(f"decoder: a prompt of {len(prompt)} positions exceeds {PREFILL_BLOCK}")
        stream = super()._open(stream_id, options)
        stream.place = DecoderRow(prompt, delay)
        return stream

    def _done(self, stream: StreamState) -> bool:
        return stream.place.ended

    def _runnable(self, stream: StreamState) -> bool:
        if stream.row is None or stream.place.ended:
            return False
        return bool(stream.pending) or self._has_position(stream) or self._prompt_ready(stream)

    @staticmethod
    def _has_position(stream: StreamState) -> bool:
        """Whether an admitted stream past its prompt has a position to step."""
        return stream.row is not None and bool(stream.place.groups) and stream.place.next_position > 0

    @staticmethod
    def _prompt_ready(stream: StreamState) -> bool:
        """Whether an admitted stream's prompt has all its groups and waits for its prefill."""
        place = stream.place
        return stream.row is not None and place.next_position == 0 and len(place.groups) >= len(place.prompt)

    def _held(self, stream: StreamState) -> int:
        return len(stream.pending) + len(stream.place.groups)

    def scales(self, num_delay_tokens: int) -> torch.Tensor:
        """The FFN scales [layers, dim] of a delay, computed once."""
        scales = self._scales.get(num_delay_tokens)
        if scales is None:
            scales = self._scales[num_delay_tokens] = torch.stack(self.decoder.ffn_scales(num_delay_tokens))
        return scales

    def _checked(self, item: Item) -> np.ndarray:
        frames = np.asarray(item)
        enc_dim = self.decoder.params.encoder.dim
        if frames.ndim != 2 or frames.shape[1] != enc_dim:
            raise StageError(f"decoder: expected encoder frames of shape [k, {enc_dim}], got {list(frames.shape)}")
        return frames.astype(np.float32, copy=False)

    def _on_admit(self, stream: StreamState) -> None:
        self.ffn_scales[:, stream.row] = self.scales(stream.place.delay)

    def _compute(self, outputs: list[Output], one_round: bool) -> None:
        for stream in self._streams.values():
            if stream.row is not None:
                self._group(stream)
        while True:
            stepping = any(self._has_position(stream) for stream in self._streams.values())
            self._prefill(outputs, defer=one_round and stepping)
            batch = [(stream_id, stream) for stream_id, stream in self._streams.items() if self._has_position(stream)]
            if not batch:
                return
            for start in range(0, len(batch), self.max_streams):
                self._step(batch[start : start + self.max_streams], outputs)
            if one_round:
                return

    def _group(self, stream: StreamState) -> None:
        """Move a stream's frames into whole groups of 4 (one position each); the rest waits for more."""
        place = stream.place
        if place.ended:
            stream.pending.clear()
            return
        for arrived in stream.pending:
            buffered = arrived.copy() if place.frames is None else np.concatenate((place.frames, arrived))
            usable = buffered.shape[0] - buffered.shape[0] % ENCODER_FRAMES_PER_TOKEN
            place.frames = buffered[usable:] if usable < buffered.shape[0] else None
            place.groups.extend(buffered[:usable].reshape(-1, ENCODER_FRAMES_PER_TOKEN, buffered.shape[1]))
        stream.pending.clear()

    def _prefill(self, outputs: list[Output], defer: bool) -> None:
        """The prompts of the streams whose first groups are all there, one forward per prompt length. With
        `defer` (a round with steps), a prompt waits for the next round, once: it then costs the others' tick
        nothing and runs in the time between ticks."""
        waiting: dict[int, list[tuple[str, StreamState]]] = {}
        for stream_id, stream in self._streams.items():
            if self._prompt_ready(stream):
                place = stream.place
                if defer and not place.deferred:
                    place.deferred = True
                    continue
                waiting.setdefault(len(place.prompt), []).append((stream_id, stream))
        for length, batch in waiting.items():
            for start in range(0, len(batch), MAX_PROMPT_ROWS):
                self._prefill_batch(batch[start : start + MAX_PROMPT_ROWS], length, outputs)

    def _prefill_batch(self, batch: list[tuple[str, StreamState]], length: int, outputs: list[Output]) -> None:
        step = self._batched(("prefill", length), len(batch), functools.partial(self._new_prefill, length))
        frames = np.stack([np.concatenate(stream.place.groups[:length]) for _, stream in batch])
        prompts = np.array([stream.place.prompt for _, stream in batch], dtype=np.int64)
        try:
            greedy = step(frames, prompts, [stream.row for _, stream in batch])
        except PoolFull as error:
            for stream_id, _ in batch:
                self._grow_failed(stream_id, error, outputs)
            return
        for (stream_id, stream), token in zip(batch, greedy.tolist(), strict=True):
            del stream.place.groups[:length]
            self._advance(stream_id, stream, length, token, outputs)

    def _step(self, batch: list[tuple[str, StreamState]], outputs: list[Output]) -> None:
        step = self._batched("step", len(batch), self._new_step)
        frames = np.stack([stream.place.groups.pop(0) for _, stream in batch])
        rows = [stream.row for _, stream in batch]
        try:
            tokens = step(frames, rows, [stream.place.next_position for _, stream in batch])
        except PoolFull as error:  # no step ran: each stream that needed a page fails, the rest go on next round
            for (stream_id, stream), group in zip(batch, frames, strict=True):
                if self._grown_or_failed(stream_id, stream, stream.place.next_position + 1, error, outputs):
                    stream.place.groups.insert(0, group)
            return
        for (stream_id, stream), token in zip(batch, tokens.tolist(), strict=True):
            self._advance(stream_id, stream, 1, token, outputs)

    def _advance(self, stream_id: str, stream: StreamState, count: int, token: int, outputs: list[Output]) -> None:
        place = stream.place
        place.next_position += count
        outputs.append((stream_id, np.asarray([token], dtype=np.int64)))
        if token == self.eos_id:  # done: the row and its pages go back now, the end of stream comes later
            place.ended = True
            place.groups.clear()
            self.pool.release(stream.row)
            stream.row = None
            stream.pending.clear()

    def _new_step(self, bucket: int) -> DecoderStep:
        return DecoderStep(
            self.decoder, self.pool, self.tokens, self.ffn_scales, self.blocks, bucket, fused=self.fused_kernels,
            graphs=self.cuda_graphs, graph_pool=self._graph_pool,
        )  # fmt: skip

    def _new_prefill(self, length: int, bucket: int) -> PrefillStep:
        return PrefillStep(
            self.decoder, self.pool, self.tokens, self.ffn_scales, bucket, length, fused=self.fused_kernels,
            graphs=self.cuda_graphs, graph_pool=self._graph_pool,
        )  # fmt: skip

    def _capture_bucket(self, bucket: int) -> None:
        step = self._step_object("step", bucket, self._new_step)
        for span in all_spans(self.pool.capacity):
            step.capture(span)
        if bucket <= MAX_PROMPT_ROWS:
            length = len(self.prompt)
            self._step_object(("prefill", length), bucket, functools.partial(self._new_prefill, length)).capture()

    def _warm_up_items(self) -> list[Item]:
        length = len(self.prompt)
        return [np.zeros(((length + 1) * ENCODER_FRAMES_PER_TOKEN, self.decoder.params.encoder.dim), np.float32)]

    def warm_up(self, capture_all: bool = False) -> None:
        eos_id, self.eos_id = self.eos_id, None  # an EOS from the prompt would end the warm-up before its step
        try:
            super().warm_up(capture_all)
        finally:
            self.eos_id = eos_id


def next_piece(pending: list[np.ndarray], most: int) -> np.ndarray:
    """The next mel frames of a stream's items to step, taken across items as they came: the whole tokens'
    frames waiting, at most `most`, or the fewer left (none for empty items)."""
    while len(pending) > 1 and len(pending[0]) < most:
        pending[:2] = [np.concatenate(pending[:2])]
    waiting = len(pending[0])
    take = min(most, waiting - waiting % MEL_FRAMES_PER_TOKEN) or waiting
    piece, rest = pending[0][:take], pending[0][take:]
    if len(rest):
        pending[0] = rest
    else:
        pending.pop(0)
    return piece


def new_pool(
    params: Any, block: int, max_streams: int, kv_pages: int | None, dtype: torch.dtype, device: torch.device
) -> KVPool:
    """A stage's KV pool: `kv_pages` pages (default: every stream's whole window) for up to `max_streams`."""
    if not isinstance(max_streams, int) or max_streams < 1:
        raise StageError(f"max_streams must be an integer >= 1, got {max_streams!r}")
    pages_per_stream = ring_capacity(params.sliding_window, block) // PAGE_SLOTS
    pages = max_streams * pages_per_stream if kv_pages is None else kv_pages
    if not isinstance(pages, int) or pages < 1:
        raise StageError(f"kv_pages must be an integer >= 1, got {pages!r}")
    return KVPool(
        params.sliding_window, block, params.n_layers, params.n_kv_heads, params.head_dim, max_streams=max_streams,
        pages=pages, dtype=dtype, device=device,
    )  # fmt: skip
