"""GPU benchmark of the decoder step's matrix products: the fused Triton matvec kernel against cuBLAS.

One row through every layer's own weights (so they come from memory, not the L2 cache), replayed as one CUDA
graph: each product with its fused work against its floor (its bytes over the copy bandwidth) and cuBLAS's
bare product, optionally a sweep of launch configurations, and whole layers' products with the norms, SwiGLU
and residual adds fused in against cuBLAS's bare products.

Run from the repository root on a machine with a CUDA GPU: `python -m tools.bench_matvec [--sweep]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from stages.layers import rms_norm
from stages.matvec import MatvecConfig, Norm, matvec, matvec_config
from tools.bench_gpu import copy_bandwidth
from tools.bench_step_attention import graph_us
from tools.make_tiny_checkpoint import REAL_SIZE

EPS = 1e-5


def layer_weights(dim: int, q_dim: int, kv_dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """One layer's fused projections and norms in bf16 on the GPU, random at the checkpoint's scale."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    shapes = {"wqkv": (q_dim + 2 * kv_dim, dim), "wo": (dim, q_dim), "w13": (2 * hidden, dim), "w2": (dim, hidden)}
    weights = {name: torch.randn(shape, device=device, dtype=dtype) * 0.02 for name, shape in shapes.items()}
    for name in ("attention_norm", "ffn_norm", "ffn_scale"):
        weights[name] = 1 + 0.1 * torch.randn(dim, device=device, dtype=dtype)
    return weights


def cublas_layer(x: torch.Tensor, w: dict[str, torch.Tensor]) -> None:
    """The layer's bare products as the eager blocks run them (norms, activation and residuals left out)."""
    qkv = F.linear(x, w["wqkv"])
    out = F.linear(qkv[:, : w["wo"].shape[1]], w["wo"])
    F.linear(F.linear(out, w["w13"])[:, : w["w2"].shape[1]], w["w2"])


def fused_layer(x: torch.Tensor, w: dict[str, torch.Tensor], configs: dict | None = None) -> torch.Tensor:
    """The layer's products with the work around them fused in (attention left out: its input is q)."""
    configs = configs or {}
    qkv = matvec(x, w["wqkv"], norm=Norm(w["attention_norm"], EPS), config=configs.get("wqkv"))
    x = matvec(qkv[:, : w["wo"].shape[1]], w["wo"], residual=x, config=configs.get("wo"))
    norm = Norm(w["ffn_norm"], EPS, w["ffn_scale"])
    hidden = matvec(x, w["w13"], norm=norm, swiglu=True, config=configs.get("w13"))
    return matvec(hidden, w["w2"], residual=x, config=configs.get("w2"))


def eager_layer(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `fused_layer` computes, in torch ops (the blocks' eager code)."""
    qkv = F.linear(rms_norm(x, w["attention_norm"], EPS), w["wqkv"])
    x = x + F.linear(qkv[:, : w["wo"].shape[1]], w["wo"])
    gate, up = F.linear(rms_norm(x, w["ffn_norm"], EPS) * w["ffn_scale"], w["w13"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w["w2"])


def fused_product(product: str, w: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """One product of `fused_layer` as a function of its input and launch configuration."""
    residual = torch.randn(1, w[product].shape[0], device="cuda", dtype=torch.bfloat16)
    fused = {
        "wqkv": lambda x, c: matvec(x, w["wqkv"], norm=Norm(w["attention_norm"], EPS), config=c),
        "wo": lambda x, c: matvec(x, w["wo"], residual=residual, config=c),
        "w13": lambda x, c: matvec(x, w["w13"], norm=Norm(w["ffn_norm"], EPS, w["ffn_scale"]), swiglu=True, config=c),
        "w2": lambda x, c: matvec(x, w["w2"], residual=residual, config=c),
    }
    return fused[product]


def sweep(x: torch.Tensor, products: list[Callable[..., torch.Tensor]]) -> list[dict]:
    """Every plausible launch of one fused product over all layers, fastest first (µs per layer)."""
    k = x.shape[1]
    results = []
    for warps, block_k, block_n in itertools.product((4, 8), (256, 512, 1024), (1, 2, 4, 8)):
        if k % block_k:
            continue
        config = MatvecConfig(block_n, block_k, warps)
        us = graph_us(lambda c=config: [product(x, c) for product in products], len(products))
        results.append({**config._asdict(), "us": us})
    return sorted(results, key=lambda r: r["us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time every plausible launch configuration")
    args = parser.parse_args()
    bandwidth = copy_bandwidth(torch.device("cuda"))
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    s = REAL_SIZE
    torch.manual_seed(0)
    q_dim, kv_dim = s.dec_heads * s.dec_head_dim, s.dec_kv_heads * s.dec_head_dim
    stack = [layer_weights(s.dec_dim, q_dim, kv_dim, s.dec_hidden_dim) for _ in range(s.dec_layers)]
    x = torch.randn(1, s.dec_dim, device="cuda", dtype=torch.bfloat16)
    best = {}
    for product in ("wqkv", "wo", "w13", "w2"):
        weights = [w[product] for w in stack]
        products = [fused_product(product, w) for w in stack]
        inputs = torch.randn(1, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)
        n, k = weights[0].shape[0] // (2 if product == "w13" else 1), weights[0].shape[1]
        entry = {
            "shape": list(weights[0].shape),
            "floor_us": weights[0].numel() * 2 / bandwidth * 1e6,
            "cublas_bare_us": graph_us(lambda: [F.linear(inputs, w) for w in weights], len(weights)),  # noqa: B023
            "fused_us": graph_us(lambda: [p(inputs, None) for p in products], len(products)),  # noqa: B023
            "config": matvec_config(n, k, inputs.device, product in ("wqkv", "w13"))._asdict(),
        }
        if args.sweep:
            ranked = sweep(inputs, products)
            entry["sweep_best"] = ranked[:4]
            best[product] = MatvecConfig(*list(ranked[0].values())[:-1])
        results[product] = entry
        print(product, json.dumps(entry), flush=True)
    exact = eager_layer(x.float(), {k: v.float() for k, v in stack[0].items()})
    for label, layer in (("eager", eager_layer), ("fused", fused_layer)):
        error = (layer(x, stack[0]).float() - exact).norm() / (exact - x.float()).norm()
        results[f"{label}_bf16_relative_error"] = float(error)
    results["cublas_products_ms"] = graph_us(lambda: [cublas_layer(x, w) for w in stack], 1) / 1000
    results["fused_layers_ms"] = graph_us(lambda: [fused_layer(x, w) for w in stack], 1) / 1000
    if best:
        results["fused_layers_best_configs_ms"] = graph_us(lambda: [fused_layer(x, w, best) for w in stack], 1) / 1000
    results["floor_ms"] = sum(w[p].numel() * 2 for w in stack for p in ("wqkv", "wo", "w13", "w2")) / bandwidth * 1e3
    print(json.dumps(results, indent=2))
    print(
        f"decoder layers' products: cuBLAS bare {results['cublas_products_ms']:.3f} ms, fused kernel with norms, "
        f"SwiGLU and residuals {results['fused_layers_ms']:.3f} ms, floor {results['floor_ms']:.3f} ms; bf16 "
        f"error eager {results['eager_bf16_relative_error']:.1e}, fused {results['fused_bf16_relative_error']:.1e}"
    )


if __name__ == "__main__":
    main()
