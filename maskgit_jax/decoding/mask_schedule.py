"""Mask schedules gamma(r): the fraction of tokens kept masked at progress ratio r in [0, 1].

Shared by training (the mask ratio of each example) and parallel decoding (how many tokens stay
masked after each step). Every schedule is non-increasing in r, is 0 at r = 1 and is clipped
to [0, 1] (the log schedule exceeds 1 for r < 1/N and is +inf at r = 0).
"""

import math

import jax.numpy as jnp

# Named schedules; "pow<k>" (for example "pow2.5") is also accepted for a power schedule 1 - r^k.
SCHEDULES = ("cosine", "linear", "square", "cubic", "log", "exp", "arccos")

_POWER_PREFIX = "pow"


def cosine(ratio: jnp.ndarray) -> jnp.ndarray:
    """cos(pi r / 2): the paper's default (best FID in its ablation)."""
    return jnp.cos(math.pi / 2.0 * ratio)


def power(ratio: jnp.ndarray, exponent: float) -> jnp.ndarray:
    """1 - r^k: linear (k=1), square (k=2), cubic (k=3) or any positive exponent."""
    return 1.0 - ratio**exponent


def log(ratio: jnp.ndarray, num_tokens: jnp.ndarray) -> jnp.ndarray:
    """-log2(r) / log2(N); N is clamped to >= 2 so that degenerate counts give no NaN."""
    n = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 2.0)
    return -jnp.log2(ratio) / jnp.log2(n)


def exp(ratio: jnp.ndarray, num_tokens: jnp.ndarray) -> jnp.ndarray:
    """1 - 2^(-log2(N) (1 - r)) = 1 - N^(r - 1); N is clamped to >= 1 (then gamma = 0)."""
    n = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
    return 1.0 - jnp.exp2(-jnp.log2(n) * (1.0 - ratio))


def arccos(ratio: jnp.ndarray) -> jnp.ndarray:
    """Arc-cosine schedule 2 acos(r) / pi: the inverse function of the cosine schedule.

    It reveals tokens faster than cosine early on and slower near the end.
    """
    return jnp.arccos(ratio) / (math.pi / 2.0)


def _power_exponent(method: str) -> float | None:
    """Returns k for a "pow<k>" method name with k > 0, else None."""
    if not method.startswith(_POWER_PREFIX):
        return None
    try:
        k = float(method[len(_POWER_PREFIX) :])
    except ValueError:
        return None
    return k if math.isfinite(k) and k > 0 else None


def validate(method: str) -> None:
    """Raises ValueError, naming the valid choices, when `method` is not a known schedule."""
    if not isinstance(method, str) or (method not in SCHEDULES and _power_exponent(method) is None):
        raise ValueError(
            f"Unknown mask schedule {method!r}; valid: {', '.join(SCHEDULES)}, "
            f"or '{_POWER_PREFIX}<k>' with k > 0 (e.g. 'pow2.5')."
        )


def schedule(ratio: jnp.ndarray | float, num_tokens: jnp.ndarray | int, method: str) -> jnp.ndarray:
    """Returns gamma(ratio) in [0, 1] for schedule `method`, broadcast over ratio and num_tokens.

    `num_tokens` (N, the number of tokens the schedule applies to; an array is allowed, e.g.
    one count per row) is only read by the "log" and "exp" schedules.
    """
    validate(method)
    ratio = jnp.asarray(ratio, jnp.float32)
    if method == "cosine":
        gamma = cosine(ratio)
    elif method == "linear":
        gamma = power(ratio, 1.0)
    elif method == "square":
        gamma = power(ratio, 2.0)
    elif method == "cubic":
        gamma = power(ratio, 3.0)
    elif method == "log":
        gamma = log(ratio, num_tokens)
    elif method == "exp":
        gamma = exp(ratio, num_tokens)
    elif method == "arccos":
        gamma = arccos(ratio)
    else:
        gamma = power(ratio, _power_exponent(method))
    return jnp.clip(gamma, 0.0, 1.0)
