"""Two JAX processes of 4 CPU devices each (jax.distributed on loopback) train like one.

Each process runs tests/training_support.py's driver: the reference transformer config with
dataset.global_order, on a (2,2,2) mesh over the 8 global devices, for a few steps. Their
losses must equal the single-process 8-device reference run (run_a) and its 1-device replay.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import REPO_ROOT
from tests.training_support import NUM_COMPARED_STEPS, first_batches, read_scalars

pytest_plugins = ["tests.training_support"]

NUM_PROCESSES = 2
# Seconds both processes together may take (start-up, distributed init, compile, steps).
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_processes(tmp_path, data_dir, tokenizer_checkpoint) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # Loopback only: no proxy, and JAX must not look for a cluster of its own.
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        env.pop(name, None)
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(NUM_PROCESSES):
            log = open(tmp_path / f"process_{i}.log", "w")
            logs.append(log)
            command = [
                sys.executable,
                "-m",
                "tests.training_support",
                f"--port={port}",
                f"--num_processes={NUM_PROCESSES}",
                f"--process_id={i}",
                f"--data_dir={data_dir}",
                f"--tokenizer_checkpoint={tokenizer_checkpoint}",
                f"--out={tmp_path / f'result_{i}.json'}",
            ]
            procs.append(
                subprocess.Popen(
                    command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        output = (tmp_path / f"process_{i}.log").read_text()
        assert proc.returncode == 0, f"process {i} failed:\n{output[-4000:]}"
    return [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(NUM_PROCESSES)]


def test_two_processes_match_one_process(tmp_path, data_dir, run_a, one_device_losses):
    config, workdir, _ = run_a
    results = _run_processes(tmp_path, data_dir, config.training.tokenizer_checkpoint)

    for i, result in enumerate(results):
        assert result["process_index"] == i
        assert result["process_count"] == NUM_PROCESSES
        assert result["device_count"] == 8 and result["local_device_count"] == 4
        assert result["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
        # Each process fed half of every global batch, and parameters are split.
        assert result["local_batch_size"] == config.training.batch_size // NUM_PROCESSES
        assert result["sharded_param_leaves"] > 0

    # global_order: the processes' rows, in process order, are the single-process batches.
    single = first_batches(config, NUM_COMPARED_STEPS)
    for step, batch in enumerate(single):
        joined = results[0]["local_labels"][step] + results[1]["local_labels"][step]
        assert joined == batch["label"].tolist()

    # Both processes see the same (replicated) loss, equal to the single-process runs'.
    np.testing.assert_array_equal(results[0]["losses"], results[1]["losses"])
    multi = results[0]["losses"]
    assert len(multi) == NUM_COMPARED_STEPS and all(np.isfinite(multi))
    logged = read_scalars(workdir, "loss")
    eight_devices = [logged[step] for step in range(1, NUM_COMPARED_STEPS + 1)]
    np.testing.assert_allclose(multi, eight_devices, rtol=1e-5)
    np.testing.assert_allclose(multi, one_device_losses, rtol=1e-4)
