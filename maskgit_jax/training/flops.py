"""Model FLOP counts (matmuls only, the usual MFU convention) and a measured matmul peak."""

import time

import jax
import jax.numpy as jnp
import ml_collections

from maskgit_jax import compile_options, config_lib


def transformer_forward_flops(
    config: ml_collections.ConfigDict, batch_size: int, num_logits: int | None = None
) -> float:
    """Matmul FLOPs of one transformer forward over `batch_size` full sequences."""
    t = config.transformer
    length, d = config_lib.sequence_length(config), t.hidden_size
    vocab = num_logits or config_lib.vocab_size(config)
    per_layer = 2 * length * (4 * d * d + 2 * d * t.mlp_dim) + 4 * length * length * d
    head = 2 * length * d * (d + vocab)
    return float(batch_size * (t.num_layers * per_layer + head))


def measure_matmul_peak(
    dtype=jnp.float32, size: int = 2048, repeats: int = 10, accumulate_fp32: bool = True
) -> float:
    """FLOP/s of a square matmul on the default device (bf16 operands accumulate in fp32).

    The best of the default compile and `compile_options.forward_options` (on CPU, XLA's own
    float32 dot beats YNNPACK's), so the peak is the fastest this stack multiplies in `dtype`.
    """
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    preferred = jnp.float32 if accumulate_fp32 else None
    option_sets = [{}]
    if forward := compile_options.forward_options(dtype):
        option_sets.append(forward)
    best = float("inf")
    for options in option_sets:
        matmul = jax.jit(
            lambda x, y: jnp.matmul(x, y, preferred_element_type=preferred),
            compiler_options=options,
        )
        matmul(a, b).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
