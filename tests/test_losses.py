"""Tokenizer-stage losses and the StyleGAN discriminator: values, gradients and a tiny fit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskgit_jax.models import discriminator as disc
from maskgit_jax.training import losses

BIG = 30.0


def _uniform(seed, shape):
    """Test data from NumPy: drawing it with jax.random would compile a sampler per shape."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def test_l2_and_l1_values():
    a = jnp.array([[0.0, 1.0], [2.0, 3.0]])
    b = jnp.array([[1.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(losses.l2_loss(a, b), (1 + 0 + 4 + 0) / 4)
    np.testing.assert_allclose(losses.l1_loss(a, b), (1 + 0 + 2 + 0) / 4)
    assert losses.l2_loss(a, a) == 0.0


def test_non_saturating_losses_at_known_logits():
    ones = jnp.ones((4,))
    # A confident, correct discriminator has ~0 loss; a confident, wrong one ~2 * BIG.
    assert losses.discriminator_loss(BIG * ones, -BIG * ones, "non_saturating") < 1e-10
    np.testing.assert_allclose(
        losses.discriminator_loss(-BIG * ones, BIG * ones, "non_saturating"), 2 * BIG, rtol=1e-6
    )
    # At zero logits each term is log 2.
    zeros = jnp.zeros((3,))
    np.testing.assert_allclose(
        losses.discriminator_loss(zeros, zeros, "non_saturating"), 2 * math.log(2), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.generator_loss(zeros, "non_saturating"), math.log(2), rtol=1e-6
    )
    assert losses.generator_loss(BIG * ones, "non_saturating") < 1e-10
    np.testing.assert_allclose(
        losses.generator_loss(jnp.array([1.5]), "non_saturating"), math.log1p(math.exp(-1.5))
    )


def test_hinge_losses_exact():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = jnp.array([-3.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2
    np.testing.assert_allclose(
        losses.discriminator_loss(real, fake, "hinge"), 2.5 / 3 + 3.0 / 3, rtol=1e-6
    )
    np.testing.assert_allclose(losses.generator_loss(fake, "hinge"), 2.0 / 3, rtol=1e-6)


@pytest.mark.parametrize("kind", losses.GAN_LOSS_KINDS)
def test_gradient_signs(kind):
    fake = jnp.array([-0.3, 0.2, 0.7])
    real = jnp.array([0.1, -0.4, 0.3])  # all inside the hinge margin, so gradients are nonzero
    g_grad = jax.grad(lambda f: losses.generator_loss(f, kind))(fake)
    assert np.all(g_grad < 0)  # generator loss falls as fake logits rise
    d_real, d_fake = jax.grad(lambda r, f: losses.discriminator_loss(r, f, kind), (0, 1))(
        real, fake
    )
    assert np.all(d_real < 0) and np.all(d_fake > 0)


def test_unknown_kind_is_rejected():
    x = jnp.zeros((2,))
    with pytest.raises(ValueError, match="wasserstein"):
        losses.discriminator_loss(x, x, "wasserstein")
    with pytest.raises(ValueError, match="unknown GAN loss"):
        losses.generator_loss(x, "lsgan")


def test_r1_penalty_of_linear_discriminator_is_weight_norm():
    w = _uniform(0, (3, 3, 4)) - 0.5

    def linear_d(x):
        return jnp.sum(w * x, axis=(1, 2, 3))

    images = _uniform(1, (5, 3, 3, 4))
    np.testing.assert_allclose(losses.r1_penalty(linear_d, images), jnp.sum(w**2), rtol=1e-6)
    # Quadratic D(x) = sum(x^2): gradient 2x, penalty mean_b 4 |x_b|^2; differentiable in scale.
    quad = losses.r1_penalty(lambda x: jnp.sum(x**2, axis=(1, 2, 3)), images)
    np.testing.assert_allclose(quad, 4 * jnp.mean(jnp.sum(images**2, axis=(1, 2, 3))), rtol=1e-5)
    d_scale = jax.grad(lambda s: losses.r1_penalty(lambda x: s * linear_d(x), images))(2.0)
    np.testing.assert_allclose(d_scale, 2 * 2.0 * jnp.sum(w**2), rtol=1e-5)


def test_lecam_regularization():
    real = jnp.array([0.5, 1.5])
    fake = jnp.array([-1.0, 0.0])
    # Real logits below the fake EMA and fake logits above the real EMA: nothing to penalize.
    assert losses.lecam_regularization(real, fake, ema_real=-2.0, ema_fake=2.0) == 0.0
    # Every logit equal to its own EMA and the EMAs equal: zero.
    same = jnp.full((3,), 0.7)
    assert losses.lecam_regularization(same, same, 0.7, 0.7) == 0.0
    # ema_fake = 0: relu(real)^2 = 0.25, 2.25; ema_real = 1: relu(1 - fake)^2 = 4, 1.
    np.testing.assert_allclose(
        losses.lecam_regularization(real, fake, ema_real=1.0, ema_fake=0.0),
        (0.25 + 2.25) / 2 + (4.0 + 1.0) / 2,
    )
    # The EMAs are constants: no gradient flows into them.
    g = jax.grad(lambda e: losses.lecam_regularization(real, fake, e, e))(0.3)
    assert g == 0.0


def test_update_lecam_ema():
    new_real, new_fake = losses.update_lecam_ema(
        1.0, -1.0, jnp.array([3.0, 5.0]), jnp.array([-3.0, -5.0]), decay=0.9
    )
    np.testing.assert_allclose(new_real, 0.9 * 1.0 + 0.1 * 4.0, rtol=1e-6)
    np.testing.assert_allclose(new_fake, 0.9 * -1.0 + 0.1 * -4.0, rtol=1e-6)


# ----------------------------------------------------------------------------- blur_pool


def test_blur_filter_sums_to_one():
    k = disc.blur_filter((1, 3, 3, 1))
    assert k.shape == (4, 4)
    np.testing.assert_allclose(jnp.sum(k), 1.0, rtol=1e-6)
    np.testing.assert_allclose(k, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0, rtol=1e-6)


def test_blur_pool_halves_size_and_keeps_constants_away_from_borders():
    x = jnp.full((2, 8, 12, 3), 0.6)
    y = disc.blur_pool(x)
    assert y.shape == (2, 4, 6, 3)
    np.testing.assert_allclose(y[:, 1:-1, 1:-1], 0.6, rtol=1e-6)
    # Zero padding darkens the border, never brightens it.
    assert float(y[0, 0, 0, 0]) < 0.6


def test_blur_pool_is_depthwise_and_low_pass():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 16, 16, 2)), jnp.float32)
    y = disc.blur_pool(x)
    # Channels are filtered separately: zeroing one leaves the other unchanged.
    y0 = disc.blur_pool(x.at[..., 1].set(0.0))
    np.testing.assert_allclose(y0[..., 0], y[..., 0], rtol=1e-6)
    np.testing.assert_allclose(y0[..., 1], 0.0)
    # A checkerboard (highest frequency) is almost removed, unlike plain subsampling.
    checker = jnp.asarray((np.indices((16, 16)).sum(0) % 2) * 2.0 - 1.0)[None, :, :, None]
    blurred = disc.blur_pool(checker)[:, 1:-1, 1:-1]
    assert float(jnp.max(jnp.abs(blurred))) < 1e-6
    assert float(jnp.max(jnp.abs(checker[:, ::2, ::2]))) == 1.0


# ------------------------------------------------------------------------- discriminator


def _tiny(image_size, **kwargs):
    fields = dict(filters=8, channel_multipliers=(1, 2), mbstd_group_size=2)
    fields.update(kwargs)
    return disc.StyleGANDiscriminator(image_size=image_size, **fields)


@pytest.fixture(scope="module")
def tiny16():
    """One 16x16 model and its parameters, shared: each initializer compile costs seconds."""
    model = _tiny(16)
    images = jnp.zeros((2, 16, 16, 3))
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]


def _check_params(params, image_size):
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) > 0
    blocks = [name for name in params if name.startswith("DownBlock")]
    assert len(blocks) == disc.num_down_blocks(image_size) == int(math.log2(image_size)) - 2


