"""Seconds per 24 layers of attention (scores, softmax, context) by head-block size.

The imagenet256 shapes (16 heads of 48, 257 tokens), fp32, on the default device: one
einsum over all heads against blocks of 2 and 4 heads (`heads_per_block`), and the whole
transformer forward pass with and without blocking. This is the measurement behind
`models.transformer.default_heads_per_block`.

  python benchmarks/attention_blocks.py [--batch 8 64]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from maskgit_jax import config_lib
from maskgit_jax.models import build_transformer
from maskgit_jax.models.transformer import multi_head_attention


def _best_seconds(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    args = parser.parse_args()
    config = config_lib.base_config()
    t = config.transformer
    length, heads = config_lib.sequence_length(config), t.num_heads
    head_dim = t.hidden_size // heads
    print(f"devices: {jax.devices()}")
    for batch in args.batch:
        shape = (batch, length, heads, head_dim)
        q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(3))
        for block in (None, 4, 2):
            attend = jax.jit(
                lambda q, k, v, b=block: multi_head_attention(q, k, v, heads_per_block=b)
            )
            seconds = _best_seconds(attend, q, k, v) * t.num_layers
            print(
                f"batch {batch:3d} heads_per_block={block}: attention {seconds:.2f} s per forward"
            )
        ids = jnp.zeros((batch, length), jnp.int32)  # Token ids do not change the cost.
        for block in (None, 2):
            model = build_transformer(config, attention_heads_per_block=block)
            variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids))
            forward = jax.jit(model.apply)
            seconds = _best_seconds(forward, variables, ids, repeats=2)
            print(f"batch {batch:3d} heads_per_block={block}: forward pass {seconds:.2f} s")


if __name__ == "__main__":
    main()
