"""GPU benchmark of the steps' matrix products: the fused Triton kernels against cuBLAS.

For the decoder (one row, `matvec`) and the encoder (4 rows, `rows_matmul`): the step's rows through every
layer's own weights (so they come from memory, not the L2 cache), replayed as one CUDA graph. Per product,
the kernel with its fused work against its floor (its bytes over the copy bandwidth) and cuBLAS's bare
product, optionally a sweep of launch configurations (compiled first by a pool of processes); then whole
layers' products with the norms, biases, SwiGLU and residual adds fused in against cuBLAS's bare products,
how far each is from float32, and whether a split reduction gives the same bits on every replay. With
`--weights fp8`, the decoder's products read e4m3 weights with a scale per output channel (`weights: fp8`).

Run from the repository root on a machine with a CUDA GPU: `python -m tools.bench_products [--sweep]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F

from voxtral_run.stages.kernels.matvec import MatvecConfig, Norm, matvec, matvec_config
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP, NO_OVERLAP, Overlap
from voxtral_run.stages.kernels.rows_matmul import RowsConfig, rows_config, rows_matmul
from voxtral_run.stages.model.fp8 import dequantize, quantize
from voxtral_run.stages.model.layers import rms_norm
from voxtral_run.tools.bench_gpu import copy_bandwidth
from voxtral_run.tools.bench_step_attention import graph_us
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE

EPS = 1e-5
PRODUCTS = ("wqkv", "wo", "w13", "w2")


class Network(NamedTuple):
    """A network's step as its products see it: rows per step, layers and projection sizes."""

    rows: int
    layers: int
    dim: int
    q_dim: int
    kv_dim: int
    hidden: int
    biases: bool  # q, v, o and w2 biases (the encoder's)
    ffn_scale: bool  # the delay-conditioned FFN scale (the decoder's)


S = REAL_SIZE
NETWORKS = {
    "decoder": Network(
        1, S.dec_layers, S.dec_dim, S.dec_heads * S.dec_head_dim, S.dec_kv_heads * S.dec_head_dim, S.dec_hidden_dim,
        biases=False, ffn_scale=True,
    ),
    "encoder": Network(
        4, S.enc_layers, S.enc_dim, S.enc_heads * S.enc_head_dim, S.enc_heads * S.enc_head_dim, S.enc_hidden_dim,
        biases=True, ffn_scale=False,
    ),
}  # fmt: skip


def layer_weights(net: Network, seed: int = 0) -> dict[str, torch.Tensor]:
    """One layer's fused projections, norms and (as the network has them) biases and FFN scale, in bf16 on
    the GPU, random at the checkpoint's scale."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def random(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        values = offset + scale * torch.randn(*shape, device="cuda", generator=generator)
        return values.to(torch.bfloat16)

    shapes = {
        "wqkv": (net.q_dim + 2 * net.kv_dim, net.dim),
        "wo": (net.dim, net.q_dim),
        "w13": (2 * net.hidden, net.dim),
        "w2": (net.dim, net.hidden),
    }
    weights = {name: random(*shape, scale=0.02) for name, shape in shapes.items()}
    for name in ("attention_norm", "ffn_norm") + (("ffn_scale",) if net.ffn_scale else ()):
        weights[name] = random(net.dim, scale=0.1, offset=1.0)
    if net.biases:
        weights |= {f"b{name[1:]}": random(shapes[name][0], scale=0.02) for name in ("wqkv", "wo", "w2")}
    return weights


def product_call(net: Network, product: str, w: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """One product with its fused work, as a function of its input, its residual, a launch configuration and
    optionally the weight to prefetch and the overlap: the network's kernel (`matvec` for one row,
    `rows_matmul` for more)."""
    kernel = matvec if net.rows == 1 else rows_matmul
    bias = {"bias": w.get(f"b{product[1:]}")} if net.rows > 1 else {"weight_scale": w.get(f"{product}_scale")}
    norms = {
        "wqkv": Norm(w["attention_norm"], EPS),
        "w13": Norm(w["ffn_norm"], EPS, w.get("ffn_scale")),
    }
    if product == "w13":
        return lambda x, residual, config, **overlap: kernel(
            x, w["w13"], norm=norms["w13"], swiglu=True, config=config, **bias, **overlap
        )
    if product == "wqkv":
        return lambda x, residual, config, **overlap: kernel(
            x, w["wqkv"], norm=norms["wqkv"], config=config, **bias, **overlap
        )
    return lambda x, residual, config, **overlap: kernel(
        x, w[product], residual=residual, config=config, **bias, **overlap
    )


def fused_layer(
    net: Network,
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    configs: dict | None = None,
    following: torch.Tensor | None = None,
    overlap: Overlap = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """The layer's products with the work around them fused in (attention left out: its input is q), each
    prefetching the next one's weight (the last, `following`) under `overlap`, as the steps run them."""
    configs = configs or {}
    call = {product: product_call(net, product, w) for product in PRODUCTS}
    ahead = dict(zip(PRODUCTS, [w[p] for p in PRODUCTS[1:]] + [following], strict=True))
    qkv = call["wqkv"](x, None, configs.get("wqkv"), prefetch=ahead["wqkv"], overlap=overlap)
    x = call["wo"](qkv[:, : net.q_dim].contiguous(), x, configs.get("wo"), prefetch=ahead["wo"], overlap=overlap)
    hidden = call["w13"](x, None, configs.get("w13"), prefetch=ahead["w13"], overlap=overlap)
    return call["w2"](hidden, x, configs.get("w2"), prefetch=ahead["w2"], overlap=overlap)


