"""MaskGIT parallel decoding vs raster-order autoregressive decoding with a KV cache.

Both transformers have the imagenet256 sizes (hidden 768, 16 heads, MLP 3072, 24 layers
unless --layers/--small reduce both) and random weights, and produce the same 16x16 grid of
256 tokens per image for a class label: MaskGIT in T full-sequence passes (the one sampler,
`MaskGITPipeline.generate_tokens`), the causal transformer in 256 sequential one-token
passes (`ar_sampling.ar_generate`, one jitted loop). Prints images/s of each and their ratio; each
timing is the best of --repeats calls after a compiling warm-up call.

  python benchmarks/decode_speed.py [--batch 8] [--steps 8 12 16] [--layers N | --small]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import sample_speed
from flax import linen as nn

from maskgit_jax import config_lib
from maskgit_jax.decoding import autoregressive as ar_sampling
from maskgit_jax.models.autoregressive import build_autoregressive


def _time(fn, repeats):
    start = time.perf_counter()
    fn()  # compile and warm up
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, first


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=None, help="layers of both models")
    parser.add_argument("--small", action="store_true", help="quick run: 2 layers each")
    args = parser.parse_args()

    config = config_lib.base_config()
    if args.small:
        config.transformer.num_layers = 2
    if args.layers is not None:
        config.transformer.num_layers = args.layers
    dtype = jnp.dtype(args.dtype)
    num_tokens = config_lib.sequence_length(config) - 1
    t = config.transformer
    print(f"devices: {jax.devices()}")
    print(
        f"imagenet256 architecture: {num_tokens} image tokens, hidden {t.hidden_size}, "
        f"{t.num_layers} layers, {t.num_heads} heads, MLP {t.mlp_dim}, {args.dtype}"
    )

    pipe = sample_speed.initialised_pipeline(config, max_batch_size=max(args.batch))
    ar_model = build_autoregressive(config, dtype=dtype)
    ids = jnp.zeros((1, config_lib.sequence_length(config)), jnp.int32)
    ar_vars = nn.unbox(jax.jit(ar_model.init)(jax.random.PRNGKey(1), ids))

    for batch in args.batch:
        labels = np.arange(batch) % config.num_classes

        def run_ar(labels=labels):
            return ar_sampling.ar_generate(
                ar_vars, labels, jax.random.PRNGKey(2), ar_model
            ).block_until_ready()

        ar_seconds, ar_first = _time(run_ar, args.repeats)
        ar_rate = batch / ar_seconds
        print(
            f"autoregressive, {num_tokens} steps, batch {batch}: {ar_rate:.3f} images/s "
            f"({ar_seconds:.2f} s per batch; first call with compile {ar_first:.1f} s)"
        )
        for steps in args.steps:

            def run_maskgit(labels=labels, steps=steps):
                return pipe.generate_tokens(
                    labels, jax.random.PRNGKey(2), num_steps=steps, dtype=args.dtype
                )

            seconds, first = _time(run_maskgit, args.repeats)
            rate = batch / seconds
            print(
                f"MaskGIT T={steps:2d}, batch {batch}: {rate:.3f} images/s "
                f"({seconds:.2f} s per batch; first call {first:.1f} s); "
                f"MaskGIT / autoregressive = {rate / ar_rate:.2f}x"
            )


if __name__ == "__main__":
    main()
