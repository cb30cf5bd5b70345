"""`python -m maskgit_jax.evaluate` as a user runs it: input checks first, then the metrics.

A tiny pretrained directory (8x8 images, 4 classes, random weights) and the synthetic
full-architecture Inception graph (`tests/inception_graph.py`). Every bad input is asked for
with --num_samples=100000: sampling even a fraction of that through Inception on the CPU
takes far longer than the subprocess may run, so a check that came after sampling started
shows up as a timeout; the "Sampling N images" log line must be absent too.
"""

import functools
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from maskgit_jax.checkpoints import pretrained
from maskgit_jax.evaluation import inception, metrics, samples
from maskgit_jax.sampling.pipeline import MaskGITPipeline
from tests.conftest import REPO_ROOT
from tests.inception_graph import write_graph
from tests.test_official_checkpoint import tiny_config

# Seconds a run that fails its checks may take (start-up, reading the checkpoint).
FAIL_FAST_S = 120
# Samples asked for in the failing runs: far more than FAIL_FAST_S allows to sample.
MANY = 100_000


@pytest.fixture(scope="module")
def pipe():
    return MaskGITPipeline.with_random_weights(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipe):
    """The pretrained directory, the Inception graph and reference files, by name."""
    pytest.importorskip("tensorflow")
    root = tmp_path_factory.mktemp("evaluate")
    to_host = functools.partial(jax.tree.map, np.asarray)
    pretrained.save_pretrained(
        root / "pretrained",
        pipe.config,
        to_host(pipe.tokenizer_variables),
        to_host(pipe.transformer_variables),
    )
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, inception.FEATURE_DIM))
    mu, sigma = metrics.compute_statistics(features)
    np.savez(root / "reference.npz", mu=mu, sigma=sigma)
    np.savez(root / "no_sigma.npz", mu=mu)
    np.savez(root / "dim64.npz", mu=mu[:64], sigma=sigma[:64, :64])
    # An ADM reference batch: its images give the features of precision/recall.
    images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "adm.npz", images, mu=mu, sigma=sigma, mu_s=mu[:8], sigma_s=np.eye(8))
    return {
        "checkpoint": root / "pretrained",
        "inception": write_graph(root),
        "root": root,
        "adm_images": images,
    }


def _evaluate(*flags: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "maskgit_jax.evaluate", "--logtostderr", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"inception": "missing.pb"}, r"Inception weights not found at .*missing\.pb"),
        ({"reference": "missing.npz"}, r"reference statistics .*missing\.npz not found"),
        ({"reference": "no_sigma.npz"}, r"no_sigma\.npz has no 'sigma' array"),
        ({"reference": "dim64.npz"}, r"64-d features .* pool_3 features are 2048-d"),
        ({"num_steps": "0"}, r"num_steps must be an integer >= 1; got 0"),
        ({"schedule": "bogus"}, r"Unknown mask schedule 'bogus'"),
        ({"top_k": "0"}, r"top_k must be an integer >= 1"),
        ({"guidance_scale": "1.5"}, r"guidance_scale=1.5 needs a model trained with label"),
        ({"dtype": "float16"}, r"--dtype.*value should be one of"),
        ({"batch_size": "12"}, r"--batch_size=12 must be a positive multiple of the 8 local"),
        ({"acceptance_rate": "0.5"}, r"needs --inception_label_map"),
        ({"num_samples": "1"}, r"--num_samples=1: FID needs at least 2 samples"),
    ],
)
def test_bad_inputs_fail_before_sampling(files, flags, message):
    given = {
        "checkpoint": str(files["checkpoint"]),
        "inception": files["inception"],
        "reference": "reference.npz",
        "num_samples": str(MANY),
        "batch_size": "8",
        **flags,
    }
    for name in ("inception", "reference"):
        given[name] = str(files["root"] / given[name])
    done = _evaluate(*(f"--{k}={v}" for k, v in given.items()), timeout=FAIL_FAST_S)
    assert done.returncode != 0, done.stdout[-2000:]
    assert re.search(message, done.stderr), done.stderr[-3000:]
    assert f"Sampling {MANY} images" not in done.stderr and "fid:" not in done.stdout


