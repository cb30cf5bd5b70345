"""MaskGIT parallel (iterative) decoding, following the authors' released sampler step by step.

Each step samples every masked position, then re-masks the least confident of the new tokens,
fewer each step as the mask schedule prescribes, with annealed Gumbel noise on the choice.

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


def _mask_by_random_topk(
    rng: jax.Array, mask_len: jnp.ndarray, probs: jnp.ndarray, tau: jnp.ndarray
) -> jnp.ndarray:
    """Returns True where log(p) + tau * Gumbel is below its `mask_len`-th smallest value per row.

    The cut-off of a sort (not top_k) is the authors' selection: exactly `mask_len` entries fall
    below it barring exact ties, and +inf (known) entries never do.
    """
    confidence = jnp.log(probs) + tau * jax.random.gumbel(rng, probs.shape)
    sorted_confidence = jnp.sort(confidence, axis=-1)
    index = jnp.clip(mask_len, 0, probs.shape[-1] - 1)
    cut_off = jnp.take_along_axis(sorted_confidence, index, axis=-1)
    return confidence < cut_off


def _decode_impl(
    inputs: jnp.ndarray,
    rng: jax.Array,
    params: Any,
    choice_temperature: jnp.ndarray,
    temperature: jnp.ndarray,
    *,
    tokens_to_logits: TokensToLogits,
    mask_token_id: int,
    num_steps: int,
    start_step: int,
    schedule: str,
    return_all_steps: bool,
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Traced body of `decode`; see there for the arguments."""
    inputs = inputs.astype(jnp.int32)
    # Per row: the count the schedule is applied to (rows may differ when editing).
    unknown_at_start = jnp.sum(inputs == mask_token_id, axis=-1, keepdims=True)

    def body(step: jnp.ndarray, state: DecodeState) -> DecodeState:
        rng, sample_rng = jax.random.split(state.rng)
        logits = tokens_to_logits(params, state.seqs)
        sampled = jax.random.categorical(sample_rng, logits / temperature, axis=-1)
        unknown_map = state.seqs == mask_token_id
        sampled = jnp.where(unknown_map, sampled, state.seqs).astype(jnp.int32)

        # Confidence: the sampled token's probability under the un-tempered model softmax, as
        # in the authors' sampler (which has no sampling temperature, i.e. temperature 1).
        probs = jax.nn.softmax(logits, axis=-1)
        safe_ids = jnp.clip(sampled, 0, logits.shape[-1] - 1)  # Known ids may be out of range.
        selected = jnp.take_along_axis(probs, safe_ids[..., None], axis=-1)[..., 0]
        selected = jnp.where(unknown_map, selected, _KNOWN_CONFIDENCE)

        ratio = (step + 1).astype(jnp.float32) / num_steps
        gamma = mask_schedule.schedule(ratio, unknown_at_start, schedule)
        mask_len = jnp.floor(unknown_at_start * gamma).astype(jnp.int32)
        still_unknown = jnp.sum(unknown_map, axis=-1, keepdims=True)
        mask_len = jnp.maximum(1, jnp.minimum(still_unknown - 1, mask_len))

        rng, choice_rng = jax.random.split(rng)
        # Annealed linearly from the initial value each step (not compounded across steps).
        tau = choice_temperature * (1.0 - ratio)
        masking = _mask_by_random_topk(choice_rng, mask_len, selected, tau)

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
    _decode_impl,
    static_argnames=(
        "tokens_to_logits",
        "mask_token_id",
        "num_steps",
        "start_step",
        "schedule",
        "return_all_steps",
    ),
)


def _check_scalar(name: str, value: Any, *, allow_zero: bool) -> None:
    """Raises ValueError if a concrete scalar `value` is not > 0 (or >= 0); skips tracers."""
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be a real scalar, got {value!r}.")
    v = float(array)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {v}.")


def decode(
    inputs: jnp.ndarray,
    rng: jax.Array,
    tokens_to_logits: TokensToLogits,
    params: Any = None,
    *,
    mask_token_id: int,
    num_steps: int,
    start_step: int = 0,
    choice_temperature: float = 4.5,
    schedule: str = "cosine",
    temperature: float = 1.0,
    return_all_steps: bool = False,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Fills the `mask_token_id` positions of `inputs` [B, L] by MaskGIT parallel decoding.

    Args:
        inputs: int [B, L]; `mask_token_id` marks unknown positions, all others (class token,
            kept regions when editing) are returned unchanged.
        rng: PRNG key; the output is a deterministic function of it.
        tokens_to_logits: `(params, ids [B, L]) -> logits [B, L, V]` over the token ids that
            may be sampled (slice the codebook logits off a model's full vocabulary). Static:
            pass the same function object each call to avoid recompiling.
        params: pytree handed to `tokens_to_logits` as a traced argument (may be None).
        mask_token_id: id marking unknown tokens (the released code uses -1).
        num_steps: decoding steps T; the schedule runs over ratios (t + 1) / T.
        start_step: first step run (editing starts part-way, e.g. 2 of 12); in [0, T).
        choice_temperature: initial Gumbel scale of the re-masking choice, annealed to 0.
        schedule: mask schedule name (`mask_schedule.SCHEDULES` or "pow<k>").
        temperature: softmax temperature of token sampling (> 0; 1 is the authors' sampler).
        return_all_steps: also return the tokens sampled at every step.

    Returns:
        int32 [B, L]: the tokens sampled in the last step (no mask id remains). With
        `return_all_steps`, also int32 [B, T, L]: the tokens sampled at step t (before that
        step's re-masking) in row t; rows t < start_step hold `inputs`.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer):
        raise ValueError(f"num_steps must be an int, got {num_steps!r}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if isinstance(start_step, bool) or not isinstance(start_step, int | np.integer):
        raise ValueError(f"start_step must be an int, got {start_step!r}.")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}), got {start_step}.")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int | np.integer):
        raise ValueError(f"mask_token_id must be an int, got {mask_token_id!r}.")
    shape = np.shape(inputs)
    dtype = inputs.dtype if hasattr(inputs, "dtype") else np.asarray(inputs).dtype
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"inputs must be a 2-D integer array [batch, length], got shape {shape} "
            f"and dtype {dtype}."
        )
    _check_scalar("temperature", temperature, allow_zero=False)
    _check_scalar("choice_temperature", choice_temperature, allow_zero=True)
    mask_schedule.validate(schedule)
    if not callable(tokens_to_logits):
        raise ValueError("tokens_to_logits must be callable as tokens_to_logits(params, ids).")

    final, all_steps = _decode_jit(
        jnp.asarray(inputs),
        rng,
        params,
        jnp.asarray(choice_temperature, jnp.float32),
        jnp.asarray(temperature, jnp.float32),
        tokens_to_logits=tokens_to_logits,
        mask_token_id=int(mask_token_id),
        num_steps=int(num_steps),
        start_step=int(start_step),
        schedule=schedule,
        return_all_steps=bool(return_all_steps),
    )
    if return_all_steps:
        return final, all_steps
    return final


def cache_size() -> int:
    """Returns how many programs the decoder has compiled (to check that calls reuse one)."""
    return _decode_jit._cache_size()
