"""This project against the PyTorch yardstick on the same CPU, in one run: decode and train step.

Builds the calls of `pytorch_reference.timed_calls` (an independent PyTorch model of the same
imagenet256 transformer) and this project's decode step (`MaskGITPipeline.generate_tokens` over
T steps, divided by T: the transformer call plus the sampling around it) and train step
(`train_speed.train_step_runner`, the real donated step), each in float32 and bfloat16. Each
pair (PyTorch's and this project's) is timed in alternation, best of `--repeats` rounds
(`train_speed.best_times_alternating`), so a drift of the machine's speed within the run falls
on both. It prints the seconds, the ratio PyTorch / JAX (> 1 means this project is faster) and
each dtype's matmul peak as both frameworks measure it, before and after that dtype's timings.
Both run in this one process, so both get the same allocator: glibc malloc on transparent
huge pages where `maskgit_jax.host_memory` restarts the script with it (as `main` trains),
glibc's default with MASKGIT_JAX_HUGE_PAGES=0.

  pip install -e .[benchmarks]
  python benchmarks/side_by_side.py [--decode_batch 8] [--train_batch 4] [--steps 8] \
      [--repeats 2] [--threads 2] [--dtypes float32 bfloat16]
"""

# ruff: noqa: E402 (the allocator relaunch below must run before the heavy imports)
import argparse
import os
from collections.abc import Callable

from maskgit_jax import host_memory

# As `python -m maskgit_jax.main` trains: glibc malloc on huge pages (`host_memory`).
HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

import jax
import jax.numpy as jnp
import numpy as np
import pytorch_reference
import sample_speed
import train_speed

from maskgit_jax import config_lib
from maskgit_jax.training import flops


def decode_call(batch: int, dtype: str, steps: int) -> Callable[[], object]:
    """One class-conditional generation of `steps` decoding steps (the timed JAX decode call)."""
    config = config_lib.base_config()
    pipe = sample_speed.initialised_pipeline(config, devices=jax.devices()[:1])
    labels = np.arange(batch) % config.num_classes
    options = pipe.options(num_steps=steps, dtype=dtype)
    return lambda: pipe.generate_tokens(labels, jax.random.PRNGKey(1), options)


def time_decode_step(batch: int, dtype: str, steps: int, repeats: int) -> float:
    """Seconds per decoding step of class-conditional generation (best of `repeats` runs)."""
    return train_speed.best_time(decode_call(batch, dtype, steps), repeats) / steps


def main() -> None:
    """Times both frameworks per dtype, in alternation, and prints the side-by-side table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode_batch", type=int, default=8)
    parser.add_argument("--train_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps T per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    print(f"load average {os.getloadavg()}; amx_bf16: {_has_amx()}", flush=True)
    print(f"host malloc: {HOST_MALLOC}", flush=True)
    torch_calls = pytorch_reference.timed_calls(
        pytorch_reference.parse_args(
            [
                f"--threads={args.threads}",
                f"--decode_batch={args.decode_batch}",
                f"--train_batch={args.train_batch}",
                "--dtypes",
                *args.dtypes,
            ]
        )
    )
    config = config_lib.base_config()
    codebook = config.tokenizer.codebook_size
    work = {
        "decode": flops.transformer_forward_flops(config, args.decode_batch, codebook),
        "train": 3 * flops.transformer_forward_flops(config, args.train_batch, codebook),
    }
    rows = []
    for dtype in args.dtypes:
        torch_peak, jax_peak = _peaks(dtype)
        decode = decode_call(args.decode_batch, dtype, args.steps)
        torch_decode, jax_generate = train_speed.best_times_alternating(
            [torch_calls[f"forward_{dtype}"], decode], args.repeats
        )
        jax_decode = jax_generate / args.steps
        rows.append(("decode", dtype, args.decode_batch, torch_decode, jax_decode, work["decode"]))
        train = train_speed.train_step_runner(args.train_batch, dtype)
        torch_train, jax_train = train_speed.best_times_alternating(
            [torch_calls[f"train_{dtype}"], train], args.repeats
        )
        rows.append(("train", dtype, args.train_batch, torch_train, jax_train, work["train"]))
        torch_after, jax_after = _peaks(dtype)
        rows.append(
            ("peak", dtype, None, max(torch_peak, torch_after), max(jax_peak, jax_after), None)
        )
        print(f"{dtype} timed; load average {os.getloadavg()}", flush=True)

    header = (
        f"{'work':7s} {'dtype':9s} {'batch':>5s} {'PyTorch s':>10s} {'JAX s':>8s} "
        f"{'ratio':>6s} {'JAX GFLOP/s':>11s} {'% JAX peak':>10s}"
    )
    print(header)
    print("-" * len(header))
    peaks = {dtype: jax_peak for work_name, dtype, _, _, jax_peak, _ in rows if work_name == "peak"}
    for work_name, dtype, batch, torch_value, jax_value, work_flops in rows:
        if work_name == "peak":
            print(
                f"{'matmul':7s} {dtype:9s} {'':>5s} peak GFLOP/s: PyTorch {torch_value / 1e9:.0f}, "
                f"JAX {jax_value / 1e9:.0f}"
            )
            continue
        rate = work_flops / jax_value
        print(
            f"{work_name:7s} {dtype:9s} {batch:5d} {torch_value:10.3f} {jax_value:8.3f} "
            f"{torch_value / jax_value:5.2f}x {rate / 1e9:11.1f} {100 * rate / peaks[dtype]:9.1f}%"
        )
    print("(ratio: PyTorch seconds / JAX seconds, > 1 means JAX is faster; decode = one step)")


def _peaks(dtype: str) -> tuple[float, float]:
    """FLOP/s of each framework's 2048x2048 matmul in `dtype` (PyTorch's, then JAX's)."""
    return pytorch_reference.matmul_peak(dtype), flops.measure_matmul_peak(jnp.dtype(dtype))


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "amx_bf16" in cpuinfo.read()
    except OSError:
        return False


if __name__ == "__main__":
    main()
