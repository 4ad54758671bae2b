"""GPU benchmark of the steps' attention alone: the split-key Triton kernels against SDPA (cuDNN on Hopper).

For the encoder's and the decoder's step shapes at several cache lengths, times one attention call per layer
over every layer's own cache (so the keys come from memory, not the L2 cache), replayed as one CUDA graph,
and checks both against float32 SDPA.

Run from the repository root on a machine with a CUDA GPU: `python -m tools.bench_step_attention`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from voxtral_run.stages.kernels.fused import sdpa_attention
from voxtral_run.stages.kernels.step_attention import step_attention
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
    """Both attentions at one shape: time per layer, and relative error against float32 SDPA."""
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
    return figures


def main() -> None:
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, *shape in CASES:
        results[name] = measure(*shape)
        sdpa, ours = results[name]["sdpa"], results[name]["step_attention"]
        print(
            f"{name:20s} sdpa {sdpa['us_per_layer']:6.2f} us (error {sdpa['relative_error']:.1e}), "
            f"step attention {ours['us_per_layer']:6.2f} us (error {ours['relative_error']:.1e})",
            flush=True,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
