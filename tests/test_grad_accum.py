"""Gradient accumulation is exact: k micro-batches give the loss and update of one big batch.

The masked-token loss is a mean over masked tokens, and examples mask different numbers of
tokens, so micro-batches hold different counts: a mean of micro-batch means would differ.
"""

import jax
import numpy as np
import pytest

from maskgit_jax import sharding
from maskgit_jax.data import input_pipeline
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import transformer as train_transformer
from tests.training_support import tiny_config

NUM_STEPS = 3


def _config(grad_accum_steps):
    # Dropout off: its keys are drawn per micro-batch, so they differ between accumulations.
    return tiny_config(
        "unused",
        **{
            "training.grad_accum_steps": grad_accum_steps,
            "training.warmup_steps": 0,
            "training.ema_decay": 0.0,
            "transformer.dropout_rate": 0.0,
            "transformer.attention_dropout_rate": 0.0,
        },
    )


def _batches(config, num_batches):
    """Pre-tokenized batches {"tokens": [B, h, w], "label": [B]} of random codes."""
    rng = np.random.default_rng(0)
    side = 4
    batch = config.training.batch_size
    return [
        {
            "tokens": rng.integers(0, config.tokenizer.codebook_size, (batch, side, side)),
            "label": rng.integers(0, config.num_classes, (batch,)).astype(np.int32),
        }
        for _ in range(num_batches)
    ]


def _train(grad_accum_steps, batches):
    """Runs one step per batch on one device; returns (per-step metrics, host state per step)."""
    config = _config(grad_accum_steps)
    stage = train_transformer.build_stage(config).stage  # batches of tokens: no tokenizer
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    setup = train_loop.create_sharded_setup(config, stage, mesh=mesh)
    state = train_loop.init_state(setup, stage, config.seed)
    step_fn = train_loop.jit_train_step(setup, stage)
    history, states = [], []
    with setup.activate():
        for local_batch in batches:
            batch = input_pipeline.make_global_batch(local_batch, setup.mesh)
            state, metrics = step_fn(state, batch, None)
            history.append(jax.device_get(metrics))
            states.append(jax.device_get(state))
    return history, states


@pytest.fixture(scope="module")
def runs():
    batches = _batches(_config(1), NUM_STEPS)
    return batches, {accum: _train(accum, batches) for accum in (1, 2, 4)}


def test_micro_batches_hold_different_masked_counts(runs):
    """The test is only meaningful if a mean of micro-batch means would differ."""
    batches, _ = runs
    config = _config(4)
    trainer = train_transformer.build_stage(config).trainer
    tokens = batches[0]["tokens"].reshape(config.training.batch_size, -1)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    _, mask = trainer._inputs(jax.random.fold_in(rng, 0), tokens, batches[0]["label"])
    counts = np.asarray(mask).reshape(4, -1).sum(axis=1)
    assert len(set(counts.tolist())) > 1, counts


def _assert_trees_close(expected, found, rtol, atol, what):
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    found_leaves = jax.tree.leaves(found)
    assert len(expected_leaves) == len(found_leaves)
    for (path, want), got in zip(expected_leaves, found_leaves, strict=True):
        np.testing.assert_allclose(
            got, want, rtol=rtol, atol=atol, err_msg=f"{what}{jax.tree_util.keystr(path)}"
        )


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_gives_the_loss_and_update_of_one_batch(runs, accum):
    _, results = runs
    (one_history, one_states), (history, states) = results[1], results[accum]
    # Every metric of the first step; the loss of the later ones (their gradients inherit the
    # first update's float noise, which Adam amplifies; see below).
    for step, (expected, found) in enumerate(zip(one_history, history, strict=True)):
        names = ("loss", "masked_accuracy", "masked_fraction", "grad_norm") if step == 0 else ()
        for name in names + ("loss", "masked_fraction"):
            np.testing.assert_allclose(
                found[name], expected[name], rtol=1e-5, err_msg=f"{name} at step {step}"
            )
    # The first step's gradient: AdamW's first moment after one step is (1 - beta1) * grad.
    # The absolute tolerance covers gradients that are zero in exact arithmetic (attention
    # key biases: about 1e-14 here).
    one_mu, mu = (s[0].opt_state[0][0].mu for s in (one_states, states))
    _assert_trees_close(one_mu, mu, rtol=1e-5, atol=1e-8, what="first moment ")
    # The first update, wherever the gradient is resolved: Adam's first step moves each
    # parameter by lr * g / (|g| + 1e-8), which turns float noise in a gradient near 1e-8
    # into visible differences, whichever way the gradient was summed. (Embedding rows of
    # codes and classes absent from the batch have no gradient at all.)
    resolved = jax.tree.map(lambda m: np.abs(m) > 1e-7, one_mu)  # |g| > 1e-6 = 100 eps
    fraction = np.mean(np.concatenate([r.ravel() for r in jax.tree.leaves(resolved)]))
    assert fraction > 0.6, fraction
    picked = [jax.tree.map(lambda x, r: x[r], s[0].params, resolved) for s in (one_states, states)]
    _assert_trees_close(picked[0], picked[1], rtol=1e-5, atol=1e-8, what="params ")
    moved = jax.tree.leaves(picked[0])
    assert max(float(np.max(np.abs(x), initial=0.0)) for x in moved) > 0.01  # It moved.
