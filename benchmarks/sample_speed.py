"""Images/s of class-conditional token generation for the imagenet256 architecture.

Random weights; batches 8 (and e.g. 64); T = 8, 12, 16; fp32 and bf16 compute (bf16 matmul
operands, fp32 accumulation, softmax and LayerNorm statistics). Each program is compiled
ahead of time (compile time reported apart), then timed. Reports the fraction of this
machine's matmul peak for the same dtype, measured right before and after each timing, that
the decoder achieves, and the agreement of bf16 with fp32 argmax tokens on one forward pass.

  python benchmarks/sample_speed.py [--batch 8 64] [--steps 8 12 16] [--repeats 1] \
      [--dtypes float32 bfloat16] [--with_images]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from maskgit_jax import config_lib
from maskgit_jax.sampling import sampler as sampling
from maskgit_jax.training import flops


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _compiled_generate(sampler, variables, labels, steps):
    """The sampler's decoding program for these shapes, compiled ahead of time (seconds too)."""
    config = sampler.config.sampling
    args = (
        variables,
        jnp.asarray(labels, jnp.int32),
        jax.random.PRNGKey(1),
        jnp.float32(config.choice_temperature),
        jnp.float32(config.temperature),
    )
    start = time.perf_counter()
    # The same jitted function `generate_tokens` calls, lowered for these exact arguments.
    compiled = (
        type(sampler)
        ._generate_tokens.lower(sampler, *args, num_steps=steps, schedule=config.schedule)
        .compile()
    )
    return (lambda: compiled(*args)), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--with_images", action="store_true", help="also time the VQ decoder")
    args = parser.parse_args()

    config = config_lib.base_config()
    print(f"devices: {jax.devices()}")
    peaks = {name: flops.measure_matmul_peak(jnp.dtype(name)) for name in args.dtypes}
    for name, peak in peaks.items():
        print(f"matmul peak {name} (2048^2, fp32 accumulation): {peak / 1e9:.0f} GFLOP/s")

    samplers = {
        name: sampling.MaskGITSampler(config, dtype=jnp.dtype(name)) for name in args.dtypes
    }
    any_sampler = next(iter(samplers.values()))
    ids = sampling.class_conditional_inputs(jnp.zeros(1, jnp.int32), config)
    variables = nn.unbox(jax.jit(any_sampler.transformer.init)(jax.random.PRNGKey(0), ids))
    codebook = config.tokenizer.codebook_size

    rows = {}
    for batch in args.batch:
        labels = np.arange(batch) % config.num_classes
        step_flops = flops.transformer_forward_flops(config, batch, num_logits=codebook)
        for name, sampler in samplers.items():
            for steps in args.steps:
                run, compile_s = _compiled_generate(sampler, variables, labels, steps)
                # This VM's clock drifts by 20% over minutes: compare against the higher of
                # the peaks measured right before and right after the timing.
                seconds = _best_time(run, args.repeats)
                peak = max(peaks[name], flops.measure_matmul_peak(jnp.dtype(name)))
                images_per_s = batch / seconds
                utilisation = steps * step_flops / seconds / peak
                rows[name, batch, steps] = images_per_s
                print(
                    f"{name:8s} batch={batch:3d} T={steps:2d}: {images_per_s:.3f} images/s "
                    f"({seconds:.1f} s, compile {compile_s:.0f} s), "
                    f"{steps * step_flops / seconds / 1e9:.0f} GFLOP/s = "
                    f"{100 * utilisation:.0f}% of the {name} matmul peak ({peak / 1e9:.0f})",
                    flush=True,
                )
                peaks[name] = flops.measure_matmul_peak(jnp.dtype(name))
    if "float32" in samplers and "bfloat16" in samplers:
        for batch in args.batch:
            for steps in args.steps:
                ratio = rows["bfloat16", batch, steps] / rows["float32", batch, steps]
                print(f"bf16/fp32 speed-up batch={batch} T={steps}: {ratio:.2f}x")
        # One forward pass on a half-masked sequence, weights cast as decoding casts them.
        labels = np.arange(8)
        half_known = sampling.class_conditional_inputs(jnp.asarray(labels), config)
        half_known = half_known.at[:, 1::2].set(jnp.asarray(labels)[:, None] % codebook)
        forward = {
            name: jax.jit(s.codebook_logits)(
                sampling.cast_matmul_kernels(variables, s.transformer.dtype), half_known
            )
            for name, s in samplers.items()
        }
        agreement = np.mean(np.argmax(forward["bfloat16"], -1) == np.argmax(forward["float32"], -1))
        print(f"bf16 argmax tokens equal to fp32 on one forward pass: {100 * agreement:.2f}%")

    if args.with_images:
        sampler = samplers[args.dtypes[0]]
        image = jnp.zeros((1, config.image_size, config.image_size, 3))
        tok_vars = jax.jit(lambda k: sampler.tokenizer.init(k, image, train=False))(
            jax.random.PRNGKey(2)
        )
        for batch in args.batch:
            tokens = np.zeros((batch, config_lib.sequence_length(config) - 1), np.int32)
            jax.block_until_ready(sampler.decode_tokens(tok_vars, tokens))  # compile
            seconds = _best_time(lambda t=tokens: sampler.decode_tokens(tok_vars, t), 1)
            print(f"VQ decoder, batch {batch}: {batch / seconds:.3f} images/s")


if __name__ == "__main__":
    main()
