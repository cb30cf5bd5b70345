"""One transformer layer's forward, part by part, in this project and in the PyTorch yardstick.

`side_by_side.py` compares whole decode and train steps; this finds which part of a layer
makes the difference. Each part runs alone, at the decode step's shapes (batch x 257 tokens,
width 768, 16 heads, MLP 3072), through each side's own model code:

- JAX: the Flax modules of `maskgit_jax.models.transformer` and `models.attention`'s core,
  jitted with the compiler options decoding uses (`compile_options.forward_options`);
- PyTorch: the modules of `pytorch_reference.py` (eval mode, inference mode, bf16 autocast).

Parts: the q/k/v/out projections (with their biases), the attention scores and context
matmuls alone (q k^T and p v for all (example, head) pairs, each one batched matmul of
[B, H, L, *] operands in the compute dtype: the bare kernels, with float32 output in JAX and
autocast's bf16 in PyTorch), the attention core (softmax(q k^T) v; its inputs as each model
makes them: float32 [B, L, H, D] in JAX, [B, H, L, D] in the compute dtype under autocast),
self-attention (both), the attention sub-layer (with residual and LayerNorm), the MLP
sub-layer (Dense-GELU-Dense, residual, LayerNorm) and the whole layer. GFLOP/s count matmuls
only. Within one XLA program independent ops overlap and fuse across the parts' borders, so
parts do not add up to the layer exactly. Each part is its own call, so both sides cast their
weights to bf16 on every call (autocast does too); the decoding program casts them once per
call of all T steps, so a layer runs faster there.

  python benchmarks/layer_side_by_side.py [--batch 8] [--dtypes float32 bfloat16] [--repeats 10]
"""

# ruff: noqa: E402 (the allocator relaunch below must run before the heavy imports)
import argparse
import functools
import os
from collections.abc import Callable

from maskgit_jax import host_memory

HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

import jax
import jax.numpy as jnp
import numpy as np
import pytorch_reference
import torch
import train_speed

from maskgit_jax import compile_options, config_lib
from maskgit_jax.models import attention, transformer


def _flops(batch: int, length: int, width: int, mlp: int) -> dict[str, float]:
    """Matmul FLOPs of each part (2*M*N*K per matmul)."""
    rows = batch * length
    core = 2 * 2 * rows * length * width
    projections = 2 * rows * 4 * width * width
    mlp_flops = 2 * rows * 2 * width * mlp
    return {
        "q/k/v/out projections": projections,
        "scores matmul": core / 2,
        "context matmul": core / 2,
        "attention core": core,
        "self-attention": core + projections,
        "attention sub-layer": core + projections,
        "MLP sub-layer": mlp_flops,
        "whole layer": core + projections + mlp_flops,
    }


def _jax_parts(config, batch: int, dtype: str) -> dict[str, Callable[[], object]]:
    """Zero-argument calls running each part once in JAX (params and inputs bound)."""
    t = config.transformer
    length = config_lib.sequence_length(config)
    compute = jnp.dtype(dtype)
    settings = attention.default_attention()
    options = compile_options.forward_options(compute)
    heads, depth = t.num_heads, t.hidden_size // t.num_heads
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, length, t.hidden_size)), jnp.float32)
    q, k, v = (
        jnp.asarray(rng.standard_normal((batch, length, heads, depth)), jnp.float32)
        for _ in range(3)
    )
    shared = {
        "dtype": compute,
        "block_bytes": settings["attention_block_bytes"],
        "implementation": settings["attention_implementation"],
    }
    rates = {"dropout_rate": t.dropout_rate, "attention_dropout_rate": t.attention_dropout_rate}
    modules = {
        "self-attention": transformer.SelfAttention(
            heads, t.hidden_size, t.attention_dropout_rate, **shared
        ),
        "attention sub-layer": transformer.Attention(heads, t.hidden_size, **rates, **shared),
        "MLP sub-layer": transformer.Mlp(t.hidden_size, t.mlp_dim, t.dropout_rate, compute),
        "whole layer": transformer.TransformerLayer(
            heads, t.hidden_size, t.mlp_dim, **rates, **shared
        ),
    }
    core = jax.jit(
        lambda q, k, v: attention.multi_head_attention(q, k, v, **shared),
        compiler_options=options,
    )
    heads_major = [jnp.asarray(x.transpose(0, 2, 1, 3), compute) for x in (q, k, v)]
    probabilities = jax.nn.softmax(heads_major[0] @ heads_major[1].swapaxes(-1, -2)).astype(compute)

    def batched_matmul(subscripts: str):
        return jax.jit(
            lambda a, b: jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32),
            compiler_options=options,
        )

    scores = batched_matmul("bhqd,bhkd->bhqk")
    context = batched_matmul("bhqk,bhkd->bhqd")
    projections = {
        name: transformer.Projection(
            (heads, depth), ("embed", "heads", "kv"), ("heads", "kv"), dtype=compute
        )
        for name in ("query", "key", "value")
    }
    projections["out"] = transformer.Projection(
        (t.hidden_size,), ("heads", "kv", "embed"), ("embed",), num_input_axes=2, dtype=compute
    )
    projection_params = {
        name: module.init(jax.random.PRNGKey(0), q if name == "out" else x)
        for name, module in projections.items()
    }

    @functools.partial(jax.jit, compiler_options=options)
    def project(params, x, context):
        return [m.apply(params[n], context if n == "out" else x) for n, m in projections.items()]

    calls = {
        "q/k/v/out projections": lambda: project(projection_params, x, q),
        "scores matmul": lambda: scores(*heads_major[:2]),
        "context matmul": lambda: context(probabilities, heads_major[2]),
        "attention core": lambda: core(q, k, v),
    }
    for name, module in modules.items():
        params = jax.jit(lambda m=module: m.init(jax.random.PRNGKey(0), x, True))()
        apply = jax.jit(
            lambda p, x, m=module: m.apply(p, x, deterministic=True), compiler_options=options
        )
        calls[name] = lambda apply=apply, params=params: apply(params, x)
    return calls


