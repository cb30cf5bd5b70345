"""Steps/s and model-FLOPs utilisation (MFU) of the transformer train step (imagenet256 model).

The real step (`train_transformer.build_stage`'s, jitted by `train_loop.jit_train_step` with
the state donated) on one device, pre-tokenized batches {"tokens", "label"} so only the
transformer is timed. Training FLOPs = 3 x forward matmul FLOPs (codebook logits only, as the
step computes them). MFU is against this machine's dense-matmul peak of the same compute
dtype, measured in the same run (`flops.measure_matmul_peak`; bf16 operands with fp32
accumulation, as the model's matmuls). Target on CPU: >= 40%.

`--breakdown` also times the forward alone (with and without dropout) and forward+backward,
which shows where a step's time goes beyond its matmuls.

`--config=configs/digits.py` times another config's transformer (the embedded default's train
step: `--config=configs/digits.py --batch 32 --dtypes float32`).

  PYTHONPATH=. python benchmarks/train_speed.py [--batch 8] [--steps 3] [--breakdown]
"""

# ruff: noqa: E402 (the allocator relaunch below must run before the heavy imports)
import argparse
import importlib.util
import os
import time
from collections.abc import Callable, Sequence

from maskgit_jax import host_memory

# As `python -m maskgit_jax.main` trains: glibc malloc on huge pages (`host_memory`).
HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax import config_lib, sharding
from maskgit_jax.training import flops
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import transformer as train_transformer


