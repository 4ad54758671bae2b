"""8-bit floats (e4m3) with float32 scales: how KV caches and the decoder's linear weights are stored in 8 bits.

A vector (a head's key or value at one position, a weight's output channel) is stored as e4m3 values and one
float32 scale, its largest magnitude over E4M3_MAX, so that value maps to the largest e4m3 number. e4m3 keeps 3
bits of mantissa: a value comes back within 2^-4 of itself relative (round to nearest), or within 2^-10 of the
scale where it falls below e4m3's normal range (2^-6 of the scale's unit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max  # 448
# Rounding errors of e4m3 round to nearest: relative for normal values, in units of the scale below them.
E4M3_RELATIVE_ERROR = 2.0**-4
E4M3_SUBNORMAL_ERROR = 2.0**-10


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] -> (e4m3 values [..., n], float32 scales [...]): each vector along the last dimension over its
    largest magnitude times E4M3_MAX. An all-zero vector gets scale 0 and zeros."""
    full = x.float()
    scales = full.abs().amax(-1) / E4M3_MAX
    divisors = torch.where(scales > 0, scales, 1.0)
    return (full / divisors[..., None]).to(FP8), scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize`'s inverse, rounded to `dtype`: values [..., n] times their scales [...]."""
    return (values.float() * scales[..., None]).to(dtype)


def store_quantized(new: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, at: torch.Tensor) -> None:
    """Vectors new [n, ..., d] quantized into entries `at` [n] of e4m3 `values` [N, ..., d] and float32 `scales`
    [N, ...]."""
    quantized, new_scales = quantize(new)
    # As bytes: index_copy_ takes no e4m3 tensor (on the CPU at least).
    values.view(torch.uint8).index_copy_(0, at, quantized.view(torch.uint8))
    scales.index_copy_(0, at, new_scales)


class Fp8Linear(nn.Module):
    """A bias-free linear layer whose weight [out, in] is stored in e4m3 with a float32 scale per output channel:
    the product with the stored values, times each output's scale, rounded once more to the input's dtype."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        values, scales = quantize(weight.detach())
        self.weight = nn.Parameter(values, requires_grad=False)
        self.weight_scale = nn.Parameter(scales, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.bias = None  # as a bias-free nn.Linear has it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # e4m3 values are exact in bf16, fp16 and float32, so only the product and the scaling round.
        return (F.linear(x, self.weight.to(x.dtype)) * self.weight_scale).to(x.dtype)


def quantize_linears(module: nn.Module, names: tuple[str, ...]) -> None:
    """Replace the linear layers of `module`'s tree named `names` (attribute names, e.g. "wqkv") by Fp8Linear."""
    for child in list(module.modules()):
        for name in names:
            linear = getattr(child, name, None)
            if isinstance(linear, nn.Linear):
                if linear.bias is not None:
                    raise ValueError(f"quantize_linears: {name} has a bias, which Fp8Linear does not take")
                setattr(child, name, Fp8Linear(linear.weight))
