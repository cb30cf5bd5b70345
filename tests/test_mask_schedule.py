import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.decoding import mask_schedule

N = 256
ALL = list(mask_schedule.SCHEDULES) + ["pow0.5", "pow2.5"]


def gamma(method, r, n=N):
    return np.asarray(mask_schedule.schedule(jnp.asarray(r, jnp.float32), n, method))


@pytest.mark.parametrize("method", ALL)
def test_range_monotone_and_endpoint(method):
    r = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    g = gamma(method, r)
    assert g.shape == r.shape
    assert np.all(np.isfinite(g))
    assert np.all((g >= 0.0) & (g <= 1.0))
    assert np.all(np.diff(g) <= 1e-6), "gamma must be non-increasing in r"
    assert g[-1] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "method", ["cosine", "linear", "square", "cubic", "log", "arccos", "pow2.5"]
)
def test_fully_masked_at_zero(method):
    assert gamma(method, 0.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "method,r,expected",
    [
        ("cosine", 0.5, math.cos(math.pi / 4)),
        ("cosine", 1 / 3, math.cos(math.pi / 6)),
        ("linear", 0.25, 0.75),
        ("square", 0.5, 0.75),
        ("cubic", 0.5, 0.875),
        ("pow2.5", 0.5, 1 - 0.5**2.5),
        ("pow0.5", 0.25, 0.5),
        ("arccos", 0.5, math.acos(0.5) / (math.pi / 2)),
        ("arccos", math.sqrt(0.5), 0.5),
        # log: -log2(r) / log2(N); equals 1 at r = 1/N and 1/2 at r = 1/sqrt(N).
        ("log", 0.5, 1 / 8),
        ("log", 1 / 16, 0.5),
        ("log", 1 / 256, 1.0),
        # exp: 1 - 2^(-log2(N) (1 - r)) = 1 - N^(r - 1).
        ("exp", 0.0, 1 - 1 / 256),
        ("exp", 0.5, 1 - 1 / 16),
        ("exp", 0.75, 0.75),
    ],
)
def test_known_values(method, r, expected):
    assert gamma(method, r) == pytest.approx(expected, abs=1e-6)


def test_log_clipped_to_one_below_one_over_n():
    assert gamma("log", 1e-4) == pytest.approx(1.0)
    assert gamma("log", 0.0) == pytest.approx(1.0)


def test_num_tokens_broadcasts_per_row():
    n = jnp.array([[16], [256]])
    g = np.asarray(mask_schedule.schedule(jnp.float32(0.5), n, "log"))
    np.testing.assert_allclose(g, [[0.25], [0.125]], atol=1e-6)
    # Degenerate counts give finite values (no NaN) rather than dividing by log2(1) = 0.
    for method in ("log", "exp"):
        g = np.asarray(mask_schedule.schedule(jnp.array([0.0, 0.5, 1.0]), 1, method))
        assert np.all(np.isfinite(g))


def test_scalar_and_jit():
    g = mask_schedule.schedule(0.5, N, "cosine")
    assert jnp.shape(g) == ()
    f = jax.jit(lambda r: mask_schedule.schedule(r, N, "cosine"))
    assert float(f(0.5)) == pytest.approx(math.cos(math.pi / 4), abs=1e-6)


@pytest.mark.parametrize("method", ["bogus", "pow", "pow-1", "powx", "Cosine", ""])
def test_unknown_method_raises_listing_valid(method):
    with pytest.raises(ValueError, match="cosine"):
        mask_schedule.schedule(0.5, N, method)
