"""Steps/s and FLOPs utilisation of the tokenizer train step (generator + discriminator).

The real step (`train_tokenizer.build_stage`'s, jitted by `train_loop.jit_train_step`, state
donated) for the imagenet256 tokenizer with the authors' loss set: L2 + quantizer + VGG16
perceptual (random VGG weights: speed does not depend on them) + non-saturating GAN with a
StyleGAN discriminator and R1. FLOPs per step come from XLA's cost analysis of the compiled
step; utilisation is against this machine's fp32 dense-matmul peak measured in the same run.

  PYTHONPATH=. python benchmarks/tokenizer_train_speed.py [--batch 1] [--image_size 256]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import config_lib
from maskgit_jax.models.perceptual import VGG16Features
from maskgit_jax.training import flops
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import tokenizer as train_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no_perceptual", action="store_true")
    args = parser.parse_args()

    config = config_lib.base_config()
    config.image_size = args.image_size
    config.tokenizer_training.batch_size = args.batch
    config.discriminator.mbstd_group_size = min(4, args.batch)
    config.mesh.shape = (1, 1, 1)
    if args.no_perceptual:
        config.tokenizer_training.perceptual_weight = 0.0
    images = np.random.default_rng(0).random((args.batch, args.image_size, args.image_size, 3))
    images = images.astype(np.float32)
    perceptual = None
    if config.tokenizer_training.perceptual_weight > 0:
        perceptual = jax.jit(VGG16Features().init)(jax.random.PRNGKey(1), images[:1])["params"]
    stage = train_tokenizer.build_stage(config, perceptual).stage
    setup = train_loop.create_sharded_setup(config, stage)
    state = train_loop.init_state(setup, stage, seed=0)
    step = train_loop.jit_train_step(setup, stage)
    with setup.activate():
        compiled = step.lower(state, {"image": images}, perceptual).compile()
    step_flops = compiled.cost_analysis()["flops"]
    peak = flops.measure_matmul_peak(jnp.float32)
    with setup.activate():
        state, metrics = step(state, {"image": images}, perceptual)
        jax.block_until_ready(metrics)
        best = float("inf")
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, {"image": images}, perceptual)
            jax.block_until_ready(metrics)
            best = min(best, time.perf_counter() - start)
    print(f"devices: {jax.devices()}")
    print(f"fp32 matmul peak (2048^2): {peak / 1e9:.0f} GFLOP/s")
    print(
        f"tokenizer {args.image_size}px batch {args.batch} "
        f"(perceptual={'on' if perceptual is not None else 'off'}, GAN+R1 on): "
        f"{1 / best:.3f} steps/s, {step_flops / 1e9:.0f} GFLOP/step (XLA cost analysis), "
        f"{step_flops / best / 1e9:.0f} GFLOP/s = {100 * step_flops / best / peak:.0f}% of peak"
    )
    print(f"loss {float(metrics['loss']):.4f}, finite: {bool(np.isfinite(metrics['loss']))}")


if __name__ == "__main__":
    main()
