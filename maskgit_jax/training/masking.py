"""MVTM training masks: per example, mask ceil(gamma(r) * N) image tokens chosen uniformly."""

import jax
import jax.numpy as jnp

from maskgit_jax.decoding import mask_schedule

Array = jax.Array


def random_token_mask(rng: jax.Array, shape: tuple[int, int], schedule: str = "cosine") -> Array:
    """Bool mask [B, N]: row b masks ceil(gamma(r_b) * N) positions, r_b ~ U(0, 1).

    Positions are chosen uniformly by ranking i.i.d. uniform scores; at least one token per
    row is masked so every example contributes to the loss.
    """
    batch, num_tokens = shape
    ratio_rng, order_rng = jax.random.split(rng)
    ratio = jax.random.uniform(ratio_rng, (batch, 1))
    num_masked = jnp.ceil(mask_schedule.schedule(ratio, num_tokens, schedule) * num_tokens)
    num_masked = jnp.clip(num_masked, 1, num_tokens).astype(jnp.int32)
    scores = jax.random.uniform(order_rng, shape)
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return ranks < num_masked


def fixed_ratio_token_mask(rng: jax.Array, shape: tuple[int, int], ratio: float) -> Array:
    """Bool mask [B, N] with exactly max(1, round(ratio * N)) uniformly chosen positions a row."""
    num_tokens = shape[1]
    num_masked = max(1, round(ratio * num_tokens))
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, shape), axis=-1), axis=-1)
    return ranks < num_masked


def transformer_inputs(
    image_tokens: Array,
    labels: Array,
    mask: Array,
    *,
    codebook_size: int,
    mask_token_id: int,
    drop_label: Array | None = None,
) -> Array:
    """Sequences [B, 1 + N]: class token, then image tokens with masked positions replaced.

    Where `drop_label` is True the class token becomes the mask token: the unconditional
    input used for classifier-free guidance (the released vocabulary has no spare row).
    """
    class_tokens = codebook_size + labels.astype(jnp.int32)
    if drop_label is not None:
        class_tokens = jnp.where(drop_label, mask_token_id, class_tokens)
    masked = jnp.where(mask, mask_token_id, image_tokens.astype(jnp.int32))
    return jnp.concatenate([class_tokens[:, None], masked], axis=1)
