"""float32 forward programs with and without `compile_options.forward_options`, in one process.

Times the imagenet256 transformer forward (batch 8, codebook logits), the imagenet256 VQ
encoder and decoder (batch 4) and the FID Inception network (batch 8), each jitted with the
default XLA options and with float32's forward options, alternating `--rounds` times, and
prints the best time per image of each. Weights are each model's initialisation (speed does
not depend on them). Rerun it after a jaxlib upgrade to see whether the options still pay.

  python benchmarks/compile_options_speed.py [--rounds 2] [--repeats 3] [--skip inception]
"""

import argparse
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import train_speed

from maskgit_jax import compile_options, config_lib
from maskgit_jax.evaluation import inception
from maskgit_jax.models import build_tokenizer, build_transformer


def programs() -> dict[str, tuple[Callable, tuple, int]]:
    """name -> (function, arguments, images per call) for each float32 forward program."""
    config = config_lib.base_config()
    length = config_lib.sequence_length(config)
    side = config_lib.tokens_per_side(config)
    codebook = config.tokenizer.codebook_size

    transformer = build_transformer(config)
    ids = jnp.zeros((8, length), jnp.int32)
    transformer_variables = nn.unbox(jax.jit(transformer.init)(jax.random.PRNGKey(0), ids))

    tokenizer = build_tokenizer(config)
    image = jnp.zeros((1, config.image_size, config.image_size, 3))
    tokenizer_variables = jax.jit(lambda k: tokenizer.init(k, image, train=False))(
        jax.random.PRNGKey(1)
    )
    grid = jnp.zeros((4, side, side), jnp.int32)

    network = inception.InceptionV3()
    images = jax.random.uniform(jax.random.PRNGKey(3), (8, 299, 299, 3))
    inception_params = jax.jit(network.init)(jax.random.PRNGKey(2), images)["params"]

    return {
        "transformer forward": (
            lambda v, x: transformer.apply(v, x, num_logits=codebook),
            (transformer_variables, ids),
            8,
        ),
        "VQ encoder": (
            lambda v, x: tokenizer.apply(v, x, method="encode"),
            (tokenizer_variables, jnp.zeros((4, *image.shape[1:]))),
            4,
        ),
        "VQ decoder": (
            lambda v, g: tokenizer.apply(v, g, method="decode"),
            (tokenizer_variables, grid),
            4,
        ),
        "Inception": (lambda p, x: network.apply({"params": p}, x), (inception_params, images), 8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="program names to leave out")
    args = parser.parse_args()

    tuned = compile_options.forward_options(jnp.float32)
    print(f"backend {jax.default_backend()}; float32 forward options: {tuned or 'none'}")
    for name, (fn, fn_args, images) in programs().items():
        if any(skip.lower() in name.lower() for skip in args.skip):
            continue
        times = {"default": [], "forward options": []}
        for _ in range(args.rounds):
            for label, options in (("default", {}), ("forward options", tuned)):
                jitted = jax.jit(fn, compiler_options=options)
                times[label].append(
                    train_speed.best_time(lambda j=jitted, a=fn_args: j(*a), args.repeats)
                )
        figures = ", ".join(
            f"{label} " + " / ".join(f"{1e3 * t / images:.0f}" for t in values)
            for label, values in times.items()
        )
        print(f"{name}: ms per image, each round: {figures}", flush=True)


if __name__ == "__main__":
    main()
