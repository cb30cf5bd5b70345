"""Transformer-stage steps/s: one process of 8 CPU devices against two processes of 4.

Both runs go through `python -m maskgit_jax.main` with the same config, mesh and global
batch; the two-process job joins over 127.0.0.1 with an explicit coordinator. A one-step
tokenizer run provides the frozen tokenizer (its quality does not change the step time).
Prints the median steps/s that `main` logs (clu's ReportProgress), after the first steps.

  python benchmarks/multihost_speed.py --steps 300 [--config configs/digits.py]
"""

import argparse
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps_per_sec(workdir: str) -> list[float]:
    import tensorflow as tf

    values = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "steps_per_sec":
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return [values[s] for s in sorted(values)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, workdir, flags, processes, devices_per_process):
    command = [sys.executable, "-m", "maskgit_jax.main", f"--config={args.config}"]
    command += [f"--workdir={workdir}", *flags]
    env = dict(os.environ, PYTHONPATH=REPO)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    started = time.monotonic()
    for i in range(processes):
        extra = {}
        if processes > 1:
            extra = {
                "JAX_COORDINATOR_ADDRESS": address,
                "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(i),
            }
        log = open(f"{workdir}.{i}.log", "w")
        procs.append(
            subprocess.Popen(command, cwd=REPO, env={**env, **extra}, stdout=log, stderr=log)
        )
    for i, proc in enumerate(procs):
        if proc.wait() != 0:
            sys.exit(f"process {i} failed; see {workdir}.{i}.log")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mesh", default="(8,1,1)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="multihost_speed_")
    tokenizer = os.path.join(root, "tokenizer")
    _run(
        args,
        tokenizer,
        ["--config.stage=tokenizer", "--config.tokenizer_training.num_train_steps=1"],
        1,
        1,
    )
    common = [
        "--config.stage=transformer",
        f"--config.training.tokenizer_checkpoint={tokenizer}",
        f"--config.training.num_train_steps={args.steps}",
        f"--config.training.batch_size={args.batch}",
        f"--config.mesh.shape={args.mesh}",
        "--config.logging.log_every_steps=20",
        "--config.logging.eval_every_steps=0",
        "--config.logging.sample_every_steps=0",
        f"--config.checkpoint.every_steps={args.steps}",
    ]
    print(f"transformer stage of {args.config}, global batch {args.batch}, mesh {args.mesh}")
    for processes, devices in ((1, 8), (2, 4)):
        workdir = os.path.join(root, f"p{processes}")
        wall = _run(args, workdir, common, processes, devices)
        rates = _steps_per_sec(workdir)[1:]  # The first report includes compilation.
        print(
            f"{processes} process(es) x {devices} devices: median {np.median(rates):.2f} "
            f"steps/s over {len(rates)} reports (wall {wall:.0f} s with start-up and compile)"
        )


if __name__ == "__main__":
    main()
