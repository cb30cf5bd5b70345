import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.decoding import autoregressive as ar_sampling
from maskgit_jax.models.autoregressive import CausalTransformer

CODEBOOK_SIZE = 16
NUM_CLASSES = 4
LENGTH = 10  # class token + 9 image tokens (a 3x3 grid)


def _model(dtype=jnp.float32):
    return CausalTransformer(
        codebook_size=CODEBOOK_SIZE,
        num_classes=NUM_CLASSES,
        max_length=LENGTH,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        dtype=dtype,
    )


def _ids(batch=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, batch)
    image = rng.integers(0, CODEBOOK_SIZE, (batch, LENGTH - 1))
    return np.concatenate([CODEBOOK_SIZE + labels[:, None], image], axis=1).astype(np.int32)


@pytest.fixture(scope="module")
def setup():
    model = _model()
    # Random values for every variable (no init compile): non-zero biases and LayerNorm
    # offsets, so that a wrong position or cache slot shows in the logits.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, LENGTH), jnp.int32))
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    forward = jax.jit(
        lambda ids, num_logits=None: model.apply(variables, ids, num_logits=num_logits),
        static_argnames="num_logits",
    )
    return model, variables, forward


def test_cached_decoding_matches_full_causal_forward_at_every_position(setup):
    model, variables, forward = setup
    ids = _ids()
    full = np.asarray(forward(ids))
    assert full.shape == (3, LENGTH, CODEBOOK_SIZE + NUM_CLASSES)

    step = jax.jit(
        lambda token, position, cache: model.apply(
            variables, token, position, cache, method=CausalTransformer.decode_step
        )
    )
    cache = model.init_cache(ids.shape[0])
    for position in range(LENGTH):
        logits, cache = step(ids[:, position], position, cache)
        np.testing.assert_allclose(logits, full[:, position], atol=2e-5, rtol=2e-5)
    # Every slot of the cache has been written.
    assert all(np.all(np.abs(np.asarray(k)).max(axis=(0, 2, 3)) > 0) for k, _ in cache)


def test_num_logits_restricts_to_the_codebook(setup):
    model, variables, forward = setup
    ids = _ids()
    full = forward(ids)
    codebook = forward(ids, num_logits=CODEBOOK_SIZE)
    np.testing.assert_allclose(codebook, full[..., :CODEBOOK_SIZE], atol=1e-6)


def test_later_tokens_do_not_change_earlier_logits(setup):
    model, variables, forward = setup
    ids = _ids()
    changed = ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 5) % CODEBOOK_SIZE
    a = np.asarray(forward(ids))
    b = np.asarray(forward(changed))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3  # ... while later logits do change.


def test_ar_generate_shape_range_and_determinism(setup):
    model, variables, forward = setup
    labels = np.array([0, 1, 3])
    first = np.asarray(ar_sampling.ar_generate(variables, labels, jax.random.PRNGKey(0), model))
    assert first.shape == (3, LENGTH - 1) and first.dtype == np.int32
    assert first.min() >= 0 and first.max() < CODEBOOK_SIZE
    again = ar_sampling.ar_generate(variables["params"], labels, jax.random.PRNGKey(0), model)
    np.testing.assert_array_equal(again, first)
    other = ar_sampling.ar_generate(variables, labels, jax.random.PRNGKey(1), model)
    assert not np.array_equal(np.asarray(other), first)


def test_ar_generate_follows_the_model_greedily_at_low_temperature(setup):
    # At a tiny temperature each draw is the argmax of the teacher-forced logits given the
    # tokens drawn before it, which ties the loop's positions and cache to the full forward.
    model, variables, forward = setup
    labels = np.array([1, 3, 2])  # Every test uses batch 3: one compile per function.
    tokens = np.asarray(
        ar_sampling.ar_generate(variables, labels, jax.random.PRNGKey(2), model, 1e-6)
    )
    ids = np.concatenate([CODEBOOK_SIZE + labels[:, None], tokens], axis=1)
    logits = forward(ids, num_logits=CODEBOOK_SIZE)
    np.testing.assert_array_equal(np.argmax(logits[:, :-1], -1), tokens)


def test_ar_generate_rejects_bad_labels_and_temperature(setup):
    model, variables, forward = setup
    with pytest.raises(ValueError, match="out of range"):
        ar_sampling.ar_generate(variables, np.array([NUM_CLASSES]), jax.random.PRNGKey(0), model)
    with pytest.raises(ValueError, match="temperature"):
        ar_sampling.ar_generate(variables, np.array([0]), jax.random.PRNGKey(0), model, 0.0)
