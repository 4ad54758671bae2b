"""Transformer building blocks shared by the audio encoder and the text decoder (Mistral weight names)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.kernels.matvec import Heads, Norm, matvec, matvec_available
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP, Overlap
from voxtral_run.stages.kernels.position_inputs import fused_position_inputs, position_inputs_available
from voxtral_run.stages.kernels.rows_matmul import rows_matmul, rows_matmul_available
from voxtral_run.stages.kernels.step_attention import MAX_ROWS, step_attention, step_attention_available
from voxtral_run.stages.model.checkpoint import TransformerParams


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm under the spec's dtype rule (11.9): normalise in fp32, round to the activation dtype, then
    scale by the weight in that dtype."""
    full = x.float()
    return weight * (full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (see `rms_norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE (rotation planes are row pairs 2i, 2i+1 of each head) at absolute positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def rotations(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos and sin of every position's angles, [2, T, head_dim/2]: computed in fp32, then rounded to the
        activation dtype (spec 11.9)."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return torch.stack((angles.cos(), angles.sin())).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, head_dim] in its own dtype, each product rounded as the reference's rotate-half."""
        cos, sin = rotations[0][:, None], rotations[1][:, None]
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def attention_bias(
    positions: torch.Tensor, key_positions: torch.Tensor, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [T, S]: 0 where key j is within the sliding window of query i (0 <= i - j < window)."""
    distance = positions[:, None] - key_positions[None, :]
    visible = (distance >= 0) & (distance < window)
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def position_inputs(
    positions: torch.Tensor, rope: RotaryEmbedding, cache: KVCache, window: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's RoPE rotations [2, T, head_dim/2] and attention bias [T, S] at `positions`, which enter
    `cache` (its `begin`): one kernel for a static cache where the kernels run (`stages.position_inputs`, the
    same values), else torch's operations."""
    if isinstance(cache, StaticKVCache) and position_inputs_available(positions.device, rope.inv_freq.shape[0]):
        return cache.begin_with_inputs(positions, rope.inv_freq, window, dtype)
    return rope.rotations(positions, dtype), attention_bias(positions, cache.begin(positions), window, dtype)


class RollingKVCache:
    """Keys and values of every layer for one stream, keeping only the last `window - 1` positions.

    The query itself is the window's last member, so older keys can never be attended again. Grows by
    concatenation: simple and exact, the CPU default. Per forward: `begin`, then `extend` per layer, `end`.
    """

    def __init__(self, window: int, n_layers: int) -> None:
        self.window = window
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # [T, H_kv, head_dim], RoPE applied
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.positions: torch.Tensor | None = None  # [T] absolute positions, shared by all layers
        self._key_positions: torch.Tensor | None = None

    def prepare(self, total_positions: int) -> None:
        """Nothing to do: this cache sizes itself as it goes (see StaticKVCache.prepare)."""

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Start a forward over new `positions`; return the positions of the keys every layer will see."""
        previous = self.positions
        self._key_positions = positions if previous is None else torch.cat((previous, positions))
        return self._key_positions

    def slot_buffers(self, layer: int) -> None:
        """None: this cache takes new keys and values by concatenation in `attended`."""

    def attended(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached + new keys and values of a layer; keeps only what later queries can still see."""
        if self.keys[layer] is not None:
            keys = torch.cat((self.keys[layer], keys))
            values = torch.cat((self.values[layer], values))
        keep = self.window - 1
        self.keys[layer], self.values[layer] = keys[-keep:], values[-keep:]
        return keys, values

    def end(self) -> None:
        """Finish the forward: trim the shared positions like the keys."""
        self.positions = self._key_positions[-(self.window - 1) :]

    def __len__(self) -> int:
        return 0 if self.positions is None else self.positions.shape[0]


MIN_SPAN = 64  # smallest slice of a static cache attention reads; spans double from here
SLOT_ALIGNMENT = 64  # static capacities are whole multiples, which attention kernels read best


class StaticKVCache:
    """Preallocated rings of slots (slot = position % capacity) for every layer of one stream: fixed
    addresses for CUDA graphs, and attention reads only the filled prefix (rounded up to a power of two)
    until the ring wraps. Capacity covers `window - 1 + block`, so a block of new keys never overwrites one
    it still needs.
    """

    def __init__(
        self, window: int, block: int, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype, device
    ) -> None:
        self.window = window
        self.capacity = -(-(window - 1 + block) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.keys = torch.zeros(n_layers, self.capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # Empty slots hold a position no query is ever within the window of.
        self.positions = torch.full((self.capacity,), -2 * self.capacity - window, dtype=torch.long, device=device)
        self.filled = 0
        self.span = 0
        self._slots: torch.Tensor | None = None

    def prepare(self, total_positions: int) -> None:
        """Host-side bookkeeping before a forward after which the stream holds `total_positions` positions:
        sets the slice the forward reads (and so which CUDA graph serves it)."""
        self.filled = min(total_positions, self.capacity)
        self.span = span_for(total_positions, self.capacity)

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Write the new positions into their slots; return the key positions of the slice attention reads."""
        self._slots = positions % self.capacity
        self.positions.index_copy_(0, self._slots, positions)
        return self.positions[: self.span]

    def begin_with_inputs(
        self, positions: torch.Tensor, inv_freq: torch.Tensor, window: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`begin`, and the forward's rotations and attention bias over the slice it reads, in one kernel."""
        self._slots, rotations, bias = fused_position_inputs(
            positions, inv_freq, self.positions, self.span, window, dtype
        )
        return rotations, bias

    def slot_buffers(self, layer: int) -> SlotBuffers:
        """A layer's key and value rings and the slots of this forward's positions, where `attention_inputs`
        writes the new keys and values (in the same kernel that computes them, when compiled)."""
        return self.keys[layer], self.values[layer], self._slots

    def attended(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice of a layer's rings attention reads (the new keys and values are in their slots already;
        the mask drops stale and empty slots)."""
        return self.keys[layer, : self.span], self.values[layer, : self.span]

    def end(self) -> None:
        """Nothing to trim: the ring overwrites what no query can see any more."""

    def spans(self) -> list[int]:
        """Every span `prepare` can choose, smallest first."""
        spans = [span_for(1, self.capacity)]
        while spans[-1] < self.capacity:
            spans.append(span_for(spans[-1] + 1, self.capacity))
        return spans

    def __len__(self) -> int:
        return min(self.filled, self.window - 1)


def warm_attention_spans(attend: Callable[..., torch.Tensor], cache: StaticKVCache, heads: int, rows: int) -> None:
    """Run a step's `attend` on `rows` zero queries once at every span `cache` can read, at start-up. A step's
    first run at a span new to the process took 100 to 250 ms on an H200 against 9 to 12 ms later (what is
    prepared per shape was not pinned down); with this warm-up no stream's step waited for that."""
    keys, values = cache.keys[0], cache.values[0]
    queries = keys.new_zeros(heads, rows, keys.shape[-1])
    for span in cache.spans():
        attend(queries, keys[:span], values[:span], keys.new_zeros(rows, span))


def span_for(total_positions: int, capacity: int) -> int:
    """Slots to read once `total_positions` positions exist: a power of two from MIN_SPAN, at most capacity."""
    span = MIN_SPAN
    while span < total_positions and span < capacity:
        span *= 2
    return min(span, capacity)


KVCache = RollingKVCache | StaticKVCache
SlotBuffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a layer's key and value rings, this forward's slots
# Queries [heads, T, head_dim], keys and values [T, kv_heads, head_dim].
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Causal sliding-window grouped-query attention with RoPE; q, v, o biases where the weights have them.

    Loaded under the Mistral names (wq, wk, wv, wo); `fuse` then merges q, k, v into one projection.
    """

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        q_dim, kv_dim = params.n_heads * params.head_dim, params.n_kv_heads * params.head_dim
        bias = params.use_biases
        self.wq = nn.Linear(params.dim, q_dim, bias=bias)
        self.wk = nn.Linear(params.dim, kv_dim, bias=False)
        self.wv = nn.Linear(params.dim, kv_dim, bias=bias)
        self.wo = nn.Linear(q_dim, params.dim, bias=bias)
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim

    def fuse(self) -> None:
        """One [q; k; v] projection instead of three: one weight read, one kernel (k gets a zero bias)."""
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        self.wqkv = nn.Linear(weight.shape[1], weight.shape[0], bias=self.wq.bias is not None, device="meta")
        self.wqkv.weight = nn.Parameter(weight, requires_grad=False)
        if self.wq.bias is not None:
            zeros = torch.zeros_like(self.wk.weight[:, 0])
            self.wqkv.bias = nn.Parameter(torch.cat((self.wq.bias, zeros, self.wv.bias)), requires_grad=False)
        del self.wq, self.wk, self.wv

    def heads(self, qkv: torch.Tensor, rotations: torch.Tensor) -> QKV:
        """The q/k/v projection's output [T, (heads + 2 kv_heads) head_dim] -> queries [heads, T, head_dim], and
        keys and values [T, kv_heads, head_dim]; RoPE applied to queries and keys."""
        qk, v = self._query_keys_and_values(qkv)
        return self._split(RotaryEmbedding.apply(qk, rotations), v)

    def rotated_heads(self, qkv: torch.Tensor) -> QKV:
        """`heads` of a q/k/v output whose queries and keys are rotated already (by the product's kernel)."""
        return self._split(*self._query_keys_and_values(qkv))

    def _query_keys_and_values(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length, heads, kv_heads, head_dim = qkv.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = qkv.split(((heads + kv_heads) * head_dim, kv_heads * head_dim), dim=-1)
        return qk.view(length, heads + kv_heads, head_dim), v.view(length, kv_heads, head_dim)

    def _split(self, qk: torch.Tensor, v: torch.Tensor) -> QKV:
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=1)
        return q.transpose(0, 1), k, v

    @staticmethod
    def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Queries [heads, T, head_dim] against keys and values [S, kv_heads, head_dim] with `bias` [T, S] from
        `attention_bias`; query head n reads KV head n // group, without repeating keys. -> [heads, T, head_dim]"""
        return F.scaled_dot_product_attention(
            q[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=bias[None, None],
            enable_gqa=q.shape[0] != keys.shape[1],
        )[0]

    @staticmethod
    def position_major(attended: torch.Tensor) -> torch.Tensor:
        """`attend`'s result [heads, T, head_dim] as the output projection's input [T, heads * head_dim]."""
        return attended.transpose(0, 1).flatten(1)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); only w2 may carry a bias (the encoder's).

    Loaded under the Mistral names; `fuse` then merges w1 and w3 into one projection.
    """

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.w1 = nn.Linear(params.dim, params.hidden_dim, bias=False)
        self.w2 = nn.Linear(params.hidden_dim, params.dim, bias=params.use_biases)
        self.w3 = nn.Linear(params.dim, params.hidden_dim, bias=False)

    def fuse(self) -> None:
        """One [w1; w3] projection instead of two."""
        weight = torch.cat((self.w1.weight, self.w3.weight))
        self.w13 = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.w13.weight = nn.Parameter(weight, requires_grad=False)
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: attention then SwiGLU, both residual; the decoder scales the FFN input."""

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.attention = Attention(params)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)
        self.feed_forward = FeedForward(params)

    def forward(
        self,
        x: torch.Tensor,
        rotations: torch.Tensor,
        cache: KVCache,
        index: int,
        bias: torch.Tensor,
        ffn_scale: torch.Tensor | None = None,
        functions: BlockFunctions | None = None,
    ) -> torch.Tensor:
        """x [T, dim] at the positions `rotations` and `bias` were made for; layer `index` of `cache`."""
        functions = functions or EAGER
        q, k, v = functions.attention_inputs(self, x, rotations, cache.slot_buffers(index))
        keys, values = cache.attended(index, k, v)
        return functions.attention_output_and_ffn(self, x, functions.attend(q, keys, values, bias), ffn_scale)


def attention_inputs(block: Block, x: torch.Tensor, rotations: torch.Tensor, slot_buffers: SlotBuffers | None) -> QKV:
    """The block's half before attention: norm, q/k/v and RoPE; writes keys and values into a static cache's
    slots when given them."""
    q, k, v = block.attention.heads(block.attention.wqkv(block.attention_norm(x)), rotations)
    if slot_buffers is not None:
        keys, values, slots = slot_buffers
        keys.index_copy_(0, slots, k)
        values.index_copy_(0, slots, v)
    return q, k, v


def attention_output_and_ffn(
    block: Block, x: torch.Tensor, attended: torch.Tensor, ffn_scale: torch.Tensor | None
) -> torch.Tensor:
    """The block's half after attention: output projection, residual, FFN norm (times the scale), SwiGLU,
    residual."""
    x = x + block.attention.wo(Attention.position_major(attended))
    h = block.ffn_norm(x)
    if ffn_scale is not None:
        h = h * ffn_scale
    return x + block.feed_forward(h)


def step_attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, overlap: Overlap = DEFAULT_OVERLAP
) -> torch.Tensor:
    """`Attention.attend` for a step's few query rows: the split-key Triton kernels where they can run (about
    half of cuDNN's time for an encoder step), SDPA otherwise."""
    rows = q.shape[0] // keys.shape[1] * q.shape[1]
    if rows <= MAX_ROWS and step_attention_available(q.device):
        return step_attention(q, keys, values, bias, overlap)
    return Attention.attend(q, keys, values, bias)


class BlockFunctions(NamedTuple):
    """A block's half before attention, attention itself and the half after it: eager or compiled."""

    attention_inputs: Callable[..., QKV]
    attend: Callable[..., torch.Tensor]
    attention_output_and_ffn: Callable[..., torch.Tensor]


EAGER = BlockFunctions(attention_inputs, Attention.attend, attention_output_and_ffn)
COMPILE_OPTIONS = {"emulate_precision_casts": True}  # round where eager rounds


@functools.cache
def compiled_block_functions() -> BlockFunctions:
    """Both halves compiled by inductor, once per process and shared by every layer of the same shapes: the
    norms, RoPE, cache writes, biases, activations and residual adds fuse into a few kernels between the
    matrix products. Roundings are kept where eager rounds, so the compiled path computes what eager does.
    Attention stays outside, as `step_attend`, so one compilation serves every cache span."""

    def compiled(function: Callable) -> Callable:
        return torch.compile(function, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS)

    return BlockFunctions(compiled(attention_inputs), step_attend, compiled(attention_output_and_ffn))


def fused_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    norm: Norm | None = None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    heads: Heads | None = None,
    prefetch: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """A step's product with its fused work: `matvec` for one row without a bias (the decoder's), the tensor-core
    `rows_matmul` otherwise (the encoder's 4 rows)."""
    product = matvec if x.shape[0] == 1 and bias is None else functools.partial(rows_matmul, bias=bias)
    return product(
        x, weight, norm=norm, swiglu=swiglu, residual=residual, heads=heads, prefetch=prefetch, overlap=overlap
    )


def fused_attention_inputs(
    block: Block,
    x: torch.Tensor,
    rotations: torch.Tensor,
    slot_buffers: SlotBuffers | None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> QKV:
    """`attention_inputs` for a step as one kernel: the norm, the q/k/v product and its bias, RoPE and the cache
    writes; it starts the output projection's weight into L2."""
    norm, attention = block.attention_norm, block.attention
    q_dim, kv_dim = attention.n_heads * attention.head_dim, attention.n_kv_heads * attention.head_dim
    qkv = fused_product(
        x,
        attention.wqkv.weight,
        bias=attention.wqkv.bias,
        norm=Norm(norm.weight, norm.eps),
        heads=Heads(rotations, q_dim, kv_dim, attention.head_dim, slot_buffers),
        prefetch=attention.wo.weight,
        overlap=overlap,
    )
    return attention.rotated_heads(qkv)


def fused_attention_output_and_ffn(
    block: Block,
    x: torch.Tensor,
    attended: torch.Tensor,
    ffn_scale: torch.Tensor | None,
    following: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """`attention_output_and_ffn` for a step as three kernels: the output product with its bias and the
    residual add, w1 and w3 with the FFN norm, its scale and SwiGLU, and w2 with its bias and the residual add.
    Each starts the next product's weight into L2; the last, `following` (the next block's q/k/v weight)."""
    wo, ffn = block.attention.wo, block.feed_forward
    x = fused_product(
        Attention.position_major(attended), wo.weight, bias=wo.bias, residual=x, prefetch=ffn.w13.weight,
        overlap=overlap,
    )  # fmt: skip
    norm = Norm(block.ffn_norm.weight, block.ffn_norm.eps, ffn_scale)
    hidden = fused_product(x, ffn.w13.weight, norm=norm, swiglu=True, prefetch=ffn.w2.weight, overlap=overlap)
    return fused_product(hidden, ffn.w2.weight, bias=ffn.w2.bias, residual=x, prefetch=following, overlap=overlap)


def fused_block_functions(blocks: nn.ModuleList, overlap: Overlap = DEFAULT_OVERLAP) -> BlockFunctions:
    """The steps of `blocks` as the fused product kernels (`fused_product`), `step_attend` between: five kernels
    a layer, each overlapping its neighbours under `overlap` (see `kernel_overlap`)."""
    following = {id(block): after.attention.wqkv.weight for block, after in itertools.pairwise(blocks)}

    def attention_output_and_ffn(
        block: Block, x: torch.Tensor, attended: torch.Tensor, ffn_scale: torch.Tensor | None
    ) -> torch.Tensor:
        return fused_attention_output_and_ffn(block, x, attended, ffn_scale, following.get(id(block)), overlap)

    return BlockFunctions(
        functools.partial(fused_attention_inputs, overlap=overlap),
        functools.partial(step_attend, overlap=overlap),
        attention_output_and_ffn,
    )


def fused_products_serve(blocks: nn.ModuleList) -> bool:
    """Whether `fused_block_functions` can run these blocks' steps: a device the kernels run on."""
    weight = blocks[0].attention.wqkv.weight
    return matvec_available(weight.device) and rows_matmul_available(weight.device)


def fuse_projections(module: nn.Module) -> None:
    """Fuse every attention and feed-forward projection group in a loaded module tree."""
    for child in list(module.modules()):
        if isinstance(child, (Attention, FeedForward)):
            child.fuse()