def test_discriminator_runs_at_16(tiny16):
    model, params = tiny16
    images = _uniform(1, (4, 16, 16, 3))
    logits = jax.jit(model.apply)({"params": params}, images)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert len(np.unique(np.asarray(logits))) == 4  # different images, different scores
    _check_params(params, 16)


def test_discriminator_shapes_at_32():
    # Traced, not compiled: checks every layer's shapes at 32x32 without the compile cost.
    model = _tiny(32)
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    logits = jax.eval_shape(model.apply, variables, images)
    assert logits.shape == (3,) and logits.dtype == jnp.float32
    _check_params(variables["params"], 32)


def test_discriminator_bfloat16_compute_returns_float32(tiny16):
    model, params = tiny16
    bf16 = _tiny(16, dtype=jnp.bfloat16)  # same float32 parameters, bfloat16 compute
    images = _uniform(1, (2, 16, 16, 3))
    logits = jax.jit(bf16.apply)({"params": params}, images)
    assert logits.dtype == jnp.float32
    reference = jax.jit(model.apply)({"params": params}, images)
    np.testing.assert_allclose(logits, reference, atol=0.05, rtol=0.05)


def test_block_features_repeat_last_multiplier():
    assert disc.block_features(16, 8, (1, 2)) == (8, 16)
    assert disc.block_features(64, 8, (1, 2)) == (8, 16, 16, 16)
    assert disc.block_features(8, 8, (1, 2, 4)) == (8,)


