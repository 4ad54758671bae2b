"""The fused one-row matrix-product kernel (in Triton's CPU interpreter here) computes what the eager blocks do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voxtral_run.stages.kernels.matvec import Heads, MatvecConfig, Norm, matvec, matvec_available
from voxtral_run.stages.kernels.rows_matmul import RowsConfig, rows_matmul
from voxtral_run.stages.model.checkpoint import TransformerParams
from voxtral_run.stages.model.fp8 import Fp8Linear, dequantize
from voxtral_run.stages.model.layers import RotaryEmbedding, rms_norm

pytestmark = pytest.mark.skipif(
    not matvec_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)"
)

EPS = 1e-5
# Launches as on a GPU (one column per program, one or several tiles) and wider ones, as the interpreter runs.
CONFIGS = [MatvecConfig(1, 32, 8), MatvecConfig(4, 16, 4), None]


def tensors(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """An input row, a weight, a norm weight, a scale and a residual row."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (offset + scale * torch.randn(*shape, generator=generator)).to(dtype)

    return random(1, k), random(n, k, scale=0.1), random(k, scale=0.1, offset=1.0), random(1, k), random(1, n)


# The whole row of a 96-wide input as one tile padded to 128 (the GPU's launch for rows that are no power of two).
PADDED = [(MatvecConfig(1, 128, 8), 96), (MatvecConfig(4, 128, 4), 96)]


@pytest.mark.parametrize(("config", "k"), [(config, 64) for config in CONFIGS] + PADDED)
def test_each_fusion_equals_the_eager_ops_in_float32(config, k) -> None:
    x, weight, norm_weight, scale, residual = tensors(96, k, torch.float32)
    normed = rms_norm(x, norm_weight, EPS)
    cases = [
        (matvec(x, weight, config=config), F.linear(x, weight)),
        (matvec(x, weight, norm=Norm(norm_weight, EPS), config=config), F.linear(normed, weight)),
        (matvec(x, weight, norm=Norm(norm_weight, EPS, scale), config=config), F.linear(normed * scale, weight)),
        (matvec(x, weight, residual=residual, config=config), residual + F.linear(x, weight)),
        (matvec(x, weight, gelu=True, config=config), F.gelu(F.linear(x, weight))),
    ]
    gate, up = F.linear(normed * scale, weight).chunk(2, dim=-1)
    swiglu = matvec(x, weight, norm=Norm(norm_weight, EPS, scale), swiglu=True, config=config)
    cases.append((swiglu, F.silu(gate) * up))
    for ours, eager in cases:
        assert ours.shape == eager.shape
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


def test_16_bit_results_round_where_eager_rounds() -> None:
    """Through an identity weight the product adds nothing of its own: what remains are the norm's, the
    scale's, SwiGLU's and the residual add's roundings, which must be eager's (to the last bit, which the
    norm's own float32 reduction order may move). In float16: Triton's interpreter truncates to bfloat16
    where a GPU rounds to nearest, and the kernel's code is the same for both types."""
    x, _, norm_weight, scale, residual = tensors(64, 64, torch.float16, seed=1)
    identity = torch.eye(64, dtype=torch.float16)
    normed = rms_norm(x, norm_weight, EPS) * scale
    ulp = {"rtol": 2**-10, "atol": 1e-6}
    torch.testing.assert_close(matvec(x, identity, norm=Norm(norm_weight, EPS, scale)), normed, **ulp)
    swiglu = matvec(x, torch.cat((identity, identity)), norm=Norm(norm_weight, EPS, scale), swiglu=True)
    torch.testing.assert_close(swiglu, F.silu(normed) * normed, **ulp)
    assert torch.equal(matvec(x, identity, residual=residual), residual + x)
    torch.testing.assert_close(matvec(x, identity, gelu=True), F.gelu(x), **ulp)


