"""Transformer building blocks shared by the audio encoder and the text decoder (Mistral weight names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.checkpoint import TransformerParams


class RMSNorm(nn.Module):
    """RMSNorm as the reference computes it: normalise in fp32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Interleaved RoPE (rotation planes are row pairs 2i, 2i+1 of each head) at absolute positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim/2], computed in fp32 and cast to the activation dtype (as the reference)."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, H, head_dim] by the angles of its positions."""
        pairs = x.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class RollingKVCache:
    """Keys and values of one attention layer for one stream, keeping only the last `window - 1` positions.

    The query itself is the window's last member, so older keys can never be attended again. Grows by
    concatenation: simple and exact, the CPU default.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: torch.Tensor | None = None  # [T, H_kv, head_dim], RoPE already applied
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [T] absolute positions

    def prepare(self, total_positions: int) -> None:
        """Nothing to do: this cache sizes itself as it goes (see StaticKVCache.prepare)."""

    def extend(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return cached + new keys, values and positions, then keep only what later queries can still see."""
        if self.keys is not None:
            keys = torch.cat((self.keys, keys))
            values = torch.cat((self.values, values))
            positions = torch.cat((self.positions, positions))
        keep = self.window - 1
        self.keys, self.values, self.positions = keys[-keep:], values[-keep:], positions[-keep:]
        return keys, values, positions

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]


MIN_SPAN = 64  # smallest slice of a static cache attention reads; spans double from here


class StaticKVCache:
    """A preallocated ring of slots (slot = position % capacity) for one layer and stream: fixed addresses
    for CUDA graphs, and attention reads only the filled prefix (rounded up to a power of two) until the
    ring wraps. `capacity = window - 1 + block` so a block of new keys never overwrites one it still needs.
    """

    def __init__(self, window: int, block: int, n_kv_heads: int, head_dim: int, *, dtype, device) -> None:
        self.window = window
        self.capacity = window - 1 + block
        self.keys = torch.zeros(self.capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # Empty slots hold a position no query is ever within the window of.
        self.positions = torch.full((self.capacity,), -2 * self.capacity - window, dtype=torch.long, device=device)
        self.filled = 0
        self.span = 0

    def prepare(self, total_positions: int) -> None:
        """Set the slice the next call reads, for a stream that will then hold `total_positions` positions."""
        self.filled = min(total_positions, self.capacity)
        self.span = span_for(total_positions, self.capacity)

    def extend(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the new keys into their slots; return the slots attention reads (the mask drops stale ones)."""
        slots = positions % self.capacity
        self.keys.index_copy_(0, slots, keys)
        self.values.index_copy_(0, slots, values)
        self.positions.index_copy_(0, slots, positions)
        return self.keys[: self.span], self.values[: self.span], self.positions[: self.span]

    def __len__(self) -> int:
        return min(self.filled, self.window - 1)


def span_for(total_positions: int, capacity: int) -> int:
    """Slots to read once `total_positions` positions exist: a power of two from MIN_SPAN, at most capacity."""
    span = MIN_SPAN
    while span < total_positions and span < capacity:
        span *= 2
    return min(span, capacity)


KVCache = RollingKVCache | StaticKVCache


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
        self.window = params.sliding_window
        self.split = (q_dim, kv_dim, kv_dim)

    def fuse(self) -> None:
        """One [q; k; v] projection instead of three: one weight read, one kernel (k gets a zero bias)."""
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        self.wqkv = nn.Linear(weight.shape[1], weight.shape[0], bias=self.wq.bias is not None, device="meta")
        self.wqkv.weight = nn.Parameter(weight, requires_grad=False)
        if self.wq.bias is not None:
            zeros = torch.zeros_like(self.wk.weight[:, 0])
            self.wqkv.bias = nn.Parameter(torch.cat((self.wq.bias, zeros, self.wv.bias)), requires_grad=False)
        del self.wq, self.wk, self.wv

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """x [T, dim] at absolute `positions` [T]; attends to the cache and itself; updates the cache."""
        length = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split, dim=-1)
        q = RotaryEmbedding.apply(q.view(length, self.n_heads, self.head_dim), cos, sin)
        k = RotaryEmbedding.apply(k.view(length, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(length, self.n_kv_heads, self.head_dim)
        keys, values, key_positions = cache.extend(k, v, positions)
        distance = positions[:, None] - key_positions[None, :]
        mask = (distance >= 0) & (distance < self.window)
        group = self.n_heads // self.n_kv_heads
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=group > 1
        )
        return self.wo(out.transpose(0, 1).reshape(length, self.n_heads * self.head_dim))


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


def fuse_projections(module: nn.Module) -> None:
    """Fuse every attention and feed-forward projection group in a loaded module tree."""
    for child in list(module.modules()):
        if isinstance(child, (Attention, FeedForward)):
            child.fuse()
