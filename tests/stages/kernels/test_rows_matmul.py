"""The fused few-row tensor-core product kernel (in Triton's CPU interpreter here) computes what eager does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from voxtral_run.stages.kernels.matvec import Norm
from voxtral_run.stages.kernels.rows_matmul import (
    MAX_BLOCK_K,
    TILE_ROWS,
    RowsConfig,
    rows_config,
    rows_matmul,
    rows_matmul_available,
)
from voxtral_run.stages.kernels.step_attention import split_tickets
from voxtral_run.stages.model.layers import rms_norm
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE

pytestmark = pytest.mark.skipif(
    not rows_matmul_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)"
)

EPS = 1e-5
# The interpreter's default (one program, one tile), narrow column blocks over several tiles, and reductions
# split over 2 and 4 programs per column block.
CONFIGS = [None, RowsConfig(16, 32, 1, 2, 4), RowsConfig(32, 16, 2, 1, 4), RowsConfig(16, 16, 4, 3, 4)]


def tensors(rows: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Input rows, a weight, a bias, a norm weight, a scale and residual rows."""
    generator = torch.Generator().manual_seed(seed)

    def random(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (offset + scale * torch.randn(*shape, generator=generator)).to(dtype)

    return (
        random(rows, k), random(n, k, scale=0.1), random(n, scale=0.1), random(k, scale=0.1, offset=1.0),
        random(k), random(rows, n),
    )  # fmt: skip


@pytest.mark.parametrize("rows", [1, 4, TILE_ROWS])
@pytest.mark.parametrize("config", CONFIGS)
def test_each_fusion_equals_the_eager_ops_in_float32(rows, config) -> None:
    x, weight, bias, norm_weight, scale, residual = tensors(rows, 64, 64, torch.float32)
    normed = rms_norm(x, norm_weight, EPS)
    cases = [
        (rows_matmul(x, weight, config=config), F.linear(x, weight)),
        (rows_matmul(x, weight, bias=bias, config=config), F.linear(x, weight, bias)),
        (rows_matmul(x, weight, norm=Norm(norm_weight, EPS), bias=bias, config=config), F.linear(normed, weight, bias)),
        (rows_matmul(x, weight, norm=Norm(norm_weight, EPS, scale), config=config), F.linear(normed * scale, weight)),
        (rows_matmul(x, weight, bias=bias, residual=residual, config=config), residual + F.linear(x, weight, bias)),
    ]
    if config is None or config.split_k == 1:
        gate, up = F.linear(normed, weight).chunk(2, dim=-1)
        swiglu = rows_matmul(x, weight, norm=Norm(norm_weight, EPS), swiglu=True, config=config)
        cases.append((swiglu, F.silu(gate) * up))
    for ours, eager in cases:
        assert ours.shape == eager.shape
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)


def test_a_split_reduction_leaves_its_counters_at_zero_for_the_next_launch() -> None:
    """Every split launch's last program resets its column blocks' counters: launches after it (and graph
    replays) see zeros, add their partial sums once and give the same result."""
    x, weight, bias, *_ = tensors(4, 64, 64, torch.float32, seed=3)
    config = RowsConfig(16, 16, 4, 1, 4)
    first = rows_matmul(x, weight, bias=bias, config=config)
    assert not split_tickets(x.device).any()
    assert torch.equal(rows_matmul(x, weight, bias=bias, config=config), first)
    torch.testing.assert_close(first, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_gpu_launches_fit_the_encoder_and_load_each_programs_whole_share_as_one_tile() -> None:
    """On a GPU every encoder product's launch fits its shape, and but for SwiGLU's gives each program one
    tile of at most MAX_BLOCK_K weight columns: its whole share, loaded before it waits for its predecessor."""
    real = REAL_SIZE
    q_dim = real.enc_heads * real.enc_head_dim
    products = [(3 * q_dim, real.enc_dim), (real.enc_dim, q_dim), (real.enc_dim, real.enc_hidden_dim)]
    for n, k in products:
        config = rows_config(n, k, torch.device("cuda"), swiglu=False)
        assert n % config.block_n == 0
        assert config.block_k * config.split_k == k
        assert config.block_k <= MAX_BLOCK_K and config.block_k & (config.block_k - 1) == 0
    swiglu = rows_config(real.enc_hidden_dim, real.enc_dim, torch.device("cuda"), swiglu=True)
    assert swiglu.split_k == 1 and real.enc_hidden_dim % swiglu.block_n == 0 and real.enc_dim % swiglu.block_k == 0


def test_16_bit_results_round_where_eager_rounds() -> None:
    """Through an identity weight the product adds nothing of its own: what remains are the norm's, the
    bias add's, SwiGLU's and the residual add's roundings, which must be eager's (to the last bit, which the
    norm's own float32 reduction order may move). In float16: Triton's interpreter truncates to bfloat16
    where a GPU rounds to nearest, and the kernel's code is the same for both types."""
    x, _, bias, norm_weight, scale, residual = tensors(4, 64, 64, torch.float16, seed=1)
    identity = torch.eye(64, dtype=torch.float16)
    normed = rms_norm(x, norm_weight, EPS) * scale
    ulp = {"rtol": 2**-10, "atol": 1e-6}
    torch.testing.assert_close(rows_matmul(x, identity, norm=Norm(norm_weight, EPS, scale)), normed, **ulp)
    swiglu = rows_matmul(x, torch.cat((identity, identity)), norm=Norm(norm_weight, EPS, scale), swiglu=True)
    torch.testing.assert_close(swiglu, F.silu(normed) * normed, **ulp)
    # The bias joins the product before its one rounding, as cuBLAS's bias epilogue does: through I + a
    # permutation each column sums two inputs, exactly in float32 but not in float16.
    shift = torch.roll(identity, 1, dims=0)
    summed = x.float() + x.float() @ shift.float().T
    assert torch.equal(rows_matmul(x, identity + shift, bias=bias), (summed + bias.float()).half())
    assert torch.equal(rows_matmul(x, identity, residual=residual), residual + x)


def test_16_bit_products_are_as_close_to_exact_as_eager() -> None:
    """In float16, for the interpreter's sake (see above)."""
    x, weight, bias, norm_weight, scale, residual = tensors(4, 128, 256, torch.float16, seed=2)
    norm = Norm(norm_weight, EPS, scale)
    exact = residual.double() + F.linear(
        rms_norm(x.double(), norm_weight.double(), EPS) * scale, weight.double(), bias.double()
    )
    eager = residual + F.linear(rms_norm(x, norm_weight, EPS) * scale, weight, bias)
    for config in CONFIGS:
        ours = rows_matmul(x, weight, bias=bias, norm=norm, residual=residual, config=config)
        assert ours.dtype == torch.float16
        assert (ours.double() - exact).abs().max() <= 2 * (eager.double() - exact).abs().max()


def test_what_the_kernel_cannot_take_is_refused() -> None:
    x, weight, bias, *_ = tensors(TILE_ROWS + 1, 64, 64, torch.float32)
    with pytest.raises(ValueError, match=r"1 to 16 rows.*\[17, 64\]"):
        rows_matmul(x, weight)
    with pytest.raises(ValueError, match="SwiGLU takes no bias"):
        rows_matmul(x[:4], weight, bias=bias, swiglu=True)
    with pytest.raises(ValueError, match=r"does not fit a \[64, 64\] product"):
        rows_matmul(x[:4], weight, config=RowsConfig(48, 16, 1, 1, 4))
