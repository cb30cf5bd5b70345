"""The hashed dropout mask: its rate, independence across keys and neighbours, and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from maskgit_jax.models.dropout import dropout, keep_mask

SHAPE = (64, 257, 64)  # ~1.05M elements


def _sigmas(observed: float, expected: float, count: int) -> float:
    """How many binomial standard deviations `observed` lies from `expected`."""
    return abs(observed - expected) / np.sqrt(expected * (1 - expected) / count)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_mask_keeps_one_minus_rate_of_the_elements(rate):
    mask = np.asarray(keep_mask(jax.random.PRNGKey(3), SHAPE, rate))
    assert mask.shape == SHAPE and mask.dtype == bool
    assert _sigmas(mask.mean(), 1 - rate, mask.size) < 5
    # Every row and every column position sees about the same rate (no striping by index).
    per_row = mask.reshape(SHAPE[0], -1).mean(axis=1)
    assert np.abs(per_row - (1 - rate)).max() < 0.02
    per_column = mask.reshape(SHAPE[0], -1).mean(axis=0)
    assert _sigmas(per_column.mean(), 1 - rate, mask.size) < 5
    assert per_column.std() < 2 * np.sqrt(rate * (1 - rate) / SHAPE[0])


def test_masks_of_different_keys_and_neighbouring_elements_are_uncorrelated():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    masks = [np.asarray(keep_mask(k, SHAPE, 0.5)).ravel().astype(np.float64) for k in keys]
    count = masks[0].size
    bound = 5 / np.sqrt(count)  # five standard errors of a correlation of independent bits
    assert abs(np.corrcoef(masks[0], masks[1])[0, 1]) < bound
    assert abs(np.corrcoef(masks[1], masks[2])[0, 1]) < bound
    flat = masks[0]
    for lag in (1, SHAPE[-1], SHAPE[-1] * SHAPE[-2]):  # next element, next row of each axis
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < bound


def test_same_key_gives_the_same_mask_and_a_new_key_another():
    key = jax.random.PRNGKey(7)
    first = np.asarray(keep_mask(key, (8, 100), 0.3))
    np.testing.assert_array_equal(first, np.asarray(keep_mask(key, (8, 100), 0.3)))
    other = np.asarray(keep_mask(jax.random.fold_in(key, 1), (8, 100), 0.3))
    assert (first != other).mean() > 0.2


def test_dropout_scales_kept_values_and_preserves_the_mean():
    x = jnp.full((32, 257, 96), 2.0, jnp.float32)
    out = np.asarray(dropout(x, 0.25, jax.random.PRNGKey(1)))
    assert set(np.unique(out)) == {0.0, np.float32(2.0 / 0.75)}
    assert abs(out.mean() - 2.0) < 0.02


def test_dropout_without_a_key_or_rate_is_the_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    assert dropout(x, 0.5, None) is x
    assert dropout(x, 0.0, jax.random.PRNGKey(0)) is x


def test_broadcast_dims_share_the_mask_along_those_axes():
    x = jnp.ones((6, 50, 40))
    out = np.asarray(dropout(x, 0.5, jax.random.PRNGKey(2), broadcast_dims=(0, -1)))
    zero = out == 0
    assert (zero == zero[:1, :, :1]).all()
    assert 0 < zero[0, :, 0].sum() < 50


def test_bf16_input_keeps_its_dtype():
    x = jnp.ones((4, 300), jnp.bfloat16)
    assert dropout(x, 0.1, jax.random.PRNGKey(0)).dtype == jnp.bfloat16


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_rates_outside_zero_to_one_are_rejected(rate):
    with pytest.raises(ValueError, match="dropout rate"):
        keep_mask(jax.random.PRNGKey(0), (4, 4), rate)


def test_a_sharded_mask_equals_the_unsharded_one():
    devices = np.array(jax.devices()[:4])  # conftest gives 8 CPU devices
    mesh = jax.sharding.Mesh(devices.reshape(2, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "model"))
    key = jax.random.PRNGKey(5)
    shape = (8, 33, 64)
    sharded = jax.jit(lambda k: keep_mask(k, shape, 0.2), out_shardings=sharding)(key)
    assert sharded.sharding == sharding
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(keep_mask(key, shape, 0.2)))
