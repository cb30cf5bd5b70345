"""Forward programs under candidate XLA compiler options, in one process.

Times the imagenet256 transformer forward (batch 8, codebook logits, computing in `--dtype`)
and, with `--dtype float32`, the imagenet256 VQ encoder and decoder (batch 4) and the FID
Inception network (batch 8; float32 models), each jitted with every option set of
`--candidates`, alternating `--rounds` times, and prints the best time per image of each.
The default candidates are XLA's defaults and `compile_options.forward_options`;
`--candidates all` adds the other CPU library routes of `CPU_CANDIDATES`; those of
`UNSAFE_CPU_CANDIDATES` run only when named. Weights are each model's initialisation (speed
does not depend on them). Rerun it after a jaxlib upgrade, or on a new CPU, to see which
options pay.

  python benchmarks/compile_options_speed.py [--rounds 2] [--repeats 3] [--skip inception]
  python benchmarks/compile_options_speed.py --dtype bfloat16 --candidates all
"""

# ruff: noqa: E402 (the allocator relaunch below must run before the heavy imports)
import argparse
from collections.abc import Callable
from typing import Any

from maskgit_jax import host_memory

# As the programs run on CPU: glibc malloc on huge pages (`host_memory`).
HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

import flax.linen as nn
import jax
import jax.numpy as jnp
import train_speed

from maskgit_jax import compile_options, config_lib
from maskgit_jax.evaluation import inception
from maskgit_jax.models import build_tokenizer, build_transformer

_YNN = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU routes besides the default (YNNPACK for single dots and reductions) and float32's
# `forward_options` (XLA's own dot): YNNPACK fusing dots with their neighbours or with
# elementwise fusions, and XNNPACK's greedy graph fusion.
CPU_CANDIDATES = {
    "YNNPACK dot fusions": {_YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"},
    "YNNPACK elementwise": {
        _YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
        "LIBRARY_FUSION_TYPE_ELTWISE"
    },
    "XNNPACK graph": {"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
}
# Routes timed only when named, never in 'all': oneDNN's dot fusions (float32 dots only; bf16
# operands are converted to float32 first). In jaxlib 0.10 they gave the Inception network
# wrong features and killed a process whose program averages before a dot (SIGILL), so no
# program of this project takes them, whatever their speed.
UNSAFE_CPU_CANDIDATES = {
    "oneDNN": {
        _YNN: "LIBRARY_FUSION_TYPE_REDUCE",
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
}


def candidates(names: list[str], dtype: str) -> dict[str, dict[str, Any]]:
    """label -> compiler options for `--candidates` (each distinct option set once)."""
    on_cpu = jax.default_backend() == "cpu"
    safe = {
        "default": {},
        "forward options": compile_options.forward_options(jnp.dtype(dtype)),
        **(CPU_CANDIDATES if on_cpu else {}),
    }
    known = {**safe, **(UNSAFE_CPU_CANDIDATES if on_cpu else {})}
    chosen = list(safe) if names == ["all"] else names
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {list(known)} or 'all'")
    distinct: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if known[name] not in distinct.values():
            distinct[name] = known[name]
    return distinct


def programs(dtype: str = "float32") -> dict[str, tuple[Callable, tuple, int]]:
    """name -> (function, arguments, images per call) for each forward program.

    The VQ and Inception networks compute in float32 only, so they join for float32 alone.
    """
    config = config_lib.base_config()
    length = config_lib.sequence_length(config)
    codebook = config.tokenizer.codebook_size

    transformer = build_transformer(config, dtype=jnp.dtype(dtype))
    ids = jnp.zeros((8, length), jnp.int32)
    transformer_variables = nn.unbox(jax.jit(transformer.init)(jax.random.PRNGKey(0), ids))
    forward = {
        "transformer forward": (
            lambda v, x: transformer.apply(v, x, num_logits=codebook),
            (transformer_variables, ids),
            8,
        )
    }
    return forward if dtype != "float32" else {**forward, **_float32_programs(config)}


def _float32_programs(config) -> dict[str, tuple[Callable, tuple, int]]:
    """The imagenet256 VQ encoder and decoder (batch 4) and the Inception network (batch 8)."""
    side = config_lib.tokens_per_side(config)
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["default", "forward options"],
        help="option sets: default, 'forward options', names in CPU_CANDIDATES or "
        "UNSAFE_CPU_CANDIDATES, or all (the first three kinds)",
    )
    args = parser.parse_args()

    option_sets = candidates(args.candidates, args.dtype)
    print(
        f"backend {jax.default_backend()}; transformer dtype {args.dtype}; "
        f"host malloc: {HOST_MALLOC}"
    )
    for label, options in option_sets.items():
        print(f"  {label}: {options or 'XLA defaults'}")
    for name, (fn, fn_args, images) in programs(args.dtype).items():
        if any(skip.lower() in name.lower() for skip in args.skip):
            continue
        times = {label: [] for label in option_sets}
        for _ in range(args.rounds):
            for label, options in option_sets.items():
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
