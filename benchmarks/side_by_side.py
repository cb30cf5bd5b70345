"""This project against the PyTorch yardstick on the same CPU, in one run: decode and train step.

Runs `pytorch_reference.run` (an independent PyTorch model of the same imagenet256
transformer), then this project's decode step (`MaskGITPipeline.generate_tokens` over T
steps, divided by T: the transformer call plus the sampling around it) and train step
(`train_speed.time_train_step`, the real donated step), each in float32 and bfloat16, and
prints the seconds, the ratio PyTorch / JAX (> 1 means this project is faster) and each
dtype's matmul peak as both frameworks measure it. One after another, so both see the same
machine state.
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


def time_decode_step(batch: int, dtype: str, steps: int, repeats: int) -> float:
    """Seconds per decoding step of class-conditional generation (best of `repeats` runs)."""
    config = config_lib.base_config()
    pipe = sample_speed.initialised_pipeline(config, devices=jax.devices()[:1])
    labels = np.arange(batch) % config.num_classes
    options = pipe.options(num_steps=steps, dtype=dtype)
    seconds = train_speed.best_time(
        lambda: pipe.generate_tokens(labels, jax.random.PRNGKey(1), options), repeats
    )
    return seconds / steps


def main() -> None:
    """Times both frameworks per dtype and prints the side-by-side table."""
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
    torch_args = pytorch_reference.parse_args(
        [
            f"--threads={args.threads}",
            f"--decode_batch={args.decode_batch}",
            f"--train_batch={args.train_batch}",
            f"--repeats={args.repeats}",
            "--dtypes",
            *args.dtypes,
        ]
    )
    torch_times = pytorch_reference.run(torch_args)
    config = config_lib.base_config()
    codebook = config.tokenizer.codebook_size
    work = {
        "decode": flops.transformer_forward_flops(config, args.decode_batch, codebook),
        "train": 3 * flops.transformer_forward_flops(config, args.train_batch, codebook),
    }
    rows = []
    for dtype in args.dtypes:
        jax_peak = flops.measure_matmul_peak(jnp.dtype(dtype))
        decode = time_decode_step(args.decode_batch, dtype, args.steps, args.repeats)
        train = train_speed.time_train_step(args.train_batch, dtype, args.repeats)
        jax_peak = max(jax_peak, flops.measure_matmul_peak(jnp.dtype(dtype)))
        torch_peak = torch_times[f"peak_gflops_{dtype}"] * 1e9
        for work_name, jax_seconds, batch in (
            ("decode", decode, args.decode_batch),
            ("train", train, args.train_batch),
        ):
            torch_key = "forward" if work_name == "decode" else "train"
            torch_seconds = torch_times[f"{torch_key}_{dtype}"]
            rows.append((work_name, dtype, batch, torch_seconds, jax_seconds, work[work_name]))
        rows.append(("peak", dtype, None, torch_peak, jax_peak, None))
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


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "amx_bf16" in cpuinfo.read()
    except OSError:
        return False


if __name__ == "__main__":
    main()
