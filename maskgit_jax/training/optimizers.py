"""Optax optimizers and learning-rate schedules built from config fields."""

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(training: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then constant (the authors') or cosine decay to 0."""
    warmup = optax.linear_schedule(0.0, training.learning_rate, max(1, training.warmup_steps))
    if training.lr_schedule == "constant":
        after = optax.constant_schedule(training.learning_rate)
    elif training.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(
            training.learning_rate, max(1, training.num_train_steps - training.warmup_steps)
        )
    else:
        raise ValueError(
            f"training.lr_schedule={training.lr_schedule!r} is unknown; use 'constant' or 'cosine'."
        )
    return optax.join_schedules([warmup, after], [training.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for matrices and embeddings (ndim >= 2); biases and norm scales are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw_optimizer(training: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW from a training sub-config (betas, weight decay, schedule), optional clipping.

    The transformer stage uses the authors' (0.9, 0.96, 0.045); the tokenizer (0, 0.99, 0).
    """
    parts = []
    if training.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(training.grad_clip_norm))
    parts.append(
        optax.adamw(
            learning_rate_schedule(training),
            b1=training.beta1,
            b2=training.beta2,
            weight_decay=training.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def update_ema(ema_params: Any, params: Any, decay: float) -> Any:
    """Polyak average: ema <- decay * ema + (1 - decay) * params."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
