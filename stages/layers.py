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

    The query itself is the window's last member, so older keys can never be attended again.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.keys: torch.Tensor | None = None  # [T, H_kv, head_dim], RoPE already applied
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [T] absolute positions

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


class Attention(nn.Module):
    """Causal sliding-window grouped-query attention with RoPE; q, v, o biases only where the weights have them."""

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

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: RollingKVCache,
    ) -> torch.Tensor:
        """x [T, dim] at absolute `positions` [T]; attends to the cache and itself; updates the cache."""
        length = x.shape[0]
        q = RotaryEmbedding.apply(self.wq(x).view(length, self.n_heads, self.head_dim), cos, sin)
        k = RotaryEmbedding.apply(self.wk(x).view(length, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(length, self.n_kv_heads, self.head_dim)
        keys, values, key_positions = cache.extend(k, v, positions)
        distance = positions[:, None] - key_positions[None, :]
        mask = (distance >= 0) & (distance < self.window)
        group = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(group, dim=1) if group > 1 else keys
        values = values.repeat_interleave(group, dim=1) if group > 1 else values
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask
        )
        return self.wo(out.transpose(0, 1).reshape(length, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x); only w2 may carry a bias (the encoder's)."""

    def __init__(self, params: TransformerParams) -> None:
        super().__init__()
        self.w1 = nn.Linear(params.dim, params.hidden_dim, bias=False)
        self.w2 = nn.Linear(params.hidden_dim, params.dim, bias=params.use_biases)
        self.w3 = nn.Linear(params.dim, params.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
