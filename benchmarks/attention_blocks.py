"""Attention seconds per image by block budget, and the forward pass per image, by batch.

The imagenet256 shapes (16 heads of 48, 257 tokens) on the default device: the attention core
(scores, softmax, context; 24 layers) in one block, in blocks of `CPU_BLOCK_BYTES` and of 4x
that, and through `jax.nn.dot_product_attention` (XLA's, and on GPU cuDNN's); then the whole
transformer forward pass in one einsum block against the backend's default
(`models.attention.default_attention`). Batch 64 should cost no more per image than batch 8.

  python benchmarks/attention_blocks.py [--batch 8 64] [--dtypes float32 bfloat16]
"""

import argparse

import jax
import jax.numpy as jnp
import train_speed
from flax import linen as nn

from maskgit_jax import config_lib
from maskgit_jax.models import attention, build_transformer


def _seconds_per_call(fn, args: tuple, repeats: int) -> float:
    """Best of `repeats` calls after one compiling call."""
    jax.block_until_ready(fn(*args))
    return train_speed.best_time(lambda: fn(*args), repeats)


def main() -> None:
    """Prints per-image attention and forward seconds for each batch and dtype."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = config_lib.base_config()
    t = config.transformer
    length, heads = config_lib.sequence_length(config), t.num_heads
    budgets = {
        "one block": None,
        "CPU_BLOCK_BYTES": attention.CPU_BLOCK_BYTES,
        "4x CPU_BLOCK_BYTES": 4 * attention.CPU_BLOCK_BYTES,
    }
    print(f"devices: {jax.devices()}; default: {attention.default_attention()}")
    for dtype in map(jnp.dtype, args.dtypes):
        for batch in args.batch:
            shape = (batch, length, heads, t.hidden_size // heads)
            q, k, v = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(3))
            ways = {name: dict(block_bytes=budget) for name, budget in budgets.items()}
            ways["jax.nn.dot_product_attention, XLA"] = dict(implementation=attention.XLA)
            if jax.default_backend() == "gpu":
                ways["jax.nn.dot_product_attention, cuDNN"] = dict(implementation=attention.CUDNN)
            for name, way in ways.items():
                attend = jax.jit(
                    lambda q, k, v, way=way, dtype=dtype: attention.multi_head_attention(
                        q, k, v, dtype=dtype, **way
                    )
                )
                seconds = _seconds_per_call(attend, (q, k, v), args.repeats)
                print(
                    f"{dtype.name:8s} batch {batch:3d} attention, {name:36s} "
                    f"{1e3 * seconds * t.num_layers / batch:7.1f} ms/image"
                )
            ids = jnp.zeros((batch, length), jnp.int32)  # Token ids do not change the cost.
            default = build_transformer(config, dtype=dtype)
            for name, model in (
                (
                    "one einsum block",
                    default.clone(
                        attention_block_bytes=None, attention_implementation=attention.EINSUM
                    ),
                ),
                ("default", default),
            ):
                variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids))
                seconds = _seconds_per_call(jax.jit(model.apply), (variables, ids), 2)
                print(
                    f"{dtype.name:8s} batch {batch:3d} forward pass, {name:24s} "
                    f"{1e3 * seconds / batch:7.1f} ms/image"
                )


if __name__ == "__main__":
    main()
