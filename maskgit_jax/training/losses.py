"""Tokenizer-stage losses: reconstruction, GAN objectives on logits and their regularizers.

Every function is a pure `jnp` computation returning a float32 scalar (the LeCam EMA helper
returns the new averages), so the train step composes them with its own weights: in the
authors' configuration the generator GAN weight is 0.1 and the R1 cost is 10.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

GAN_LOSS_KINDS = ("non_saturating", "hinge")


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; use one of {GAN_LOSS_KINDS}.")


def l2_loss(a: Array, b: Array) -> Array:
    """Mean squared difference over every element (the authors' reconstruction loss)."""
    return jnp.mean(jnp.square(_f32(a) - _f32(b)))


def l1_loss(a: Array, b: Array) -> Array:
    """Mean absolute difference over every element."""
    return jnp.mean(jnp.abs(_f32(a) - _f32(b)))


def discriminator_loss(real_logits: Array, fake_logits: Array, kind: str) -> Array:
    """Discriminator objective: push real logits up and fake logits down.

    "non_saturating": mean(softplus(-real)) + mean(softplus(fake)), i.e. the logistic
    cross-entropy with labels 1 for real and 0 for fake. "hinge": mean(relu(1 - real)) +
    mean(relu(1 + fake)).
    """
    _check_kind(kind)
    real, fake = _f32(real_logits), _f32(fake_logits)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def generator_loss(fake_logits: Array, kind: str) -> Array:
    """Generator objective on the discriminator's logits for generated images.

    "non_saturating": mean(softplus(-fake)) = -log sigmoid(fake), which keeps a useful
    gradient while the discriminator wins; "hinge": -mean(fake).
    """
    _check_kind(kind)
    fake = _f32(fake_logits)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake))
    return -jnp.mean(fake)


def r1_penalty(discriminator_fn: Callable[[Array], Array], real_images: Array) -> Array:
    """Mean over the batch of |d sum(D(x)) / dx_i|^2 at real images, unscaled.

    Summing D over the batch before differentiating gives each example its own input
    gradient when examples are scored independently; a minibatch-stddev layer couples them
    slightly, and those cross-example terms are kept, as in StyleGAN2.
    Convention (ours): the caller adds `cost * r1_penalty(...)` with no extra 1/2 (cost 10 in
    the authors' configuration); in StyleGAN2's `gamma / 2 * penalty` form, gamma = 2 * cost.
    `discriminator_fn` closes over the parameters, so the result is differentiable in them.
    """
    images = _f32(real_images)
    grads = jax.grad(lambda x: jnp.sum(_f32(discriminator_fn(x))))(images)
    per_example = jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=-1)
    return jnp.mean(per_example)


def lecam_regularization(
    real_logits: Array, fake_logits: Array, ema_real: Array, ema_fake: Array
) -> Array:
    """LeCam regularizer (Tseng et al., 2021) on discriminator logits, unscaled.

    mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2): keeps real logits from
    running above the running mean of fake logits and vice versa, which bounds how far the
    discriminator can separate the two under limited data. The EMAs are treated as constants.
    """
    real, fake = _f32(real_logits), _f32(fake_logits)
    ema_real = jax.lax.stop_gradient(_f32(ema_real))
    ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
    return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(
        jnp.square(jax.nn.relu(ema_real - fake))
    )


def update_lecam_ema(
    ema_real: Array, ema_fake: Array, real_logits: Array, fake_logits: Array, decay: float = 0.99
) -> tuple[Array, Array]:
    """New (ema_real, ema_fake): exponential moving averages of the batch-mean logits."""
    real_mean = jnp.mean(_f32(jax.lax.stop_gradient(real_logits)))
    fake_mean = jnp.mean(_f32(jax.lax.stop_gradient(fake_logits)))
    new_real = decay * _f32(ema_real) + (1.0 - decay) * real_mean
    new_fake = decay * _f32(ema_fake) + (1.0 - decay) * fake_mean
    return new_real, new_fake