def test_16_bit_products_are_as_close_to_exact_as_eager() -> None:
    """In float16, for the interpreter's sake (see above)."""
    x, weight, norm_weight, scale, residual = tensors(64, 512, torch.float16, seed=2)
    norm = Norm(norm_weight, EPS, scale)
    exact = residual.double() + F.linear(rms_norm(x.double(), norm_weight.double(), EPS) * scale, weight.double())
    eager = residual + F.linear(rms_norm(x, norm_weight, EPS) * scale, weight)
    for config in CONFIGS:
        ours = matvec(x, weight, norm=norm, residual=residual, config=config)
        assert ours.dtype == torch.float16
        assert (ours.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max()


def test_more_than_one_row_is_refused() -> None:
    x, weight, *_ = tensors(8, 16, torch.float32)
    with pytest.raises(ValueError, match=r"one row.*\[2, 16\]"):
        matvec(torch.cat((x, x)), weight)


@pytest.mark.parametrize("config", [MatvecConfig(1, 64, 8), MatvecConfig(1, 48, 8), MatvecConfig(6, 32, 8)])
def test_a_launch_that_does_not_fit_the_product_is_refused(config) -> None:
    """Tiles that split a row unevenly, or tiles or column blocks of no power of two."""
    x, weight, *_ = tensors(96, 96, torch.float32)
    with pytest.raises(ValueError, match=r"does not fit a \[96, 96\] product"):
        matvec(x, weight, config=config)


HEADS = TransformerParams(
    dim=128, n_layers=1, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=EPS,
    sliding_window=8, use_biases=False,
)  # fmt: skip


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A q/k/v output [rows, (heads + 2 kv_heads) head_dim] as queries, keys and values [rows, heads, head_dim]."""
    heads = qkv.view(qkv.shape[0], -1, HEADS.head_dim)
    return heads.split((HEADS.n_heads, HEADS.n_kv_heads, HEADS.n_kv_heads), dim=1)


def test_a_qkv_product_takes_whole_column_blocks_only() -> None:
    """Its epilogue pairs a block's columns for RoPE, so a last block past the output's end is refused."""
    x, weight, *_ = tensors(96, 64, torch.float32)
    rotations = RotaryEmbedding(16, 1e6).rotations(torch.arange(1)[None], x.dtype)[:, 0]
    with pytest.raises(ValueError, match=r"does not fit a \[96, 64\] product"):
        matvec(x, weight, heads=Heads(rotations, 64, 16, 16), config=MatvecConfig(64, 64, 4))


@pytest.mark.parametrize(
    ("product", "rows", "config"),
    [
        (matvec, 1, None), (matvec, 1, MatvecConfig(4, 32, 4)), (matvec, 1, MatvecConfig(2, 32, 4)),
        (rows_matmul, 4, None), (rows_matmul, 4, RowsConfig(16, 32, 1, 1, 4)),
        (rows_matmul, 4, RowsConfig(32, 32, 2, 1, 4)),
    ],
    ids=["matvec", "matvec-4-columns", "matvec-2-columns", "rows", "rows-16-columns", "rows-split"],
)  # fmt: skip
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "no-cache"])
def test_a_qkv_product_rotates_and_caches_its_heads_as_eager_does(product, rows, config, cached) -> None:
    """Through an identity weight (a product that adds nothing of its own, in float16 for the interpreter's
    sake: see above), the q/k/v kernels' RoPE gives the model's bits, and the keys and values land in
    their ring slots and nowhere else."""
    x = tensors(HEADS.dim, rows * HEADS.dim, torch.float16, seed=5)[0].view(rows, HEADS.dim)
    positions = torch.arange(13, 13 + rows)
    rotations = RotaryEmbedding(HEADS.head_dim, HEADS.rope_theta).rotations(positions[None], x.dtype)
    keys = torch.zeros(HEADS.sliding_window, HEADS.n_kv_heads, HEADS.head_dim, dtype=x.dtype)
    values = torch.zeros_like(keys)
    slots = positions % HEADS.sliding_window
    q_dim, kv_dim = HEADS.n_heads * HEADS.head_dim, HEADS.n_kv_heads * HEADS.head_dim
    heads = Heads(rotations[:, 0], q_dim, kv_dim, HEADS.head_dim, (keys, values, slots) if cached else None)
    qkv = product(x, torch.eye(HEADS.dim, dtype=x.dtype), heads=heads, config=config)
    # The model's attention: RoPE on the queries' and keys' heads, then the heads split.
    qk = x[None, :, : q_dim + kv_dim].unflatten(-1, (-1, HEADS.head_dim))
    rotated = torch.cat((RotaryEmbedding.apply(qk, rotations)[0].flatten(1), x[:, q_dim + kv_dim :]), dim=1)
    expected, ours = split_heads(rotated), split_heads(qkv)
    for mine, eager in zip(ours, expected, strict=True):
        assert torch.equal(mine, eager)
    if cached:
        assert torch.equal(keys[slots], expected[1]) and torch.equal(values[slots], expected[2])
        others = torch.ones(HEADS.sliding_window, dtype=torch.bool).index_fill_(0, slots, False)
        assert not keys[others].any() and not values[others].any()
    else:
        assert not keys.any() and not values.any()


@pytest.mark.parametrize("config", CONFIGS)
def test_an_8_bit_weight_is_its_dequantized_weight_times_the_row(config) -> None:
    """An e4m3 weight with its output channels' scales, as `Fp8Linear` stores it: the kernel's result (with its
    fusions) is the float32 product with the dequantized weight, and `Fp8Linear`'s own."""
    x, weight, norm_weight, scale, residual = tensors(96, 64, torch.float32, seed=3)
    linear = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantized = Fp8Linear(linear.weight)
    stored, scales = quantized.weight, quantized.weight_scale
    dequantized = dequantize(stored, scales, torch.float32)
    normed = rms_norm(x, norm_weight, EPS) * scale
    with torch.inference_mode():
        torch.testing.assert_close(matvec(x, stored, weight_scale=scales, config=config), quantized(x))
    plain = matvec(x, stored, residual=residual, weight_scale=scales, config=config)
    torch.testing.assert_close(plain, residual + F.linear(x, dequantized))
    swiglu = matvec(x, stored, norm=Norm(norm_weight, EPS, scale), swiglu=True, weight_scale=scales, config=config)
    gate, up = F.linear(normed, dequantized).chunk(2, dim=-1)
    torch.testing.assert_close(swiglu, F.silu(gate) * up)
    with pytest.raises(ValueError, match="e4m3"):
        matvec(x, stored, config=config)