def _torch_parts(batch: int, dtype: str) -> dict[str, Callable[[], object]]:
    """Zero-argument calls running each part once in PyTorch under `dtype` autocast."""
    config = pytorch_reference.TransformerConfig(num_layers=1)
    layer = pytorch_reference.TransformerLayer(config).eval()
    length, width = config.sequence_length, config.hidden_size
    heads = config.num_heads
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, width, generator=generator)
    compute = getattr(torch, dtype)
    q, k, v = (
        torch.randn(batch, heads, length, width // heads, generator=generator).to(compute)
        for _ in range(3)
    )
    probabilities = torch.softmax(q.float() @ k.float().transpose(-2, -1), dim=-1).to(compute)
    attention_module = layer.self_attention
    context = torch.randn(batch, length, width, generator=generator)

    def project() -> list[torch.Tensor]:
        inputs = {"query": x, "key": x, "value": x, "out": context}
        return [getattr(attention_module, name)(value) for name, value in inputs.items()]

    parts = {
        "q/k/v/out projections": project,
        "scores matmul": lambda: torch.matmul(q, k.transpose(-2, -1)),
        "context matmul": lambda: torch.matmul(probabilities, v),
        "attention core": lambda: attention_module.core(q, k, v),
        "self-attention": lambda: attention_module(x),
        "attention sub-layer": lambda: layer.attention_block(x),
        "MLP sub-layer": lambda: layer.mlp_block(x),
        "whole layer": lambda: layer(x),
    }

    def in_context(fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode(), pytorch_reference.autocast(dtype):
                return fn()

        return call

    return {name: in_context(fn) for name, fn in parts.items()}


def main() -> None:
    """Times each part in both frameworks per dtype and prints one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = config_lib.base_config()
    t = config.transformer
    work = _flops(args.batch, config_lib.sequence_length(config), t.hidden_size, t.mlp_dim)
    print(
        f"devices: {jax.devices()[:1]}; host malloc: {HOST_MALLOC}; "
        f"PyTorch threads: {args.threads}; load {os.getloadavg()}"
    )
    header = (
        f"{'part':24s} {'dtype':9s} {'PyTorch ms':>10s} {'JAX ms':>8s} {'ratio':>6s} "
        f"{'PyTorch GFLOP/s':>15s} {'JAX GFLOP/s':>11s}"
    )
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        jax_calls = _jax_parts(config, args.batch, dtype)
        torch_calls = _torch_parts(args.batch, dtype)
        seconds = {}
        for name in jax_calls:
            seconds[name] = (
                pytorch_reference.best_seconds(torch_calls[name], args.repeats),
                train_speed.best_time(jax_calls[name], args.repeats),
            )
        for name in work:
            torch_s, jax_s = seconds[name]
            print(
                f"{name:24s} {dtype:9s} {1e3 * torch_s:10.2f} {1e3 * jax_s:8.2f} "
                f"{torch_s / jax_s:5.2f}x {work[name] / torch_s / 1e9:15.0f} "
                f"{work[name] / jax_s / 1e9:11.0f}"
            )
    print("(ratio: PyTorch ms / JAX ms, > 1 means JAX is faster)")


if __name__ == "__main__":
    main()