# The full runs: 12 samples, these decoding options, seed 4, an ADM reference batch.
OPTIONS = {"num_steps": 3, "ordering": "halton", "top_k": 5, "temperature": 0.7}
RUN_FLAGS = ("--num_samples=12", "--is_splits=2", "--seed=4") + tuple(
    f"--{name}={value}" for name, value in OPTIONS.items()
)


@pytest.fixture(scope="module")
def expected(files, pipe):
    """Inception outputs of one generate() call for the 12 labels, and the run's metrics."""
    images = pipe.generate(
        samples.all_labels(12, 4), jax.random.PRNGKey(4), pipe.options(**OPTIONS)
    )
    network = inception.make_apply_fn(
        inception.load_inception_params(files["inception"]), pipe.mesh
    )
    outputs = [network(images[:8]), network(images[8:])]  # 8 rows at a time, as one process
    outputs = {key: np.concatenate([o[key] for o in outputs]) for key in ("pool_3", "logits")}
    adm = metrics.load_statistics(files["root"] / "adm.npz")
    features = network(files["adm_images"].astype(np.float32) / 255.0)["pool_3"]
    reference = {"mu": adm["mu"], "sigma": adm["sigma"], "features": features}
    return outputs, metrics.report(outputs, reference, splits=2, k=3)


METRICS = ("fid", "inception_score", "inception_score_std", "precision", "recall")


def _printed(stdout: str) -> dict[str, str]:
    """The metric lines a run printed ("name: value"), among other output (Gloo's)."""
    lines = [line.split(": ", 1) for line in stdout.splitlines()]
    return {line[0]: line[1] for line in lines if line[0] in METRICS}


def _check_run(done, output, expected, num_processes):
    assert done.returncode == 0, done.stderr[-3000:]
    share = 12 // num_processes
    assert f"Sampling 12 images ({share} on this process)" in done.stderr  # checked above
    printed = _printed(done.stdout)
    outputs, metrics_wanted = expected
    assert set(printed) == set(metrics_wanted) == set(METRICS)
    for key, value in metrics_wanted.items():
        assert float(printed[key]) == pytest.approx(value, rel=1e-3, abs=1e-3), key
    want = outputs["pool_3"]
    got = metrics.load_statistics(output)["features"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_metrics_of_the_options_asked_for(files, expected):
    """FID/IS against an ADM batch, P/R from its images, samples of the flags' options."""
    output = files["root"] / "one_process.npz"
    done = _evaluate(
        f"--checkpoint={files['checkpoint']}",
        f"--inception={files['inception']}",
        f"--reference={files['root'] / 'adm.npz'}",
        "--batch_size=8",
        f"--output={output}",
        *RUN_FLAGS,
        timeout=600,
    )
    _check_run(done, output, expected, num_processes=1)


def test_two_processes_sample_the_same_images(files, expected):
    """Two processes of 4 devices, batches of 4: the images of the one-process run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    output = files["root"] / "two_processes.npz"
    command = [
        sys.executable,
        "-m",
        "maskgit_jax.evaluate",
        "--logtostderr",
        f"--checkpoint={files['checkpoint']}",
        f"--inception={files['inception']}",
        f"--reference={files['root'] / 'adm.npz'}",
        "--batch_size=4",
        f"--output={output}",
        *RUN_FLAGS,
    ]
    base = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    base["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    for name in [n for n in base if n.startswith(("SLURM_", "JAX_", "OMPI_", "TPU_"))]:
        if name != "JAX_PLATFORMS":
            del base[name]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={
                **base,
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        runs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, stderr) in zip(procs, runs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    assert not _printed(runs[1][0])  # only process 0 reports
    done = subprocess.CompletedProcess(command, procs[0].returncode, *runs[0])
    _check_run(done, output, expected, num_processes=2)
