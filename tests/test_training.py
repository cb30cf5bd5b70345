"""End-to-end tests of both training stages, the shared loop's guards, masking and resuming.

Everything runs a tiny version of configs/digits.py (16x16 images, a 16-filter tokenizer with
32 codes, a 2-layer transformer of width 32) on the 8 fake CPU devices conftest sets up. One
tokenizer is trained per session and one uninterrupted transformer run per module; the other
tests reuse them.
"""

import glob
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from maskgit_jax import config_lib, host_memory, main, sharding
from maskgit_jax.checkpoints import manager as checkpoints
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.models import attention
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import masking
from maskgit_jax.training import tokenizer as train_tokenizer
from maskgit_jax.training import transformer as train_transformer
from tests.conftest import REPO_ROOT
from tests.training_support import (
    NUM_COMPARED_STEPS,
    NUM_STEPS,
    read_scalars,
    reference_overrides,
    tiny_config,
    write_config_file,
)

pytest_plugins = ["tests.training_support"]

# Seconds any one training subprocess may take before the test kills it.
SUBPROCESS_TIMEOUT = 240


# ---------------------------------------------------------------------------------------------
# Helpers (the fixtures data_dir, tokenizer_workdir, run_a, one_device_losses are in
# tests/training_support.py).


def checkpoint_steps(workdir) -> list[int]:
    """Completed checkpoint steps (plain integer directory names) of a loop workdir."""
    directory = os.path.join(str(workdir), "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def transformer_config(data_dir, tokenizer_workdir, **overrides):
    """The reference run's config (tiny transformer on the session's tokenizer, (2,2,2))."""
    return tiny_config(data_dir, **reference_overrides(tokenizer_workdir, **overrides))


# ---------------------------------------------------------------------------------------------
# Tokenizer stage.


def test_tokenizer_stage_exports_a_loadable_tokenizer(tokenizer_workdir, data_dir):
    exported = tokenizer_workdir / "pretrained"
    assert (exported / "config.json").is_file()
    assert (exported / "tokenizer").is_dir()
    assert not (exported / "transformer").exists()
    config = tiny_config(data_dir, stage="tokenizer")
    assert checkpoint_steps(tokenizer_workdir)[-1] == config.tokenizer_training.num_train_steps
    losses = read_scalars(tokenizer_workdir, "reconstruction_loss")
    num_steps = config.tokenizer_training.num_train_steps
    assert sorted(losses) == list(range(1, num_steps + 1))
    assert all(np.isfinite(v) for v in losses.values())
    # Training works: the reconstruction error falls clearly within a few steps (each step on
    # a new batch; about 0.46 -> 0.11 over 8 steps).
    first = np.mean([losses[s] for s in (1, 2)])
    last = np.mean([losses[s] for s in (num_steps - 1, num_steps)])
    assert last < 0.6 * first, losses
    loaded = pretrained.load_pretrained(exported, parts=("tokenizer",))
    assert loaded.transformer_variables is None
    assert loaded.config.tokenizer.codebook_size == 32
    # The eval hook wrote a reconstruction grid at the eval interval.
    assert glob.glob(str(tokenizer_workdir / "samples" / "reconstructions_*.png"))


# ---------------------------------------------------------------------------------------------
# Masking and the masked-token loss.


def test_random_token_mask_follows_the_cosine_schedule():
    batch, num_tokens = 8192, 64
    mask = np.asarray(masking.random_token_mask(jax.random.PRNGKey(3), (batch, num_tokens)))
    assert mask.shape == (batch, num_tokens) and mask.dtype == bool
    counts = mask.sum(axis=1)
    assert counts.min() >= 1
    assert counts.max() <= num_tokens
    # E[gamma(U)] = E[cos(pi U / 2)] = 2 / pi; the ceil adds at most 1 / N.
    fraction = counts / num_tokens
    assert abs(fraction.mean() - 2 / math.pi) < 0.01 + 1 / num_tokens
    # The whole distribution: P(count <= c) = P(cos(pi U / 2) <= c / N)
    # = 1 - 2 arccos(c / N) / pi for count = ceil(N cos(pi U / 2)).
    c = np.arange(num_tokens + 1)
    expected_cdf = 1 - 2 * np.arccos(c / num_tokens) / math.pi
    empirical_cdf = np.array([(counts <= k).mean() for k in c])
    assert np.max(np.abs(empirical_cdf - expected_cdf)) < 0.03
    # Positions are chosen uniformly: each column is masked about equally often.
    per_position = mask.mean(axis=0)
    assert np.max(np.abs(per_position - fraction.mean())) < 0.03


def test_random_token_mask_masks_at_least_one_token(monkeypatch):
    # A schedule that says "mask nothing" still masks exactly one token per row.
    monkeypatch.setattr(
        masking.mask_schedule, "schedule", lambda ratio, n, method: jnp.zeros_like(ratio)
    )
    mask = np.asarray(masking.random_token_mask(jax.random.PRNGKey(0), (64, 16)))
    np.testing.assert_array_equal(mask.sum(axis=1), np.ones(64))


def test_random_token_mask_differs_between_rows_and_keys():
    a = np.asarray(masking.random_token_mask(jax.random.PRNGKey(0), (32, 16)))
    b = np.asarray(masking.random_token_mask(jax.random.PRNGKey(1), (32, 16)))
    assert not np.array_equal(a, b)
    assert len({row.tobytes() for row in a}) > 16


def test_masked_token_loss_counts_only_masked_positions():
    rng = np.random.default_rng(0)
    batch, num_tokens, vocab = 4, 16, 32
    targets = rng.integers(0, vocab, (batch, num_tokens))
    mask = rng.random((batch, num_tokens)) < 0.5
    mask[:, 0] = True
    wrong = (targets + 1) % vocab
    # Confident and right where masked, confident and wrong everywhere else.
    predicted = np.where(mask, targets, wrong)
    logits = 20.0 * jax.nn.one_hot(predicted, vocab)
    loss_sum, correct, count = train_transformer.masked_token_loss(
        logits, jnp.asarray(targets), jnp.asarray(mask), label_smoothing=0.0
    )
    assert float(count) == mask.sum()
    assert float(correct) == mask.sum()
    assert float(loss_sum / count) < 1e-6
    # The opposite: right where unmasked, wrong where masked -> large loss, no accuracy.
    logits = 20.0 * jax.nn.one_hot(np.where(mask, wrong, targets), vocab)
    loss_sum, correct, count = train_transformer.masked_token_loss(
        logits, jnp.asarray(targets), jnp.asarray(mask), label_smoothing=0.0
    )
    assert float(correct) == 0.0
    assert float(loss_sum / count) == pytest.approx(20.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Transformer stage: one run on the (2,2,2) mesh.


def test_transformer_stage_trains_checkpoints_samples_and_exports(run_a):
    config, workdir, state = run_a
    losses = read_scalars(workdir, "loss")
    accuracy = read_scalars(workdir, "masked_accuracy")
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    assert all(np.isfinite(v) and 0 < v < 10 for v in losses.values())
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    fraction = read_scalars(workdir, "masked_fraction")
    assert all(1 / 16 <= v <= 1.0 for v in fraction.values())
    eval_loss = read_scalars(workdir, "eval_loss")
    assert list(eval_loss) == [NUM_STEPS] and np.isfinite(eval_loss[NUM_STEPS])
    assert int(state.step) == NUM_STEPS
    # Checkpoints every 2 steps (Orbax also saves a fresh run's first step); max_to_keep is
    # 10, so all are kept.
    assert checkpoint_steps(workdir) == [1, 2, 4, 6, 8]
    # The sample grid: one row per digit class, one sample each.
    png = workdir / "samples" / f"step_{NUM_STEPS:08d}.png"
    with Image.open(png) as image:
        width, height = image.size
    assert height >= 10 * 16 and width >= 16
    # The export holds both models and reloads; the transformer is the EMA of the run.
    loaded = pretrained.load_pretrained(workdir / "pretrained")
    assert loaded.config.transformer.num_layers == 2
    assert loaded.tokenizer_variables is not None
    exported = jax.tree.leaves(loaded.transformer_variables["params"])
    expected = jax.tree.leaves(jax.device_get(state.ema_params))
    assert len(exported) == len(expected)
    for got, want in zip(exported, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # The exported tokenizer is the tokenizer stage's.
    tok = pretrained.load_pretrained(
        config.training.tokenizer_checkpoint + "/pretrained", parts=("tokenizer",)
    )
    for got, want in zip(
        jax.tree.leaves(loaded.tokenizer_variables),
        jax.tree.leaves(tok.tokenizer_variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Params on the mesh really are split: some kernel is not replicated.
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))


def test_same_losses_on_one_and_eight_devices(run_a, one_device_losses):
    # run_a trained on a (2,2,2) data x fsdp x tensor mesh of all 8 devices; the fixture
    # recomputed its first steps from the same batches with a mesh of jax.devices()[:1].
    config, workdir, state = run_a
    assert dict(sharding.create_mesh(config.mesh).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    eight = read_scalars(workdir, "loss")
    eight = [eight[step] for step in range(1, NUM_COMPARED_STEPS + 1)]
    assert all(np.isfinite(one_device_losses))
    # Different steps see different data and parameters: the losses are not all equal.
    assert len(set(one_device_losses)) == NUM_COMPARED_STEPS
    np.testing.assert_allclose(eight, one_device_losses, rtol=1e-4)
    # The 8-device state is sharded over fsdp and tensor, not replicated.
    kernel = state.params["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert kernel.shape == (32, 64)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(16, 32)}
    embedding = state.params["Embed_0"]["word_embeddings"]["embedding"]
    assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_default_rules_shard_an_odd_vocabulary_on_a_tensor_mesh(data_dir):
    config = tiny_config(data_dir, **{"mesh.shape": (1, 1, 8)})
    config.mesh.logical_axis_rules = sharding.default_mesh_config().logical_axis_rules
    assert config_lib.vocab_size(config) % 2 == 1
    stage = train_transformer.build_stage(config).stage
    setup = train_loop.create_sharded_setup(config, stage)
    state = train_loop.init_state(setup, stage, 0)
    table = state.params["Embed_0"]["word_embeddings"]["embedding"]
    assert np.isfinite(np.asarray(table)).all()
    # The odd vocabulary dimension is replicated; the even MLP dimension is split 8 ways.
    assert table.sharding.spec[0] is None
    mlp = state.params["TransformerLayer_0"]["Mlp_0"]["intermediate_output"]["kernel"]
    assert mlp.sharding.spec[1] == "tensor"


# ---------------------------------------------------------------------------------------------
# Kill (SIGTERM) and resume through `python -m maskgit_jax.main`.


def _main_command(config_file, workdir):
    return [
        sys.executable,
        "-m",
        "maskgit_jax.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
    ]


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return env


def _expected_host_malloc(env) -> str:
    """What `main` logs about its allocator: restarted with the huge-page tunable where it helps."""
    environment, why = host_memory.huge_page_environment(
        env, host_memory.transparent_huge_page_mode(), host_memory.glibc_version()
    )
    if environment is None:
        return why
    # The restarted process decides again, on the environment it was given.
    return host_memory.huge_page_environment(environment, None, None)[1]


def test_sigterm_then_resume_matches_an_uninterrupted_run(run_a, tmp_path, data_dir, caplog):
    config_a, workdir_a, state_a = run_a
    # The same run; eval and samples (which do not change training) differ: the interrupted
    # run writes a sample grid at step 2, the cue to send SIGTERM; the rerun has neither.
    overrides_b1 = reference_overrides(
        config_a.training.tokenizer_checkpoint,
        **{"logging.eval_every_steps": 0, "logging.sample_every_steps": 2},
    )
    config_b = tiny_config(data_dir, **{**overrides_b1, "logging.sample_every_steps": 0})
    for section in ("training", "transformer", "tokenizer", "dataset", "mesh", "checkpoint"):
        assert config_b[section].to_json() == config_a[section].to_json()
    config_file = write_config_file(tmp_path / "tiny_config.py", data_dir, overrides_b1)
    workdir = tmp_path / "run_b"
    command = _main_command(config_file, workdir)
    log = open(tmp_path / "run_b1.log", "w")
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # The step-2 sample grid is written after step 2's preemption check, so the SIGTERM
        # is seen at step 3 or a little later: mid-run, and (at 3) off the save interval.
        cue = workdir / "samples" / "step_00000002.png"
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and not cue.exists():
            time.sleep(0.005)
        assert proc.poll() is None, (tmp_path / "run_b1.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "run_b1.log").read_text()
    assert returncode == 0, output[-3000:]
    assert "preempted at step" in output
    assert f"Host malloc: {_expected_host_malloc(_subprocess_env())}." in output
    logged = read_scalars(workdir, "loss")
    stop_step = max(logged)
    assert 3 <= stop_step < NUM_STEPS, "the run finished before the SIGTERM took effect"
    assert sorted(logged) == list(range(1, stop_step + 1))
    # A checkpoint at the very step it stopped, and no export of an unfinished run.
    assert checkpoint_steps(workdir)[-1] == stop_step
    assert not (workdir / "pretrained").exists()

    # Rerun to completion (in this process, which saves a second interpreter start-up).
    with caplog.at_level(logging.INFO):
        state_b = train_transformer.train_and_evaluate(config_b, str(workdir))
    assert f"transformer: resumed from step {stop_step}." in caplog.messages
    losses_b = read_scalars(workdir, "loss")
    losses_a = read_scalars(workdir_a, "loss")
    assert sorted(losses_b) == list(range(1, NUM_STEPS + 1))
    steps = sorted(losses_a)
    np.testing.assert_allclose(
        [losses_b[s] for s in steps], [losses_a[s] for s in steps], rtol=1e-5, atol=1e-6
    )
    accuracy_a = read_scalars(workdir_a, "masked_accuracy")
    accuracy_b = read_scalars(workdir, "masked_accuracy")
    np.testing.assert_allclose(
        [accuracy_b[s] for s in steps], [accuracy_a[s] for s in steps], atol=1e-6
    )
    assert (workdir / "pretrained" / "transformer").is_dir()
    assert checkpoint_steps(workdir)[-1] == NUM_STEPS
    # The resumed run ends with the uninterrupted run's parameters.
    assert int(state_b.step) == NUM_STEPS
    leaves_a = jax.tree.leaves(jax.device_get(state_a))
    leaves_b = jax.tree.leaves(jax.device_get(state_b))
    for got, want in zip(leaves_b, leaves_a, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The loop's guards on a toy stage (a linear least-squares model; no image pipeline).


def toy_stage(
    num_train_steps,
    nan_from_step=None,
    on_eval=None,
    learning_rate=0.1,
    nan_params_from_step=None,
    device_work=0,
):
    """A stage whose state {w, step} turns NaN (loss and params) from step `nan_from_step`.

    `nan_params_from_step` makes only the parameters NaN (the loss, computed before the
    update, stays finite); `device_work` > 0 makes each step that many matmuls slower.
    """

    def init_state(rng):
        return {"w": jax.random.normal(rng, (8, 4)), "step": jnp.zeros((), jnp.int32)}

    def train_step(state, batch, constants):
        del constants

        def loss_fn(w):
            return jnp.mean((batch["x"] @ w) ** 2)

        loss, grad = jax.value_and_grad(loss_fn)(state["w"])
        w = state["w"] - learning_rate * grad
        if device_work:
            # Device time without changing the result: `device_work` dependent matmuls.
            x = jax.lax.fori_loop(
                0, device_work, lambda i, x: jnp.tanh(x @ x), jnp.full((384, 384), 1e-3)
            )
            w = w + 0.0 * jnp.sum(x)
        if nan_params_from_step is not None:
            w = jnp.where(state["step"] + 1 >= nan_params_from_step, jnp.nan, w)
        if nan_from_step is not None:
            bad = state["step"] + 1 >= nan_from_step
            w = jnp.where(bad, jnp.nan, w)
            loss = jnp.where(bad, jnp.nan, loss)
        return {"w": w, "step": state["step"] + 1}, {"loss": loss}

    def batches(start_step):
        # Batch k depends on k only, so a resumed run sees the batches it would have seen.
        for step in itertools.count(start_step):
            rng = np.random.default_rng(step)
            yield {"x": rng.normal(size=(16, 8)).astype(np.float32)}

    training = ml_collections.ConfigDict({"batch_size": 16, "num_train_steps": num_train_steps})
    return train_loop.Stage(
        name="toy",
        training=training,
        init_state=init_state,
        train_step=train_step,
        on_eval=on_eval,
        batches=batches,
    )


def toy_config(data_dir, log_every, save_every):
    return tiny_config(
        data_dir,
        **{
            "logging.log_every_steps": log_every,
            "logging.eval_every_steps": 1,
            "checkpoint.every_steps": save_every,
        },
    )


def _restore(workdir, config, stage):
    setup = train_loop.create_sharded_setup(config, stage)
    manager = checkpoints.create_checkpoint_manager(
        workdir / "checkpoints", save_every_steps=1, max_to_keep=None
    )
    target = sharding.with_shardings(setup.abstract_state, setup.state_shardings)
    return checkpoints.restore_latest(manager, target)


@pytest.mark.parametrize(
    ("log_every", "save_every", "raised_at", "last_good"),
    [(1, 1, 5, 4), (100, 3, 6, 3)],
    ids=["checked-when-logged", "checked-before-saving"],
)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, data_dir, log_every, save_every, raised_at, last_good
):
    config = toy_config(data_dir, log_every, save_every)
    stage = toy_stage(num_train_steps=20, nan_from_step=5)
    with pytest.raises(train_loop.NonFiniteLossError) as error:
        train_loop.run(config, str(tmp_path), stage)
    message = str(error.value)
    assert "toy training loss is nan" in message
    assert f"at or before step {raised_at}" in message
    assert f"The last good checkpoint is step {last_good} in {tmp_path}" in message
    assert checkpoint_steps(tmp_path)[-1] == last_good
    state, meta, step = _restore(tmp_path, config, stage)
    assert step == last_good == meta["step"]
    assert int(state["step"]) == last_good
    assert np.isfinite(np.asarray(state["w"])).all()


def test_exploded_parameters_are_never_saved(tmp_path, data_dir):
    # A learning rate of 1e9: the loss of step 1 is finite, but the parameters it produced
    # are huge (finite), and they must not be saved as "last good" at step 2.
    config = toy_config(data_dir, log_every=100, save_every=2)
    stage = toy_stage(num_train_steps=10, learning_rate=1e9)
    with pytest.raises(train_loop.BadStateError) as error:
        train_loop.run(config, str(tmp_path), stage)
    message = str(error.value)
    assert "toy at step 1:" in message and "checkpoint.max_abs_param" in message
    assert "No checkpoint of this run was saved" in message
    assert checkpoint_steps(tmp_path) == []


def test_non_finite_parameters_with_a_finite_loss_are_never_saved(tmp_path, data_dir):
    config = toy_config(data_dir, log_every=100, save_every=2)
    stage = toy_stage(num_train_steps=10, nan_params_from_step=6)
    with pytest.raises(train_loop.BadStateError) as error:
        train_loop.run(config, str(tmp_path), stage)
    message = str(error.value)
    assert "toy at step 6:" in message and "non-finite" in message
    assert "The last good checkpoint is step 4" in message
    assert checkpoint_steps(tmp_path) == [1, 2, 4]
    state, _, step = _restore(tmp_path, config, stage)
    assert step == 4 and np.isfinite(np.asarray(state["w"])).all()


def test_preemption_saves_within_about_two_step_times(tmp_path, data_dir):
    # The host must not queue steps far ahead of the device, or a preemption save waits
    # behind them (and steps/s, ETA are wrong). The eval hook runs once per step on the host;
    # SIGTERM is sent in step 20's. Measured: from the signal to a complete checkpoint on
    # disk, i.e. `run` returning.
    hooks = {}

    def send_sigterm(state, step, writer):
        hooks[step] = time.monotonic()
        if step == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    config = toy_config(data_dir, log_every=1000, save_every=1000)
    stage = toy_stage(num_train_steps=60, on_eval=send_sigterm, device_work=40)
    state = train_loop.run(config, str(tmp_path), stage)
    latency = time.monotonic() - hooks[20]
    stopped = int(state["step"])
    assert stopped == 21 and checkpoint_steps(tmp_path)[-1] == 21
    # The host's pace is the device's: one step per hook interval.
    step_time = float(np.median(np.diff([hooks[s] for s in range(5, 21)])))
    assert step_time > 0.05, f"the steps did not take device time ({step_time:.3f} s)"
    # About two step times (the step in flight, the last one), plus the save itself.
    assert latency < 3 * step_time + 1.0, (latency, step_time)


def test_sigterm_on_a_checkpoint_step_saves_once_and_exits(tmp_path, data_dir):
    # The signal arrives during step 2's eval hook, so the loop sees it at step 3, which is
    # also a periodic checkpoint step: it must save step 3 (once) and return.
    def send_sigterm(state, step, writer):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    config = toy_config(data_dir, log_every=1, save_every=1)
    stage = toy_stage(num_train_steps=10, on_eval=send_sigterm)
    state = train_loop.run(config, str(tmp_path), stage)
    assert int(state["step"]) == 3
    assert checkpoint_steps(tmp_path) == [1, 2, 3]
    # Rerunning resumes from 3 and completes.
    state = train_loop.run(config, str(tmp_path), toy_stage(num_train_steps=10))
    assert int(state["step"]) == 10
    assert checkpoint_steps(tmp_path)[-1] == 10


def test_preemption_on_an_eval_step_runs_that_eval_before_exiting(tmp_path, data_dir):
    # The signal arrives during step 2's eval, so the loop stops at step 3 (evals every step).
    # The resumed run starts after step 3: step 3's eval must run before the first run exits.
    evaluated = []

    def evaluate(state, step, writer):
        evaluated.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    config = toy_config(data_dir, log_every=1, save_every=5)
    state = train_loop.run(config, str(tmp_path), toy_stage(num_train_steps=6, on_eval=evaluate))
    assert int(state["step"]) == 3
    assert evaluated == [1, 2, 3]
    train_loop.run(config, str(tmp_path), toy_stage(num_train_steps=6, on_eval=evaluate))
    assert evaluated == [1, 2, 3, 4, 5, 6]


def test_toy_run_resumes_to_the_same_parameters(tmp_path, data_dir):
    config = toy_config(data_dir, log_every=1, save_every=2)
    full = train_loop.run(config, str(tmp_path / "full"), toy_stage(num_train_steps=6))
    train_loop.run(config, str(tmp_path / "split"), toy_stage(num_train_steps=3))
    resumed = train_loop.run(config, str(tmp_path / "split"), toy_stage(num_train_steps=6))
    # Orbax also saves the first step of a fresh run (no checkpoint yet).
    assert checkpoint_steps(tmp_path / "split") == [1, 2, 3, 4, 6]
    np.testing.assert_allclose(np.asarray(resumed["w"]), np.asarray(full["w"]), rtol=1e-6)
    # The saved metadata records the config of the run.
    meta = json.loads((tmp_path / "split" / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6 and meta["stage"] == "toy"


# ---------------------------------------------------------------------------------------------
# Config errors fail fast, before compiling or creating checkpoints.


def _assert_fails_fast(fn, exception, match, workdir, limit_s=60.0):
    start = time.monotonic()
    with pytest.raises(exception, match=match):
        fn()
    assert time.monotonic() - start < limit_s
    assert not (workdir / "checkpoints").exists()


def test_batch_not_divisible_by_data_parallel_devices(tmp_path, data_dir, tokenizer_workdir):
    config = tiny_config(data_dir, stage="tokenizer", **{"tokenizer_training.batch_size": 12})
    _assert_fails_fast(
        lambda: train_tokenizer.train_and_evaluate(config, str(tmp_path)),
        ValueError,
        r"global batch 12 is not divisible by the 8 data-parallel devices",
        tmp_path,
    )
    config = transformer_config(
        data_dir, tokenizer_workdir, **{"training.batch_size": 12, "mesh.shape": (-1, 1, 1)}
    )
    _assert_fails_fast(
        lambda: train_transformer.train_and_evaluate(config, str(tmp_path)),
        ValueError,
        r"global batch 12 is not divisible by the 8 data-parallel devices",
        tmp_path,
    )


def test_unknown_dataset_name(tmp_path, data_dir):
    config = tiny_config(data_dir, stage="tokenizer", **{"dataset.name": "no_such_dataset"})
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, str(tmp_path)),
        ValueError,
        r"Unknown dataset name 'no_such_dataset'",
        tmp_path,
        limit_s=20.0,
    )


def test_unknown_stage(tmp_path, data_dir):
    config = tiny_config(data_dir, stage="vqgan")
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, str(tmp_path)),
        ValueError,
        r"stage='vqgan' is unknown",
        tmp_path,
        limit_s=1.0,
    )


def test_transformer_stage_without_a_tokenizer(tmp_path, data_dir):
    missing = tmp_path / "no_tokenizer_here"
    config = tiny_config(data_dir, **{"training.tokenizer_checkpoint": str(missing)})
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, str(tmp_path)),
        FileNotFoundError,
        r"no tokenizer found",
        tmp_path,
        limit_s=5.0,
    )
    config = tiny_config(data_dir)
    assert config.training.tokenizer_checkpoint == ""
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, str(tmp_path)),
        ValueError,
        r"needs training.tokenizer_checkpoint",
        tmp_path,
        limit_s=1.0,
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"training.batch_size": 12},
            r"transformer stage \(training.batch_size\): global batch 12 is not divisible",
        ),
        ({"mesh.shape": (3, 1, 1)}, r"mesh shape \(3, 1, 1\) needs 3 devices"),
        ({"training.pretokenized_dir": "/tokens"}, r"holds tokens of another tokenizer"),
        (
            {"evaluation.inception_path": "/inception.pb", "evaluation.batch_size": 4},
            r"evaluation.batch_size=4 must be a multiple of this process's 8 devices",
        ),
    ],
    ids=["transformer-batch", "mesh", "pretokenized", "evaluation-batch"],
)
def test_stage_both_checks_the_transformer_before_the_tokenizer_trains(
    tmp_path, data_dir, overrides, match
):
    config = tiny_config(data_dir, stage="both", **overrides)
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, tmp_path),
        ValueError,
        match,
        tmp_path / "tokenizer",
        limit_s=10.0,
    )
    assert not (tmp_path / "tokenizer").exists()


def test_stage_both_checks_the_attention_override_before_the_tokenizer_trains(
    tmp_path, data_dir, monkeypatch
):
    monkeypatch.setenv(attention.OVERRIDE_VARIABLE, "flash")
    config = tiny_config(data_dir, stage="both")
    _assert_fails_fast(
        lambda: main.train_and_evaluate(config, tmp_path),
        RuntimeError,
        r"MASKGIT_JAX_ATTENTION='flash' names no attention implementation",
        tmp_path / "tokenizer",
        limit_s=10.0,
    )
    assert not (tmp_path / "tokenizer").exists()
