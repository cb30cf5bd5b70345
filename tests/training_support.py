"""Shared by test_training and test_multiprocess: a tiny config, fixtures and a step driver.

PYTEST_DONT_REWRITE (imported by the test modules before pytest loads it as a plugin).

The fixtures are session-scoped and loaded as a plugin (`pytest_plugins`) by both test files,
so the tiny tokenizer and the reference transformer run are trained once per session.
`write_config_file` writes a config file of `tiny_config` for `python -m maskgit_jax.main`.
"""

import glob
import os

import pytest

# Steps of the reference transformer run (run_a).
NUM_STEPS = 8
# Leading steps compared across device counts and process counts.
NUM_COMPARED_STEPS = 3


def tiny_config(data_dir: str, **overrides):
    """configs/digits.py shrunk to seconds on 2 CPU cores (image 16, 2-layer transformer).

    `overrides` are dotted field names, e.g. `**{"training.batch_size": 12}`.
    """
    from tests.helpers import load_config_file

    c = load_config_file("configs/digits.py")
    c.stage = "transformer"
    c.image_size = 16
    c.dataset.data_dir = str(data_dir)
    c.dataset.shuffle_buffer = 256
    c.dataset.global_order = True
    c.tokenizer.filters = 16
    c.tokenizer.channel_multipliers = (1, 2, 2)
    c.tokenizer.embedding_dim = 16
    c.tokenizer.norm_groups = 8
    c.tokenizer.codebook_size = 32
    c.tokenizer_training.batch_size = 16
    c.tokenizer_training.num_train_steps = 8
    c.tokenizer_training.warmup_steps = 0
    c.tokenizer_training.learning_rate = 3e-3
    c.transformer.hidden_size = 32
    c.transformer.num_layers = 2
    c.transformer.num_heads = 2
    c.transformer.mlp_dim = 64
    c.training.batch_size = 16
    c.training.num_train_steps = 4
    c.training.warmup_steps = 2
    c.training.learning_rate = 3e-3
    c.checkpoint.every_steps = 2
    c.checkpoint.max_to_keep = 10
    c.logging.log_every_steps = 1
    c.logging.eval_every_steps = 2
    c.logging.eval_batches = 1
    c.logging.sample_every_steps = 4
    c.logging.samples_per_class = 1
    c.sampling.num_steps = 2
    c.mesh.shape = (-1, 1, 1)
    # The vocabulary (32 codes + 10 classes + mask = 43 rows) is odd, so the default rule
    # ("vocab", "tensor") cannot split it on a mesh with tensor > 1 (see test_training's
    # xfail test); replicate the vocabulary axis instead.
    c.mesh.logical_axis_rules = tuple(
        (name, None if name == "vocab" else axes) for name, axes in c.mesh.logical_axis_rules
    )
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def reference_overrides(tokenizer_checkpoint: str, **overrides) -> dict:
    """Overrides of the reference transformer run: NUM_STEPS steps on a (2,2,2) mesh."""
    return {
        "training.tokenizer_checkpoint": str(tokenizer_checkpoint),
        "training.num_train_steps": NUM_STEPS,
        "mesh.shape": (2, 2, 2),
        "logging.sample_every_steps": NUM_STEPS,
        "logging.eval_every_steps": NUM_STEPS,
        **overrides,
    }


def write_config_file(path, data_dir, overrides: dict) -> str:
    """Writes a config file whose get_config() is `tiny_config(data_dir, **overrides)`."""
    path.write_text(
        "from tests.training_support import tiny_config\n\n\n"
        "def get_config():\n"
        f"    return tiny_config({str(data_dir)!r}, **{overrides!r})\n"
    )
    return str(path)


def read_scalars(workdir, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag from every TensorBoard events file in `workdir`."""
    import tensorflow as tf

    values = {}
    for path in sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag != tag:
                    continue
                if value.HasField("tensor"):
                    number = float(tf.make_ndarray(value.tensor))
                else:
                    number = float(value.simple_value)
                values[int(event.step)] = number
    return values


def first_batches(config, num_batches: int):
    """This process's first train batches of the config's input pipeline (from step 0)."""
    from maskgit_jax.data import input_pipeline

    train_iter, _, _ = input_pipeline.create_datasets(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.training.batch_size,
        seed=config.seed,
    )
    return [next(train_iter) for _ in range(num_batches)]


def train_steps(config, tokenizer_variables, batches, devices=None):
    """Runs one transformer step per batch with the train_loop pieces: (losses, setup, state).

    The mesh is built from `config.mesh` over `devices` (default: all global devices);
    `batches` are this process's local numpy batches. Losses are read from this process's
    copy of the replicated metric.
    """
    import numpy as np

    from maskgit_jax import sharding
    from maskgit_jax.data import input_pipeline
    from maskgit_jax.training import loop as train_loop
    from maskgit_jax.training import transformer as train_transformer

    stage = train_transformer.build_stage(config, tokenizer_variables).stage
    mesh = sharding.create_mesh(config.mesh, devices)
    setup = train_loop.create_sharded_setup(config, stage, mesh=mesh)
    state = train_loop.init_state(setup, stage, config.seed)
    step_fn = train_loop.jit_train_step(setup, stage)
    constants = train_loop.place_on_mesh(tokenizer_variables, setup.constants_shardings)
    losses = []
    with setup.activate():
        for local_batch in batches:
            batch = input_pipeline.make_global_batch(local_batch, setup.mesh)
            state, metrics = step_fn(state, batch, constants)
            losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    return losses, setup, state


# ---------------------------------------------------------------------------------------------
# Session fixtures (loaded by the test files through `pytest_plugins`).


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with the bundled digits prepared once (offline, from scikit-learn)."""
    import tensorflow_datasets as tfds

    import maskgit_jax.data.datasets  # noqa: F401  Registers the digits builder.

    directory = tmp_path_factory.mktemp("tfds")
    tfds.builder("digits", data_dir=str(directory)).download_and_prepare()
    return str(directory)


@pytest.fixture(scope="session")
def tokenizer_workdir(tmp_path_factory, data_dir):
    """A tokenizer-stage workdir after a few steps of `train_tokenizer.train_and_evaluate`."""
    from maskgit_jax.training import tokenizer as train_tokenizer

    workdir = tmp_path_factory.mktemp("tokenizer")
    config = tiny_config(data_dir, stage="tokenizer", **{"logging.eval_every_steps": 8})
    train_tokenizer.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="session")
def run_a(tmp_path_factory, data_dir, tokenizer_workdir):
    """The reference transformer run, uninterrupted: (config, workdir, final state)."""
    from maskgit_jax.training import transformer as train_transformer

    workdir = tmp_path_factory.mktemp("run_a")
    config = tiny_config(data_dir, **reference_overrides(tokenizer_workdir))
    state = train_transformer.train_and_evaluate(config, str(workdir))
    return config, workdir, state


@pytest.fixture(scope="session")
def one_device_losses(run_a):
    """The reference run's first NUM_COMPARED_STEPS losses, recomputed on one device."""
    import jax

    from maskgit_jax.training import transformer as train_transformer

    config = run_a[0].copy_and_resolve_references()
    config.mesh.shape = (1, 1, 1)
    tokenizer = train_transformer._load_tokenizer(config)
    batches = first_batches(config, NUM_COMPARED_STEPS)
    losses, setup, _ = train_steps(config, tokenizer, batches, devices=jax.devices()[:1])
    assert setup.mesh.devices.size == 1
    return losses
