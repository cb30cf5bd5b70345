"""Multi-host training through `python -m maskgit_jax.main` itself, on 127.0.0.1.

Two processes of 4 CPU devices each (a 2x2x2 mesh over the 8 global devices) run the real
entry point with relative paths, as a user types them. Each run is long enough for sample
grids, held-out eval, in-training FID/IS and rFID (a synthetic Inception graph), checkpoints
and the export to fire. The processes are SIGTERM'd mid-run and started again; every step's
loss must equal a one-process 8-device run of the same config (`reference`), and the model
exported by the two processes must load in this one process and sample the very grid they
wrote. Two launch paths are covered: SLURM's variables (as `srun` sets them, one task per
"node") and an explicit JAX_COORDINATOR_ADDRESS with the process count and id.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from maskgit_jax import main
from maskgit_jax.data import images_io
from maskgit_jax.sampling.pipeline import MaskGITPipeline
from maskgit_jax.training import transformer as train_transformer
from tests.conftest import REPO_ROOT
from tests.inception_graph import write_graph
from tests.training_support import read_scalars, tiny_config, write_config_file

pytest_plugins = ["tests.training_support"]

NUM_PROCESSES = 2
# CPU devices each process has (a 2x2x2 mesh over the 8 global devices).
LOCAL_DEVICES = 4
TOKENIZER_STEPS = 30
TRANSFORMER_STEPS = 30
# Checkpoints, held-out eval and sample grids every EVERY steps; FID/IS/rFID every 20.
EVERY = 10
METRICS_EVERY = 20
# Seconds one launch of both processes may take (start-up, distributed init, compiles, steps).
TIMEOUT_S = 600


def _overrides(inception_path: str, **extra) -> dict:
    return {
        "stage": "both",
        "mesh.shape": (2, 2, 2),
        # The entropy loss (softmax of distances at temperature 0.01) turns the rounding of
        # the gradient all-reduce, which differs between one process and gloo across two,
        # into flipped code assignments: one process on meshes (2,2,2) and (8,1,1) already
        # differs by 4e-4 at step 3 with it, by < 4e-7 over 30 steps without it at this rate.
        "tokenizer_loss.entropy_loss_ratio": 0.0,
        "tokenizer_training.learning_rate": 1e-4,
        "tokenizer_training.num_train_steps": TOKENIZER_STEPS,
        "training.num_train_steps": TRANSFORMER_STEPS,
        "checkpoint.every_steps": EVERY,
        "logging.log_every_steps": 1,
        "logging.eval_every_steps": EVERY,
        "logging.sample_every_steps": EVERY,
        "evaluation.inception_path": inception_path,
        "evaluation.every_steps": METRICS_EVERY,
        "evaluation.num_samples": 16,
        "evaluation.batch_size": 8,
        "evaluation.reference_examples": 8,
        "evaluation.inception_score_splits": 2,
        "evaluation.keep_reference_features": True,
        **extra,
    }


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    return write_graph(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, inception_path):
    """stage=both in this one process over its 8 devices, uninterrupted: the workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    main.train_and_evaluate(tiny_config(data_dir, **_overrides(inception_path)), workdir)
    return workdir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_slurm_job_id() -> int:
    """A job id whose SLURM coordinator port (job_id % 4096 + 61440, JAX's rule) is free."""
    for job_id in np.random.default_rng().permutation(4096):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", int(job_id) + 61440))
            except OSError:
                continue
            return int(job_id)
    raise RuntimeError("no free port in 61440-65535")


