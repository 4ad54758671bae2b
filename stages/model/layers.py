"""Transformer building blocks shared by the audio encoder and the text decoder, under the Mistral weight names.

Batch-first throughout: activations [batch, T, dim]. The roundings follow the reference's bf16 behaviour
(docs/MODEL.md §10): a norm scales by its weight after rounding to the activation dtype, and RoPE's cos/sin are
computed in float32 and rounded before the rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.model.cache import KVCache
from voxtral_run.stages.model.checkpoint import TransformerParams


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32, round to the activation dtype, then scale by the weight in that dtype."""
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
    """Interleaved RoPE (the rotation planes are element pairs 2i, 2i+1 of each head) at absolute positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # On the CPU whatever the default device: under a meta device (a model built before its weights load),
        # this division would go through torch's reference ops and import torch._dynamo (seconds of start-up).
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def rotations(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos and sin of the angles of positions [batch, T]: [2, batch, T, head_dim / 2], computed in float32
        and rounded to the activation dtype."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        return torch.stack((angles.cos(), angles.sin())).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Rotate x [batch, T, heads, head_dim] in its own dtype, each product rounded as the reference's
        rotate-half rounds it."""
        cos, sin = rotations[0][:, :, None], rotations[1][:, :, None]
        even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def attention_bias(
    positions: torch.Tensor, key_positions: torch.Tensor, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [batch, T, S]: 0 where key j is within query i's sliding window (0 <= i - j < window)."""
    distance = positions[:, :, None] - key_positions[:, None, :]
    visible = (distance >= 0) & (distance < window)
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def position_inputs(
    positions: torch.Tensor, rope: RotaryEmbedding, cache: KVCache, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's RoPE rotations and attention bias at positions [batch, T], which enter `cache`."""
    key_positions = cache.begin(positions)
    return rope.rotations(positions, dtype), attention_bias(positions, key_positions, cache.window, dtype)


class Attention(nn.Module):
    """Causal sliding-window grouped-query attention with RoPE; q, v and o biases where the weights have them.

    Loaded under the Mistral names (wq, wk, wv, wo); `fuse` then merges q, k and v into one projection.
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
        """One [q; k; v] projection instead of three: one weight read (k gets a zero bias)."""
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        self.wqkv = nn.Linear(weight.shape[1], weight.shape[0], bias=self.wq.bias is not None, device="meta")
        self.wqkv.weight = nn.Parameter(weight, requires_grad=False)
        if self.wq.bias is not None:
            zeros = torch.zeros_like(self.wk.weight[:, 0])
            self.wqkv.bias = nn.Parameter(torch.cat((self.wq.bias, zeros, self.wv.bias)), requires_grad=False)
        del self.wq, self.wk, self.wv

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, bias: torch.Tensor, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """x [batch, T, dim] (normed) -> [batch, T, dim]; the new keys and values enter layer `layer` of the
        cache, and each query head n reads KV head n // group."""
        batch, length = x.shape[:2]
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.wqkv(x).split(((heads + kv_heads) * head_dim, kv_heads * head_dim), dim=-1)
        qk = RotaryEmbedding.apply(qk.view(batch, length, heads + kv_heads, head_dim), rotations)
        q, k = qk.split((heads, kv_heads), dim=2)
        keys, values = cache.update(layer, k, v.view(batch, length, kv_heads, head_dim))
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=bias[:, None],
            enable_gqa=heads != kv_heads,
        )
        return self.wo(attended.transpose(1, 2).flatten(2))


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
        bias: torch.Tensor,
        cache: KVCache,
        layer: int,
        ffn_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [batch, T, dim] at the positions `rotations` and `bias` were made for; layer `layer` of `cache`."""
        x = x + self.attention(self.attention_norm(x), rotations, bias, cache, layer)
        h = self.ffn_norm(x)
        if ffn_scale is not None:
            h = h * ffn_scale
        return x + self.feed_forward(h)


def fuse_projections(module: nn.Module) -> None:
    """Fuse every attention and feed-forward projection group in a loaded module tree."""
    for child in list(module.modules()):
        if isinstance(child, (Attention, FeedForward)):
            child.fuse()