def fused_layers(
    net: Network, x: torch.Tensor, stack: list[dict], configs: dict | None = None, overlap: Overlap = DEFAULT_OVERLAP
) -> None:
    """Every layer's fused products in turn, as a step runs them."""
    following = [w["wqkv"] for w in stack[1:]] + [None]
    for w, after in zip(stack, following, strict=True):
        x = fused_layer(net, x, w, configs, after, overlap)


# How the step's kernels overlap (see stages.kernel_overlap), against the default.
OVERLAPS = {
    "no_overlap": NO_OVERLAP,
    "prefetch_only": Overlap(pdl=False, prefetch_bytes=4 << 20),
    "no_prefetch": Overlap(prefetch_bytes=0),
    **{f"prefetch_{mb}MB": Overlap(prefetch_bytes=mb << 20) for mb in (2, 4, 16)},
    "late_weights": Overlap(early_weights=False),
}


def eager_layer(net: Network, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `fused_layer` computes, in torch ops (the blocks' eager code)."""
    qkv = F.linear(rms_norm(x, w["attention_norm"], EPS), w["wqkv"], w.get("bqkv"))
    x = x + F.linear(qkv[:, : net.q_dim], w["wo"], w.get("bo"))
    h = rms_norm(x, w["ffn_norm"], EPS)
    if "ffn_scale" in w:
        h = h * w["ffn_scale"]
    gate, up = F.linear(h, w["w13"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w["w2"], w.get("b2"))


def cublas_layer(net: Network, x: torch.Tensor, w: dict[str, torch.Tensor]) -> None:
    """The layer's bare products as the eager blocks run them (norms, activation and residuals left out)."""
    qkv = F.linear(x, w["wqkv"], w.get("bqkv"))
    out = F.linear(qkv[:, : net.q_dim], w["wo"], w.get("bo"))
    F.linear(F.linear(out, w["w13"])[:, : net.hidden], w["w2"], w.get("b2"))


def candidate_configs(net: Network, product: str, n: int, k: int) -> list:
    """Every plausible launch of one product of the network's kernel."""
    if net.rows == 1:
        whole_row = 1 << (k - 1).bit_length()  # one tile, padded to a power of two
        grid = itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024, 2048, 4096, whole_row), (2, 4, 8))
        return [MatvecConfig(bn, bk, warps) for bn, bk, warps in sorted(set(grid)) if k % bk == 0 or bk == whole_row]
    configs = []
    grid = itertools.product((16, 32, 64), (64, 128, 256, 512), (1, 2, 4, 5, 8, 10), (2, 3, 5), (4, 8))
    for bn, bk, split, stages, warps in grid:
        if n % bn or k % (bk * split) or (product == "w13" and split > 1) or n // bn * split > 1024:
            continue
        configs.append(RowsConfig(bn, bk, split, stages, warps))
    return configs


def _compile(net_name: str, weights: str, product: str, configs: list) -> list:
    """Worker: run each launch once, so Triton's on-disk cache holds its compiled kernel for the sweep; the
    launches that fit the GPU (too many stages of wide tiles overflow its shared memory)."""
    from triton.runtime.errors import OutOfResources

    net = NETWORKS[net_name]
    w = layer_weights(net)
    if weights == "fp8":
        w = quantized([w])[0]
    call = product_call(net, product, w)
    x = torch.randn(net.rows, w[product].shape[1], device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(net.rows, w[product].shape[0], device="cuda", dtype=torch.bfloat16)
    fitting = []
    for config in configs:
        try:
            call(x, residual, config)
        except OutOfResources:
            continue
        fitting.append(config)
    torch.cuda.synchronize()
    return fitting


def precompile(net: str, weights: str, sweeps: dict[str, list]) -> dict[str, list]:
    """Compile every launch of a network's sweeps in parallel processes (a tile kernel takes about a second);
    the launches that fit the GPU, per product."""
    workers = min(16, os.cpu_count() or 1)
    chunks = [(product, configs[i::workers]) for product, configs in sweeps.items() for i in range(workers)]
    chunks = [chunk for chunk in chunks if chunk[1]]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        done = pool.map(_compile, [net] * len(chunks), [weights] * len(chunks), *zip(*chunks, strict=True))
        fitting = set(itertools.chain.from_iterable(done))
    return {product: [config for config in configs if config in fitting] for product, configs in sweeps.items()}


def sweep(calls: list[Callable], x: torch.Tensor, residual: torch.Tensor, configs: list) -> list[dict]:
    """Every launch of one product over all layers that fits the GPU, fastest first (µs per layer)."""
    from triton.runtime.errors import OutOfResources

    results = []
    for config in configs:
        try:
            us = graph_us(lambda c=config: [call(x, residual, c) for call in calls], len(calls))
        except OutOfResources:
            continue
        results.append({**config._asdict(), "us": us})
    return sorted(results, key=lambda r: r["us"])


def split_is_deterministic(net: Network, w: dict[str, torch.Tensor], replays: int = 200) -> bool | None:
    """Whether the layer's products give the same bits on every replay of a graph (a split reduction's last
    program adds the partial sums in a fixed order, whichever arrives last); None when nothing is split."""
    n, k = net.dim, net.hidden
    config = rows_config(n, k, torch.device("cuda"), swiglu=False)
    if net.rows == 1 or config.split_k == 1:
        return None
    x = torch.randn(net.rows, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(net.rows, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(net.rows, n, device="cuda", dtype=torch.bfloat16)
    call = product_call(net, "w2", w)
    call(x, residual, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(call(x, residual, None))
    graph.replay()
    first = out.clone()
    same = True
    for _ in range(replays):
        graph.replay()
        same &= bool(torch.equal(out, first))
    return same


def quantized(stack: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The layers with their products' weights in e4m3 and a float32 scale per output channel beside each."""
    layers = []
    for w in stack:
        layer = dict(w)
        for product in PRODUCTS:
            layer[product], layer[f"{product}_scale"] = quantize(w[product])
        layers.append(layer)
    return layers


def float_layer(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's tensors in float32, an e4m3 weight times its scales."""
    layer = {key: value.float() for key, value in w.items() if not key.endswith("_scale")}
    for product in PRODUCTS:
        if f"{product}_scale" in w:
            layer[product] = dequantize(w[product], w[f"{product}_scale"], torch.float32)
    return layer


def bench_network(name: str, args: argparse.Namespace, bandwidth: float) -> dict:
    net = NETWORKS[name]
    fp8 = args.weights == "fp8"
    torch.manual_seed(0)
    stack = [layer_weights(net, seed) for seed in range(net.layers)]
    if fp8:
        stack = quantized(stack)
    x = torch.randn(net.rows, net.dim, device="cuda", dtype=torch.bfloat16)
    results: dict = {"weights": args.weights}
    sweeps = {}
    if args.sweep:
        for product in PRODUCTS:
            n, k = stack[0][product].shape[0] // (2 if product == "w13" else 1), stack[0][product].shape[1]
            sweeps[product] = candidate_configs(net, product, n, k)
        sweeps = precompile(name, args.weights, sweeps)
    best = {}
    for product in PRODUCTS:
        weights = [w[product] for w in stack]
        calls = [product_call(net, product, w) for w in stack]
        n, k = weights[0].shape[0] // (2 if product == "w13" else 1), weights[0].shape[1]
        inputs = torch.randn(net.rows, k, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(net.rows, n, device="cuda", dtype=torch.bfloat16)
        default = (
            matvec_config(n, k, inputs.device, product in ("wqkv", "w13"), product == "w13", fp8)
            if net.rows == 1
            else None
        )
        default = default or rows_config(n, k, inputs.device, product == "w13")
        entry = {
            "shape": list(weights[0].shape),
            "floor_us": weights[0].numel() * weights[0].element_size() / bandwidth * 1e6,
            "fused_us": graph_us(lambda: [c(inputs, residual, None) for c in calls], len(calls)),  # noqa: B023
            "config": default._asdict(),
        }
        if not fp8:  # cuBLAS takes no e4m3 operand here
            entry["cublas_bare_us"] = graph_us(lambda: [F.linear(inputs, w) for w in weights], len(weights))  # noqa: B023
        if args.sweep:
            ranked = sweep(calls, inputs, residual, sweeps[product])
            entry["sweep_best"] = ranked[:6]
            entry["configs_swept"] = len(ranked)
            best[product] = type(default)(*list(ranked[0].values())[:-1])
        results[product] = entry
        print(name, product, json.dumps(entry), flush=True)
    exact = eager_layer(net, x.float(), float_layer(stack[0]))
    layers = {"fused": fused_layer} if fp8 else {"eager": eager_layer, "fused": fused_layer}
    for label, layer in layers.items():
        error = (layer(net, x, stack[0]).float() - exact).norm() / (exact - x.float()).norm()
        results[f"{label}_bf16_relative_error"] = float(error)
    results["split_deterministic"] = split_is_deterministic(net, stack[0])
    if not fp8:
        results["cublas_products_ms"] = graph_us(lambda: [cublas_layer(net, x, w) for w in stack], 1) / 1000
    results["fused_layers_ms"] = graph_us(lambda: fused_layers(net, x, stack), 1) / 1000
    results["fused_layers_overlap_ms"] = {
        name: graph_us(lambda o=overlap: fused_layers(net, x, stack, overlap=o), 1) / 1000
        for name, overlap in OVERLAPS.items()
    }
    if best:
        results["fused_layers_best_configs_ms"] = graph_us(lambda: fused_layers(net, x, stack, best), 1) / 1000
    results["floor_ms"] = sum(w[p].numel() * w[p].element_size() for w in stack for p in PRODUCTS) / bandwidth * 1e3
    print(
        f"{name} layers' products ({args.weights}): cuBLAS bare {results.get('cublas_products_ms', float('nan')):.3f}"
        f" ms, fused kernels with their work {results['fused_layers_ms']:.3f} ms (without overlap "
        f"{results['fused_layers_overlap_ms']['no_overlap']:.3f} ms), floor {results['floor_ms']:.3f} ms; bf16 "
        f"error eager {results.get('eager_bf16_relative_error', float('nan')):.1e}, fused "
        f"{results['fused_bf16_relative_error']:.1e}",
        flush=True,
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time every plausible launch configuration")
    parser.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    parser.add_argument(
        "--weights", choices=("bf16", "fp8"), default="bf16", help="fp8: e4m3 weights (the decoder's one-row kernel)"
    )
    parser.add_argument("--json", default="bench_products.json", help="where to write the figures")
    args = parser.parse_args()
    if args.weights == "fp8" and "encoder" in args.networks:
        parser.error("--weights fp8: the encoder's batched kernel reads bf16 weights; give --networks decoder")
    bandwidth = copy_bandwidth(torch.device("cuda"))
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    for name in args.networks:
        results[name] = bench_network(name, args, bandwidth)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