def best_time(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Best wall time of `fn()` (blocked) over `repeats` calls, after one warm-up call.

    `warm_up=False` skips it, for callers that time the first (compiling) call themselves.
    """
    if warm_up:
        jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def best_times_alternating(calls: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each call over `repeats` rounds that take the calls in turn.

    A drift of the machine's speed (on a shared 2-core VM, 10-25% within minutes) then falls
    on all of them alike instead of on whichever ran last. Each turn starts with an untimed
    call: timed right after PyTorch's, the imagenet256 train step ran 1.5-1.6x slower (fp32
    9.09 against 5.69 s, bf16 3.98 against 2.60 s; its allocator and caches left as the other
    framework had them).
    """
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for index, call in enumerate(calls):
            best[index] = min(best[index], best_time(call, 1))
    return best


def benchmark_config(batch: int, dtype: str, config_path: str | None = None):
    """`config_path`'s config (a file with `get_config()`), else the imagenet256 defaults."""
    if config_path:
        spec = importlib.util.spec_from_file_location("benchmarked_config", config_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    else:
        config = config_lib.base_config()
    config.training.batch_size = batch
    config.training.compute_dtype = dtype
    config.mesh.shape = (1, 1, 1)
    return config


def _batch(config, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    side = config_lib.tokens_per_side(config)
    tokens = rng.integers(0, config.tokenizer.codebook_size, (batch, side, side))
    labels = rng.integers(0, config.num_classes, (batch,))
    return {"tokens": tokens.astype(np.int16), "label": labels.astype(np.int32)}


def train_step_runner(
    batch: int, dtype: str, config_path: str | None = None
) -> Callable[[], jax.Array]:
    """A call that runs one real donated train step on one device and returns its loss."""
    config = benchmark_config(batch, dtype, config_path)
    stage = train_transformer.build_stage(config).stage  # batches of tokens: no tokenizer
    mesh = sharding.create_mesh(config.mesh, devices=jax.devices()[:1])
    setup = train_loop.create_sharded_setup(config, stage, mesh=mesh)
    state = train_loop.init_state(setup, stage, seed=0)
    step_fn = train_loop.jit_train_step(setup, stage)
    data = {k: jnp.asarray(v) for k, v in _batch(config, batch).items()}
    holder = {"state": state}

    def one_step():
        with setup.activate():
            holder["state"], metrics = step_fn(holder["state"], data, None)
        return metrics["loss"]

    return one_step


def time_train_step(batch: int, dtype: str, steps: int, config_path: str | None = None) -> float:
    """Seconds per step of the real donated train step (best of `steps`)."""
    return best_time(train_step_runner(batch, dtype, config_path), steps)


def time_parts(
    batch: int, dtype: str, repeats: int, config_path: str | None = None
) -> dict[str, float]:
    """Seconds of forward (no dropout / dropout) and forward+backward of the step's loss."""
    config = benchmark_config(batch, dtype, config_path)
    trainer = train_transformer.build_stage(config).trainer
    params = sharding.strip_boxes(jax.jit(trainer.init_state)(jax.random.PRNGKey(0)).params)
    data = _batch(config, batch)
    tokens = jnp.asarray(data["tokens"].reshape(batch, -1))
    ids, mask = trainer._inputs(jax.random.PRNGKey(1), tokens, jnp.asarray(data["label"]))
    codebook = config.tokenizer.codebook_size
    rngs = {"dropout": jax.random.PRNGKey(2)}

    def forward(p, deterministic):
        return trainer.model.apply(
            {"params": p}, ids, deterministic=deterministic, num_logits=codebook, rngs=rngs
        )

    def loss(p):
        logits = forward(p, False)[:, 1:]
        total, _, count = train_transformer.masked_token_loss(
            logits, tokens, mask, config.training.label_smoothing
        )
        return total / count

    forward_eval = jax.jit(lambda p: forward(p, True))
    forward_train = jax.jit(lambda p: forward(p, False))
    grad = jax.jit(jax.value_and_grad(loss))
    return {
        "forward (no dropout)": best_time(lambda: forward_eval(params), repeats),
        "forward (dropout)": best_time(lambda: forward_train(params), repeats),
        "forward+backward": best_time(lambda: grad(params), repeats),
    }


def main() -> None:
    """Measures the peaks, times the step per dtype and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="examples per step (1 device)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (best is kept)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--breakdown", action="store_true", help="also time fwd / fwd+bwd")
    parser.add_argument("--config", default=None, help="config file (default: imagenet256)")
    args = parser.parse_args()

    config = benchmark_config(args.batch, "float32", args.config)
    forward = flops.transformer_forward_flops(
        config, args.batch, num_logits=config.tokenizer.codebook_size
    )
    train_flops = 3 * forward
    print(
        f"devices: {jax.devices()[:1]}; load average {os.getloadavg()}; host malloc: {HOST_MALLOC}"
    )
    print(
        f"{args.config or 'imagenet256'} transformer, batch {args.batch} x "
        f"{config_lib.sequence_length(config)} "
        f"tokens: forward {forward / 1e9:.1f} GFLOP, train step {train_flops / 1e9:.1f} GFLOP"
    )
    # The peak is measured right before and after each dtype's step timing, and the higher
    # of the two is used (a conservative MFU); a large gap between them means other load.
    peaks = {}
    rows = []
    for name in args.dtypes:
        before = flops.measure_matmul_peak(jnp.dtype(name))
        seconds = time_train_step(args.batch, name, args.steps, args.config)
        after = flops.measure_matmul_peak(jnp.dtype(name))
        peaks[name] = max(before, after)
        print(
            f"{name} matmul peak before/after the step: {before / 1e9:.0f} / "
            f"{after / 1e9:.0f} GFLOP/s",
            flush=True,
        )
        print(f"{name}: {seconds:.3f} s/step (load average {os.getloadavg()})", flush=True)
        parts = time_parts(args.batch, name, args.steps, args.config) if args.breakdown else {}
        for part, part_seconds in parts.items():
            print(f"{name}: {part} {part_seconds:.3f} s", flush=True)
        rows.append((name, seconds, parts))

    header = f"{'dtype':9s} {'s/step':>8s} {'steps/s':>8s} {'GFLOP/s':>8s} {'peak':>8s} {'MFU':>6s}"
    print(header)
    print("-" * len(header))
    for name, seconds, _ in rows:
        achieved = train_flops / seconds
        print(
            f"{name:9s} {seconds:8.3f} {1 / seconds:8.3f} {achieved / 1e9:8.1f} "
            f"{peaks[name] / 1e9:8.1f} {100 * achieved / peaks[name]:5.1f}%"
        )
    print("(peak: 2048^2 matmul of that dtype, fp32 accumulation; target MFU >= 40%)")
    if args.breakdown:
        for name, seconds, parts in rows:
            print(f"\n{name} breakdown (model FLOPs rate against the {name} peak):")
            for part, part_seconds in [*parts.items(), ("full step", seconds)]:
                part_flops = forward if part.startswith("forward (") else train_flops
                rate = part_flops / part_seconds
                print(
                    f"  {part:22s} {part_seconds:7.3f} s  {rate / 1e9:7.1f} GFLOP/s  "
                    f"{100 * rate / peaks[name]:5.1f}%"
                )
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