def _process_environments(launcher: str) -> list[dict]:
    base = dict(os.environ)
    base["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    base["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + base.get("PYTHONPATH", "")
    for name in [n for n in base if n.startswith(("SLURM_", "JAX_", "OMPI_", "TPU_"))]:
        del base[name]
    environments = []
    if launcher == "slurm":
        job_id = _free_slurm_job_id()
        for i in range(NUM_PROCESSES):
            environments.append(
                {
                    **base,
                    "SLURM_JOB_ID": str(job_id),
                    "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_NTASKS": str(NUM_PROCESSES),
                    "SLURM_PROCID": str(i),
                    "SLURM_LOCALID": "0",
                    "SLURM_NODEID": str(i),
                    "SLURM_STEP_TASKS_PER_NODE": f"1(x{NUM_PROCESSES})",
                    "JAX_LOCAL_DEVICE_IDS": "0,1,2,3",
                }
            )
    else:
        address = f"127.0.0.1:{_free_port()}"
        for i in range(NUM_PROCESSES):
            environments.append(
                {
                    **base,
                    "JAX_COORDINATOR_ADDRESS": address,
                    "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
                    "JAX_PROCESS_ID": str(i),
                }
            )
    return environments


def _launch(cwd, config_file, workdir, launcher, name, sigterm_when=None) -> list[str]:
    """Runs both processes of `python -m maskgit_jax.main`; returns their logs.

    `sigterm_when()` is polled while they run; once it is True both get SIGTERM.
    """
    command = [sys.executable, "-m", "maskgit_jax.main", f"--config={config_file}"]
    command.append(f"--workdir={workdir}")
    procs, logs = [], []
    try:
        for i, env in enumerate(_process_environments(launcher)):
            log = open(cwd / f"{name}_{i}.log", "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + TIMEOUT_S
        signalled = sigterm_when is None
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if not signalled and sigterm_when():
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    outputs = [(cwd / f"{name}_{i}.log").read_text() for i in range(len(procs))]
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, (
            f"{name}: process {i} exited {proc.returncode}:\n" + (output[-5000:])
        )
    assert "JAX process 0/2: 4 local of 8 devices" in outputs[0], outputs[0][-3000:]
    assert "JAX process 1/2: 4 local of 8 devices" in outputs[1], outputs[1][-3000:]
    return outputs


def _assert_same_losses(workdir, reference_dir, num_steps):
    for tag in ("loss", "grad_norm"):
        got, want = read_scalars(workdir, tag), read_scalars(reference_dir, tag)
        assert sorted(got) == sorted(want) == list(range(1, num_steps + 1)), tag
        np.testing.assert_allclose(
            [got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5, err_msg=tag
        )


def _assert_transformer_hooks_fired(workdir, with_metrics=True):
    for step in range(EVERY, TRANSFORMER_STEPS + 1, EVERY):
        assert (workdir / "samples" / f"step_{step:08d}.png").is_file(), step
    eval_loss = read_scalars(workdir, "eval_loss")
    assert sorted(eval_loss) == list(range(EVERY, TRANSFORMER_STEPS + 1, EVERY))
    if with_metrics:
        fid = read_scalars(workdir, "fid")
        assert sorted(fid) == [METRICS_EVERY] and np.isfinite(fid[METRICS_EVERY])
        for tag in ("inception_score", "precision", "recall"):
            assert np.isfinite(read_scalars(workdir, tag)[METRICS_EVERY]), tag
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == TRANSFORMER_STEPS


def _assert_export_samples_the_written_grid(workdir):
    """The 2-process export, loaded here (1 process), samples the grid they wrote last.

    The pipeline runs on as many devices as each of those processes had: the tokens do not
    depend on the device count, but the VQ decoder's pixels can differ in float rounding
    (one uint8 level) when each device decodes a different number of rows.
    """
    pipe = MaskGITPipeline.from_pretrained(
        workdir / "pretrained", devices=jax.devices()[:LOCAL_DEVICES]
    )
    grid = train_transformer.sample_grid(pipe, TRANSFORMER_STEPS)
    written = np.asarray(
        Image.open(workdir / "samples" / f"step_{TRANSFORMER_STEPS:08d}.png").convert("RGB")
    )
    assert written.shape == grid.shape
    np.testing.assert_array_equal(written, images_io.to_uint8(grid))


def test_stage_both_two_processes_sigterm_in_the_tokenizer_half(
    tmp_path, data_dir, inception_path, reference
):
    write_config_file(tmp_path / "tiny.py", data_dir, _overrides(inception_path))
    workdir = tmp_path / "run"
    cue = workdir / "tokenizer" / "samples" / f"reconstructions_{EVERY:08d}.png"
    outputs = _launch(tmp_path, "tiny.py", "run", "slurm", "first", sigterm_when=cue.exists)
    assert "preempted at step" in outputs[0] and "tokenizer stage stopped at step" in outputs[0]
    assert not (workdir / "transformer").exists()
    stopped = max(read_scalars(workdir / "tokenizer", "loss"))
    assert EVERY <= stopped < TOKENIZER_STEPS

    outputs = _launch(tmp_path, "tiny.py", "run", "coordinator", "second")
    assert f"tokenizer: resumed from step {stopped}." in outputs[0]
    _assert_same_losses(workdir / "tokenizer", reference / "tokenizer", TOKENIZER_STEPS)
    _assert_same_losses(workdir / "transformer", reference / "transformer", TRANSFORMER_STEPS)
    psnr = read_scalars(workdir / "tokenizer", "eval_psnr")
    assert sorted(psnr) == list(range(EVERY, TOKENIZER_STEPS + 1, EVERY))
    # Held-out metrics cover both processes' examples: they equal the one-process run's.
    want = read_scalars(reference / "tokenizer", "eval_psnr")
    np.testing.assert_allclose([psnr[s] for s in sorted(want)], [want[s] for s in sorted(want)])
    assert sorted(read_scalars(workdir / "tokenizer", "eval_rfid")) == [METRICS_EVERY]
    _assert_transformer_hooks_fired(workdir / "transformer")
    _assert_export_samples_the_written_grid(workdir / "transformer")


def test_transformer_stage_two_processes_sigterm_and_resume(tmp_path, data_dir, reference):
    # The tokenizer the reference trained; FID is covered above (it does not change losses).
    overrides = _overrides(
        "",
        stage="transformer",
        **{"training.tokenizer_checkpoint": str(reference / "tokenizer")},
    )
    write_config_file(tmp_path / "tiny.py", data_dir, overrides)
    workdir = tmp_path / "run"
    cue = workdir / "samples" / f"step_{EVERY:08d}.png"
    outputs = _launch(tmp_path, "tiny.py", "run", "coordinator", "first", sigterm_when=cue.exists)
    assert "transformer: preempted at step" in outputs[0]
    stopped = max(read_scalars(workdir, "loss"))
    assert EVERY <= stopped < TRANSFORMER_STEPS
    assert not (workdir / "pretrained").exists()

    outputs = _launch(tmp_path, "tiny.py", "run", "slurm", "second")
    assert f"transformer: resumed from step {stopped}." in outputs[0]
    _assert_same_losses(workdir, reference / "transformer", TRANSFORMER_STEPS)
    _assert_transformer_hooks_fired(workdir, with_metrics=False)
    _assert_export_samples_the_written_grid(workdir)
