"""GPU benchmark of the steps' attention alone: the split-key Triton kernels against SDPA (cuDNN on Hopper).

For the encoder's and the decoder's step shapes at several cache lengths, times one attention call per layer
over every layer's own cache (so the keys come from memory, not the L2 cache), replayed as one CUDA graph,
and checks both against float32 SDPA; the Triton kernel also over e4m3 caches (`kv_dtype: fp8`), whose error
against the bf16 cache's float32 SDPA includes the quantization's.

Run from the repository root on a machine with a CUDA GPU: `python -m tools.bench_step_attention`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from voxtral_run.stages.kernels.fused import sdpa_attention
from voxtral_run.stages.kernels.step_attention import step_attention
from voxtral_run.stages.model.cache import PAGE_SLOTS
from voxtral_run.stages.model.fp8 import quantize
from voxtral_run.stages.model.layers import attention_bias
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE

# (name, query heads, KV heads, positions per step, head dim, cached keys, window, layers)
CASES = [
    ("encoder, 256 keys", REAL_SIZE.enc_heads, REAL_SIZE.enc_heads, 4, REAL_SIZE.enc_head_dim, 256, 750, 32),
    ("encoder, 768 keys", REAL_SIZE.enc_heads, REAL_SIZE.enc_heads, 4, REAL_SIZE.enc_head_dim, 768, 750, 32),
    *(
        (f"decoder, {n} keys", REAL_SIZE.dec_heads, REAL_SIZE.dec_kv_heads, 1, REAL_SIZE.dec_head_dim, n, 8192, 26)
        for n in (256, 1024, 2048, 4096, 8256)
    ),
]


def graph_us(step: Callable[[], None], calls: int, repeats: int = 30) -> float:
    """Median time of one of the `calls` calls `step` makes, replayed as a CUDA graph, in microseconds."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 1000 * sorted(times)[repeats // 2] / calls


def measure(heads: int, kv_heads: int, length: int, head_dim: int, n_keys: int, window: int, layers: int) -> dict:
    """The attentions at one shape: time per layer, and relative error against float32 SDPA."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    q = torch.randn(length, heads, head_dim, device=device, dtype=dtype).transpose(0, 1)
    caches = [
        [torch.randn(n_keys, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2)] for _ in range(layers)
    ]
    positions = torch.arange(n_keys, n_keys + length, device=device)[None]
    bias = attention_bias(positions, torch.arange(n_keys, device=device)[None] + length, window, dtype)[0]
    keys, values = caches[0]
    exact = sdpa_attention(q.float(), keys.float(), values.float(), bias.float())
    figures = {}
    for name, attend in (("sdpa", sdpa_attention), ("step_attention", step_attention)):
        error = (attend(q, keys, values, bias).float() - exact).norm() / exact.norm()
        us = graph_us(lambda attend=attend: [attend(q, k, v, bias) for k, v in caches], layers)
        figures[name] = {"us_per_layer": us, "relative_error": float(error)}
    stored = [[quantize(t) for t in layer] for layer in caches]  # per layer: (values, scales) of keys, of values

    def attend_fp8(layer: list) -> torch.Tensor:
        (k, k_scales), (v, v_scales) = layer
        return step_attention(q, k, v, bias, scales=(k_scales, v_scales))

    error = (attend_fp8(stored[0]).float() - exact).norm() / exact.norm()
    us = graph_us(lambda: [attend_fp8(layer) for layer in stored], layers)
    figures["step_attention_fp8"] = {"us_per_layer": us, "relative_error": float(error)}
    return figures


# (name, query heads, KV heads, positions per step, head dim, cached keys, rows): one layer of a batched step over
# a KV pool's pages, at the full-window stream counts of the many-streams and 8-bit issues.
S = REAL_SIZE
BATCHED_CASES = [
    *((f"encoder, {rows} rows of 768 keys", S.enc_heads, S.enc_heads, 4, S.enc_head_dim, 768, rows)
      for rows in (64, 110)),
    *((f"decoder, {rows} rows of 8192 keys", S.dec_heads, S.dec_kv_heads, 1, S.dec_head_dim, 8192, rows)
      for rows in (64, 110)),
]  # fmt: skip


def measure_batched(heads: int, kv_heads: int, length: int, head_dim: int, n_keys: int, rows: int) -> dict:
    """The Triton kernel over `rows` rows' pages in bf16 and in e4m3 (one layer: its KV is larger than L2), time
    per call and the fp8 result's relative error against bf16's."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    pages_per_row = n_keys // PAGE_SLOTS
    # Page 0 is the pool's empty page, which attention skips.
    pages = 1 + torch.randperm(rows * pages_per_row, device=device).view(rows, pages_per_row)
    slots = (rows * pages_per_row + 1) * PAGE_SLOTS
    keys, values = (torch.randn(slots, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    q = torch.randn(rows, heads, length, head_dim, device=device, dtype=dtype)
    bias = torch.zeros(rows, length, n_keys, device=device, dtype=dtype)
    (k8, k_scales), (v8, v_scales) = quantize(keys), quantize(values)
    bf16 = step_attention(q, keys, values, bias, pages=pages).float()
    fp8 = step_attention(q, k8, v8, bias, pages=pages, scales=(k_scales, v_scales)).float()
    return {
        "bf16_us": graph_us(lambda: step_attention(q, keys, values, bias, pages=pages), 1),
        "fp8_us": graph_us(lambda: step_attention(q, k8, v8, bias, pages=pages, scales=(k_scales, v_scales)), 1),
        "fp8_relative_error": float((fp8 - bf16).norm() / bf16.norm()),
        "bf16_bytes": 2 * rows * n_keys * kv_heads * head_dim * keys.element_size(),
    }


def main() -> None:
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, *shape in CASES:
        results[name] = measure(*shape)
        sdpa, ours, fp8 = (results[name][key] for key in ("sdpa", "step_attention", "step_attention_fp8"))
        print(
            f"{name:20s} sdpa {sdpa['us_per_layer']:6.2f} us (error {sdpa['relative_error']:.1e}), "
            f"step attention {ours['us_per_layer']:6.2f} us (error {ours['relative_error']:.1e}), "
            f"fp8 KV {fp8['us_per_layer']:6.2f} us (error {fp8['relative_error']:.1e})",
            flush=True,
        )
    for name, *shape in BATCHED_CASES:
        results[name] = figures = measure_batched(*shape)
        rate = figures["bf16_bytes"] / figures["bf16_us"] / 1e3
        print(
            f"{name:32s} bf16 {figures['bf16_us']:8.1f} us ({rate:.0f} GB/s),"
            f" fp8 {figures['fp8_us']:8.1f} us (error against bf16 {figures['fp8_relative_error']:.1e})",
            flush=True,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
