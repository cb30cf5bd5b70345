"""Images/s of class-conditional token generation for the imagenet256 architecture.

Random weights; batches 8 (and e.g. 64); T = 8, 12, 16; fp32 and bf16 compute (bf16 matmul
operands, fp32 accumulation, softmax and LayerNorm statistics), all through the one sampler
(`MaskGITPipeline.generate_tokens`). The first call of each program compiles it (reported
apart); the timed calls reuse it. Reports the fraction of this
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
import train_speed
from flax import linen as nn

from maskgit_jax import config_lib
from maskgit_jax.sampling.pipeline import MaskGITPipeline
from maskgit_jax.training import flops


def initialised_pipeline(config, **kwargs) -> MaskGITPipeline:
    """A pipeline of random weights whose transformer has its own initialisation.

    `with_random_weights`' fill scale suits smoke tests; timings and bf16 agreement want the
    transformer's real initialisation. `kwargs` go to `with_random_weights` (devices, ...).
    """
    pipe = MaskGITPipeline.with_random_weights(config, **kwargs)
    ids = jnp.zeros((1, config_lib.sequence_length(config)), jnp.int32)
    pipe.set_variables(
        transformer_variables=nn.unbox(jax.jit(pipe.transformer.init)(jax.random.PRNGKey(0), ids))
    )
    return pipe


def _class_inputs(labels: np.ndarray, config) -> jnp.ndarray:
    """Class token then all image tokens masked, as the sampler builds them."""
    masked = np.full(
        (len(labels), config_lib.sequence_length(config) - 1),
        config_lib.mask_token_id(config),
        np.int32,
    )
    return jnp.asarray(
        np.concatenate([config.tokenizer.codebook_size + labels[:, None], masked], 1)
    )


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

    pipe = initialised_pipeline(config, max_batch_size=max(args.batch))
    codebook = config.tokenizer.codebook_size

    rows = {}
    for batch in args.batch:
        labels = np.arange(batch) % config.num_classes
        step_flops = flops.transformer_forward_flops(config, batch, num_logits=codebook)
        for name in args.dtypes:
            for steps in args.steps:
                options = pipe.options(num_steps=steps, dtype=name)
                start = time.perf_counter()
                pipe.generate_tokens(labels, jax.random.PRNGKey(1), options)
                first_s = time.perf_counter() - start
                # This VM's clock drifts by 20% over minutes: compare against the higher of
                # the peaks measured right before and right after the timing.
                seconds = train_speed.best_time(
                    lambda o=options, y=labels: pipe.generate_tokens(y, jax.random.PRNGKey(1), o),
                    args.repeats,
                    warm_up=False,  # the call above compiled and ran it
                )
                peak = max(peaks[name], flops.measure_matmul_peak(jnp.dtype(name)))
                images_per_s = batch / seconds
                utilisation = steps * step_flops / seconds / peak
                rows[name, batch, steps] = images_per_s
                print(
                    f"{name:8s} batch={batch:3d} T={steps:2d}: {images_per_s:.3f} images/s "
                    f"({seconds:.1f} s, first call with compile {first_s:.0f} s), "
                    f"{steps * step_flops / seconds / 1e9:.0f} GFLOP/s = "
                    f"{100 * utilisation:.0f}% of the {name} matmul peak ({peak / 1e9:.0f})",
                    flush=True,
                )
                peaks[name] = flops.measure_matmul_peak(jnp.dtype(name))
    if "float32" in args.dtypes and "bfloat16" in args.dtypes:
        for batch in args.batch:
            for steps in args.steps:
                ratio = rows["bfloat16", batch, steps] / rows["float32", batch, steps]
                print(f"bf16/fp32 speed-up batch={batch} T={steps}: {ratio:.2f}x")
        # One forward pass on a half-masked sequence, weights cast as decoding casts them.
        labels = np.arange(8)
        half_known = _class_inputs(labels, config).at[:, 1::2].set(labels[:, None] % codebook)
        forward = {}
        for name in ("float32", "bfloat16"):
            logits_fn = pipe._logits_fn(pipe.options(dtype=name))
            weights = pipe._cast_variables(name)
            forward[name] = jax.jit(logits_fn)((weights, 0.0), half_known)
        agreement = np.mean(np.argmax(forward["bfloat16"], -1) == np.argmax(forward["float32"], -1))
        print(f"bf16 argmax tokens equal to fp32 on one forward pass: {100 * agreement:.2f}%")

    if args.with_images:
        image = jnp.zeros((1, config.image_size, config.image_size, 3))
        pipe.set_variables(
            tokenizer_variables=jax.jit(lambda k: pipe.tokenizer.init(k, image, train=False))(
                jax.random.PRNGKey(2)
            )
        )
        side = config_lib.tokens_per_side(config)
        for batch in args.batch:
            tokens = np.zeros((batch, side, side), np.int32)
            seconds = train_speed.best_time(lambda t=tokens: pipe.decode_tokens(t), 1)
            print(f"VQ decoder, batch {batch}: {batch / seconds:.3f} images/s")


if __name__ == "__main__":
    main()
