"""8-bit storage: e4m3 values with float32 scales come back within e4m3's rounding, in the KV cache and in the
decoder's linear layers; the pool's fresh pages read zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.model.cache import RESERVED_PAGES, KVPool, page_bytes
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.decoder import load_text_decoder
from voxtral_run.stages.model.fp8 import (
    E4M3_MAX,
    E4M3_RELATIVE_ERROR,
    E4M3_SUBNORMAL_ERROR,
    FP8,
    Fp8Linear,
    dequantize,
    quantize,
)

FLOAT32_SLACK = 1e-6  # float32's own rounding of a sum, relative to its terms' magnitudes


def e4m3_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """How far each value of x [..., n] may come back from e4m3 with its vector's scale [...]."""
    return E4M3_RELATIVE_ERROR * x.abs() + E4M3_SUBNORMAL_ERROR * scales[..., None]


def test_vectors_come_back_within_e4m3_rounding_and_their_largest_value_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    # Magnitudes over twelve orders, so that small values of a vector fall below e4m3's normal range.
    x = torch.randn(64, 8, 32, generator=generator) * 10.0 ** torch.randint(-6, 6, (64, 8, 1), generator=generator)
    x[3, 2] = 0.0
    values, scales = quantize(x)
    assert values.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (64, 8)
    back = dequantize(values, scales, torch.float32)
    assert ((back - x).abs() <= e4m3_bound(x, scales) * (1 + FLOAT32_SLACK)).all()
    assert (values.float().abs().amax(-1)[scales > 0] == E4M3_MAX).all()
    assert scales[3, 2] == 0 and (back[3, 2] == 0).all()


def test_an_8_bit_linear_layer_is_within_e4m3_rounding_of_its_float_weights() -> None:
    """Each output differs from the float product by at most the sum of its terms' weight errors."""
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(96, 40, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=generator) * torch.rand(40, 1, generator=generator))
    x = torch.randn(5, 96, generator=generator)
    quantized = Fp8Linear(linear.weight)
    with torch.inference_mode():
        ours, exact = quantized(x), F.linear(x.double(), linear.weight.double()).float()
    bound = x.abs() @ e4m3_bound(linear.weight, quantized.weight_scale).T
    assert ((ours - exact).abs() <= bound + FLOAT32_SLACK * (x.abs() @ linear.weight.abs().T)).all()
    assert quantized.weight.dtype == FP8 and quantized.weight_scale.shape == (40,)


def test_an_8_bit_lm_head_is_within_e4m3_rounding_of_the_tied_embeddings(tiny_model_dir) -> None:
    """`lm_head: fp8`: the logits of the normed states through an e4m3 copy of the embeddings, which stay as
    they were for the token inputs."""
    tied = load_text_decoder(ModelDir(tiny_model_dir), dtype=torch.float32, device="cpu")
    fp8 = load_text_decoder(ModelDir(tiny_model_dir), dtype=torch.float32, device="cpu", fp8_lm_head=True)
    assert fp8.lm_head is not None and fp8.lm_head.weight.dtype == FP8
    assert torch.equal(fp8.tok_embeddings.weight, tied.tok_embeddings.weight)
    hidden = torch.randn(2, 3, tied.params.decoder.dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        normed, ours, exact = tied.norm(hidden), fp8.logits(hidden), tied.logits(hidden)
    weight = tied.tok_embeddings.weight
    bound = normed.abs() @ e4m3_bound(weight, fp8.lm_head.weight_scale).T
    assert ((ours - exact).abs() <= bound + FLOAT32_SLACK * (normed.abs() @ weight.abs().T)).all()
    assert not torch.equal(ours, exact)


def test_an_8_bit_pool_halves_the_memory_less_the_scales_and_zeroes_pages_before_use() -> None:
    """Pages are handed out zeroed, scales included, whatever the memory held (here NaN everywhere)."""
    assert page_bytes(2, 8, 128, FP8) == page_bytes(2, 8, 128, torch.bfloat16) // 2 + 2 * 2 * 64 * 8 * 4
    pool = KVPool(12, 4, 2, 2, 16, max_streams=2, pages=4, dtype=FP8, device="cpu")
    assert all(tensor[:, :RESERVED_PAGES].float().eq(0).all() for tensor in pool._stored())
    for tensor in pool._stored():
        tensor[:, RESERVED_PAGES:].view(torch.uint8).fill_(0xFF)  # NaN in e4m3 and in float32
    row = pool.admit(12)
    pool.grow(row, 12)
    pages = pool.table[row, : pool.pages_for(12)]
    assert all(tensor[:, pages].float().eq(0).all() for tensor in pool._stored())


def test_an_8_bit_cache_reads_back_what_was_written_within_e4m3_rounding() -> None:
    pool = KVPool(12, 4, 1, 2, 16, max_streams=1, pages=1, dtype=FP8, device="cpu")
    cache = pool.cache([pool.admit(12)])
    cache.prepare(3)
    cache.begin(torch.arange(3)[None])
    keys, values = torch.randn(2, 1, 3, 2, 16, generator=torch.Generator().manual_seed(2))
    read_keys, read_values = cache.update(0, keys, values)
    for written, read in ((keys, read_keys), (values, read_values)):
        assert read.dtype == torch.float32
        _, scales = quantize(written)
        assert ((read[:, :3] - written).abs() <= e4m3_bound(written, scales) * (1 + FLOAT32_SLACK)).all()
        assert read[:, 3:].eq(0).all()  # the slots not written yet
