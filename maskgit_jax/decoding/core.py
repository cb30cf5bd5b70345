"""MaskGIT parallel (iterative) decoding: the one decode loop every sampler runs.

Each step samples every masked position, then re-masks some of the new tokens, fewer each step
as the mask schedule prescribes: the least confident ones with annealed Gumbel noise (the
authors' released sampler, step by step), or the latest ones in a fixed order such as Halton.
Both orderings share the step ratio, schedule, mask-count clamp and cut-off below.

Design for compile-once use: `tokens_to_logits(params, ids) -> logits` is a *static* argument
(hashed by identity) and the weights travel separately as the traced `params` pytree. Define
the function once (e.g. at module level) and pass the same object on every call; then repeated
calls with the same shapes, static options and params structure reuse one compiled program,
whatever the inputs, key, params values and temperatures. Passing a fresh lambda each call, or
closing over the weights, recompiles (and bakes the weights in as constants).
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.decoding import mask_schedule
from maskgit_jax.decoding.options import DecodeOptions

TokensToLogits = Callable[[Any, jnp.ndarray], jnp.ndarray]

# Confidence of tokens that are known (given or already revealed): they are never re-masked.
_KNOWN_CONFIDENCE = jnp.inf


@flax.struct.dataclass
class DecodeState:
    """Loop carry: current tokens (mask ids where unknown), the key and the sampled tokens."""

    seqs: jnp.ndarray  # [B, L] int32, mask_token_id where still unknown.
    rng: jax.Array  # Split twice per step (sampling, then the re-masking noise).
    sampled: jnp.ndarray  # [B, L] int32, tokens sampled in the latest step before re-masking.
    all_steps: jnp.ndarray | None  # [B, T, L] int32 when requested, else None.


def _split_keys(rng: jax.Array, per_row: bool) -> tuple[jax.Array, jax.Array]:
    """Splits one key (batch-wide draws) or a batch of keys [B] (one per row) in two."""
    if per_row:
        pairs = jax.vmap(jax.random.split)(rng)
        return pairs[:, 0], pairs[:, 1]
    first, second = jax.random.split(rng)
    return first, second


def _categorical(rng: jax.Array, logits: jnp.ndarray, per_row: bool) -> jnp.ndarray:
    if per_row:
        return jax.vmap(lambda key, row: jax.random.categorical(key, row, axis=-1))(rng, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def _gumbel(rng: jax.Array, shape: tuple[int, ...], per_row: bool) -> jnp.ndarray:
    if per_row:
        return jax.vmap(lambda key: jax.random.gumbel(key, shape[1:]))(rng)
    return jax.random.gumbel(rng, shape)


def _below_cut_off(score: jnp.ndarray, mask_len: jnp.ndarray) -> jnp.ndarray:
    """True where `score` is below its `mask_len`-th smallest value per row.

    The cut-off of a sort (not top_k) is the authors' selection: exactly `mask_len` entries fall
    below it barring exact ties, and +inf (known) entries never do.
    """
    sorted_score = jnp.sort(score, axis=-1)
    index = jnp.clip(mask_len, 0, score.shape[-1] - 1)
    cut_off = jnp.take_along_axis(sorted_score, index, axis=-1)
    return score < cut_off


def decode_loop(
    inputs: jnp.ndarray,
    rng: jax.Array,
    params: Any,
    choice_temperature: jnp.ndarray,
    temperature: jnp.ndarray,
    order_score: jnp.ndarray | None,
    *,
    tokens_to_logits: TokensToLogits,
    mask_token_id: int,
    num_steps: int,
    start_step: int,
    schedule: str,
    per_row_keys: bool,
    return_all_steps: bool,
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The traced loop of `decode`, for callers already inside `jax.jit` (no checks here).

    Temperatures are traced scalars and `order_score` a traced [L] array or None
    (confidence); `per_row_keys` says whether `rng` is one key or one per row. See `decode`.
    """
    inputs = inputs.astype(jnp.int32)
    # Per row: the count the schedule is applied to (rows may differ when editing).
    unknown_at_start = jnp.sum(inputs == mask_token_id, axis=-1, keepdims=True)

    def body(step: jnp.ndarray, state: DecodeState) -> DecodeState:
        rng, sample_rng = _split_keys(state.rng, per_row_keys)
        logits = tokens_to_logits(params, state.seqs)
        sampled = _categorical(sample_rng, logits / temperature, per_row_keys)
        unknown_map = state.seqs == mask_token_id
        sampled = jnp.where(unknown_map, sampled, state.seqs).astype(jnp.int32)

        ratio = (step + 1).astype(jnp.float32) / num_steps
        gamma = mask_schedule.schedule(ratio, unknown_at_start, schedule)
        mask_len = jnp.floor(unknown_at_start * gamma).astype(jnp.int32)
        still_unknown = jnp.sum(unknown_map, axis=-1, keepdims=True)
        mask_len = jnp.maximum(1, jnp.minimum(still_unknown - 1, mask_len))

        rng, choice_rng = _split_keys(rng, per_row_keys)
        if order_score is None:
            # Confidence: the sampled token's probability under the un-tempered model softmax,
            # as in the authors' sampler (which has no sampling temperature, i.e. 1).
            probs = jax.nn.softmax(logits, axis=-1)
            safe_ids = jnp.clip(sampled, 0, logits.shape[-1] - 1)  # Known ids may be out of range.
            selected = jnp.take_along_axis(probs, safe_ids[..., None], axis=-1)[..., 0]
            # Annealed linearly from the initial value each step (not compounded across steps).
            tau = choice_temperature * (1.0 - ratio)
            score = jnp.log(selected) + tau * _gumbel(choice_rng, selected.shape, per_row_keys)
        else:
            # A fixed order: the unknown positions latest in it (lowest score) stay masked.
            score = jnp.broadcast_to(order_score, state.seqs.shape)
        score = jnp.where(unknown_map, score, _KNOWN_CONFIDENCE)
        masking = _below_cut_off(score, mask_len)

        all_steps = state.all_steps
        if all_steps is not None:
            all_steps = jax.lax.dynamic_update_slice(all_steps, sampled[:, None, :], (0, step, 0))
        return DecodeState(
            seqs=jnp.where(masking, mask_token_id, sampled),
            rng=rng,
            sampled=sampled,
            all_steps=all_steps,
        )

    all_steps0 = None
    if return_all_steps:
        # Steps before start_step are never run; like the authors' final_seqs they hold inputs.
        all_steps0 = jnp.tile(inputs[:, None, :], (1, num_steps, 1))
    state = DecodeState(seqs=inputs, rng=rng, sampled=inputs, all_steps=all_steps0)
    state = jax.lax.fori_loop(start_step, num_steps, body, state)
    return state.sampled, state.all_steps


