"""Raster-order autoregressive sampling with a KV cache: one jitted loop, one token per step.

The baseline MaskGIT's parallel decoding is compared with: every image token needs its own
sequential forward pass of one token per sequence (with the cache), where MaskGIT needs T
full-sequence passes.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from maskgit_jax import validation
from maskgit_jax.models.autoregressive import CausalTransformer

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model",))
def _generate(variables: Any, labels: Array, rng: Array, model: CausalTransformer, temperature):
    batch = labels.shape[0]
    num_tokens = model.max_length - 1
    class_tokens = model.codebook_size + labels.astype(jnp.int32)

    def step(position, carry):
        cache, token, tokens = carry
        logits, cache = model.apply(
            variables,
            token,
            position,
            cache,
            num_logits=model.codebook_size,
            method=CausalTransformer.decode_step,
        )
        key = jax.random.fold_in(rng, position)
        sampled = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, sampled[:, None], (0, position))
        return cache, sampled, tokens

    init = (
        model.init_cache(batch),
        class_tokens,
        jnp.zeros((batch, num_tokens), jnp.int32),
    )
    _, _, tokens = jax.lax.fori_loop(0, num_tokens, step, init)
    return tokens


def ar_generate(
    params: Any,
    labels,
    rng: Array,
    model: CausalTransformer,
    temperature: float = 1.0,
) -> Array:
    """Image tokens [B, max_length - 1] in [0, codebook_size) for class `labels` [B].

    `params` is the model's variables (`{"params": ...}`) or the bare parameter tree. Token
    `i` is drawn from softmax(logits / temperature) given the class token and tokens < i; the
    draw at step i uses `fold_in(rng, i)`, so the result is a function of `rng`. The whole
    loop is one compiled program (one per batch size and model).
    """
    labels = validation.check_labels(labels, model.num_classes)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}.")
    variables = params if "params" in params else {"params": params}
    return _generate(variables, jnp.asarray(labels), rng, model, jnp.float32(temperature))