@pytest.mark.parametrize("image_size", [24, 12, 2, 0])
def test_discriminator_rejects_bad_sizes(image_size):
    with pytest.raises(ValueError, match="4 times a power of 2"):
        disc.num_down_blocks(image_size)
    size = max(image_size, 1)
    with pytest.raises(ValueError, match="4 times a power of 2"):
        _tiny(image_size).init(jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)))


def test_discriminator_rejects_mismatched_images():
    with pytest.raises(ValueError, match="expected images"):
        _tiny(16).init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))


def test_minibatch_stddev_feature():
    x = jnp.stack([jnp.zeros((4, 4, 2)), jnp.ones((4, 4, 2)) * 2.0])  # two examples
    y = disc.minibatch_stddev(x, group_size=2)
    assert y.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(y[..., 2], 1.0, rtol=1e-4)  # std of {0, 2}
    # A batch size the group does not divide falls back to a smaller group (here 1).
    z = disc.minibatch_stddev(jnp.ones((3, 4, 4, 2)), group_size=2)
    np.testing.assert_allclose(z[..., 2], 0.0, atol=1e-3)


def test_r1_penalty_through_discriminator_is_positive_and_differentiable(tiny16):
    model, params = tiny16
    images = _uniform(0, (2, 16, 16, 3))

    def penalty(p):
        return losses.r1_penalty(lambda x: model.apply({"params": p}, x), images)

    value, grads = jax.jit(jax.value_and_grad(penalty))(params)
    assert value > 0
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_discriminator_separates_two_constant_distributions(tiny16):
    model, params = tiny16
    real = jnp.full((4, 16, 16, 3), 0.8)
    fake = jnp.full((4, 16, 16, 3), 0.2)
    tx = optax.adam(3e-3, b1=0.0, b2=0.99)
    opt_state = tx.init(params)

    def loss_fn(p):
        real_logits = model.apply({"params": p}, real)
        fake_logits = model.apply({"params": p}, fake)
        return losses.discriminator_loss(real_logits, fake_logits, "non_saturating")

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    history = []
    for _ in range(12):
        params, opt_state, loss = step(params, opt_state)
        history.append(float(loss))
    assert history[0] > 1.3  # about 2 log 2 at initialization
    assert history[-1] < 0.5 * history[0]
    apply = jax.jit(model.apply)
    assert np.all(apply({"params": params}, real) > apply({"params": params}, fake))