_decode_jit = jax.jit(
    decode_loop,
    static_argnames=(
        "tokens_to_logits",
        "mask_token_id",
        "num_steps",
        "start_step",
        "schedule",
        "per_row_keys",
        "return_all_steps",
    ),
)


def _is_key_batch(rng: Any, batch: int) -> bool:
    """Whether `rng` is one key (False) or one key per row of a batch of `batch` (True)."""
    shape = np.shape(rng)
    typed = hasattr(rng, "dtype") and jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    key_shape = () if typed else (2,)
    if shape == key_shape:
        return False
    if shape == (batch, *key_shape):
        return True
    raise ValueError(
        f"rng must be one PRNG key or one per row ({batch} keys); got an array of shape {shape}."
    )


def decode(
    inputs: jnp.ndarray,
    rng: jax.Array,
    tokens_to_logits: TokensToLogits,
    params: Any = None,
    *,
    mask_token_id: int,
    options: DecodeOptions,
    order_score: jnp.ndarray | None = None,
    return_all_steps: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Fills the `mask_token_id` positions of `inputs` [B, L] by MaskGIT parallel decoding.

    Args:
        inputs: int [B, L]; `mask_token_id` marks unknown positions, all others (class token,
            kept regions when editing) are returned unchanged.
        rng: one PRNG key, from which the whole batch's noise is drawn (as the authors'
            decoder does), or a batch of keys [B], one per row: row i then depends only on
            its key and its inputs, not on the batch it is decoded in.
        tokens_to_logits: `(params, ids [B, L]) -> logits [B, L, V]` over the token ids that
            may be sampled (see `decoding.logits`). Static: pass the same function object
            each call to avoid recompiling.
        params: pytree handed to `tokens_to_logits` as a traced argument (may be None).
        mask_token_id: id marking unknown tokens (the released code uses -1).
        options: steps, start step, schedule, temperatures and ordering (guidance, top-k and
            dtype are `tokens_to_logits`'s business).
        order_score: float [L], required by fixed orderings: the positions kept masked after
            a step are the unknown ones with the lowest score (see `orders.order_score`).
        return_all_steps: also return the tokens sampled at every step.

    Returns:
        int32 [B, L]: the tokens sampled in the last step (no mask id remains). With
        `return_all_steps`, also int32 [B, T, L]: the tokens sampled at step t (before that
        step's re-masking) in row t; rows t < start_step hold `inputs`.
    """
    if not isinstance(options, DecodeOptions):
        raise ValueError(f"options must be a DecodeOptions; got {type(options).__name__}.")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int | np.integer):
        raise ValueError(f"mask_token_id must be an int, got {mask_token_id!r}.")
    shape = np.shape(inputs)
    dtype = inputs.dtype if hasattr(inputs, "dtype") else np.asarray(inputs).dtype
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"inputs must be a 2-D integer array [batch, length], got shape {shape} "
            f"and dtype {dtype}."
        )
    if not callable(tokens_to_logits):
        raise ValueError("tokens_to_logits must be callable as tokens_to_logits(params, ids).")
    fixed_order = options.ordering != "confidence"
    if fixed_order != (order_score is not None):
        raise ValueError(
            f"ordering={options.ordering!r} "
            + ("needs an order_score [L]." if fixed_order else "takes no order_score.")
        )
    if order_score is not None and np.shape(order_score) != shape[1:]:
        raise ValueError(f"order_score must have shape [{shape[1]}]; got {np.shape(order_score)}.")
    per_row_keys = _is_key_batch(rng, shape[0])

    final, all_steps = _decode_jit(
        jnp.asarray(inputs),
        rng,
        params,
        jnp.asarray(options.choice_temperature, jnp.float32),
        jnp.asarray(options.temperature, jnp.float32),
        None if order_score is None else jnp.asarray(order_score, jnp.float32),
        tokens_to_logits=tokens_to_logits,
        mask_token_id=int(mask_token_id),
        num_steps=options.num_steps,
        start_step=options.start_step,
        schedule=options.schedule,
        per_row_keys=per_row_keys,
        return_all_steps=bool(return_all_steps),
    )
    if return_all_steps:
        return final, all_steps
    return final


def cache_size() -> int:
    """Returns how many programs the decoder has compiled (to check that calls reuse one)."""
    return _decode_jit._cache_size()
