"""The custom-VJP matmul: float32 gradients are autodiff's, bf16 gradients track them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.models.matmul import matmul


def _inputs(shape, features, transposed):
    x = jax.random.normal(jax.random.PRNGKey(0), (*shape, features[0]))
    kernel_shape = features[::-1] if transposed else features
    kernel = jax.random.normal(jax.random.PRNGKey(1), kernel_shape) / np.sqrt(features[0])
    weights = jax.random.normal(jax.random.PRNGKey(2), (*shape, features[1]))
    return x, kernel, weights


def _reference(x, kernel, transposed):
    return x @ (kernel.T if transposed else kernel)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(6,), (3, 5), (2, 3, 4)])
def test_float32_matches_autodiff(shape, transposed):
    x, kernel, weights = _inputs(shape, (8, 12), transposed)

    def loss(fn):
        return lambda x, kernel: jnp.sum(fn(x, kernel) * weights)

    ours = jax.grad(loss(lambda x, k: matmul(x, k, kernel_transposed=transposed)), (0, 1))
    plain = jax.grad(loss(lambda x, k: _reference(x, k, transposed)), (0, 1))
    np.testing.assert_allclose(
        matmul(x, kernel, kernel_transposed=transposed),
        _reference(x, kernel, transposed),
        rtol=1e-5,
        atol=1e-5,
    )
    for got, want in zip(ours(x, kernel), plain(x, kernel), strict=True):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_bfloat16_gradients_track_float32(transposed):
    x, kernel, weights = _inputs((4, 16), (64, 32), transposed)

    def grads(dtype):
        def loss(x, k):
            return jnp.sum(matmul(x, k, dtype, kernel_transposed=transposed) * weights)

        return jax.grad(loss, (0, 1))(x, kernel)

    for got, want in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        # Parameters and inputs keep their float32 dtype; only the arithmetic is bf16.
        assert got.dtype == jnp.float32
        relative = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
        assert 0 < relative < 2e-2
