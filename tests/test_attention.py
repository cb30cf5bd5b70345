"""The blocked attention core: one function whatever the blocks, with autodiff's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.models import attention

BATCH, LENGTH, HEADS, DEPTH = 4, 9, 6, 5
DROPOUT_RATE = 0.2
# One block; blocks of 1 example x 3 heads; 2 examples x 6 heads (bytes of float32 scores).
BLOCK_BUDGETS = [None, 3 * 4 * LENGTH * LENGTH, 12 * 4 * LENGTH * LENGTH]


def _reference(q, k, v, allowed, keep, dtype):
    """softmax(q k^T) v written plainly, differentiated by autodiff."""
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if keep is not None:
        probs = probs * jnp.where(keep, 1.0 / (1.0 - DROPOUT_RATE), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v, preferred_element_type=jnp.float32)


def _inputs():
    shape = (BATCH, LENGTH, HEADS, DEPTH)
    q, k, v, cotangent = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(4))
    keep = jax.random.bernoulli(jax.random.PRNGKey(5), 1.0 - DROPOUT_RATE, (HEADS, LENGTH, LENGTH))
    causal = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))
    return (q, k, v), cotangent, keep, causal


def _value_and_grads(fn, qkv, cotangent):
    out, vjp = jax.vjp(fn, *qkv)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize("block_bytes", BLOCK_BUDGETS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
def test_float32_output_and_gradients_are_autodiffs(block_bytes, masked, dropped):
    qkv, cotangent, keep, causal = _inputs()
    allowed, keep = (causal if masked else None), (keep if dropped else None)

    def ours(q, k, v):
        return attention.multi_head_attention(
            q,
            k,
            v,
            block_bytes=block_bytes,
            allowed=allowed,
            dropout_keep=keep,
            dropout_rate=DROPOUT_RATE,
        )

    got = _value_and_grads(ours, qkv, cotangent)
    want = _value_and_grads(
        lambda q, k, v: _reference(q, k, v, allowed, keep, jnp.float32), qkv, cotangent
    )
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_bytes", BLOCK_BUDGETS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("score_scale", [1.0, 40.0])
def test_output_without_gradients_is_the_reference(block_bytes, masked, dropped, score_scale):
    """Without a gradient (bf16: normalised after the value matmul) it is the same function.

    float32 within rounding; bf16 within the rounding of its probabilities (the reference
    takes the same bf16 q, k, v); scores up to hundreds stay finite (each row's maximum is
    subtracted before exp).
    """
    (q, k, v), _, keep, causal = _inputs()
    q = q * score_scale
    allowed, keep = (causal if masked else None), (keep if dropped else None)
    # bf16: probabilities rounded at different points (largest seen: 0.22% of the output).
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 5e-3)):
        want = _reference(q, k, v, allowed, keep, dtype)
        got = jax.jit(
            lambda q, k, v, dtype=dtype: attention.multi_head_attention(
                q,
                k,
                v,
                dtype=dtype,
                block_bytes=block_bytes,
                allowed=allowed,
                dropout_keep=keep,
                dropout_rate=DROPOUT_RATE,
            )
        )(q, k, v)
        assert got.shape == want.shape and got.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(got)))
        relative = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        assert relative < tolerance, (dtype, relative)


@pytest.mark.parametrize("block_bytes", BLOCK_BUDGETS)
def test_bfloat16_gradients_track_float32(block_bytes):
    qkv, cotangent, keep, _ = _inputs()

    def ours(dtype):
        return lambda q, k, v: attention.multi_head_attention(
            q,
            k,
            v,
            dtype=dtype,
            block_bytes=block_bytes,
            dropout_keep=keep,
            dropout_rate=DROPOUT_RATE,
        )

    bf16 = _value_and_grads(ours(jnp.bfloat16), qkv, cotangent)
    fp32 = _value_and_grads(ours(jnp.float32), qkv, cotangent)
    for low, high in zip(bf16, fp32, strict=True):
        assert low.dtype == jnp.float32  # the cotangents reach the projections in float32
        relative = float(jnp.abs(low - high).max() / jnp.abs(high).max())
        assert relative < 0.02


def test_dropout_mask_is_shared_by_examples_and_blocks():
    qkv, _, keep, _ = _inputs()
    same = tuple(jnp.broadcast_to(x[:1], x.shape) for x in qkv)  # four copies of one example
    outputs = [
        attention.multi_head_attention(
            *same, block_bytes=budget, dropout_keep=keep, dropout_rate=DROPOUT_RATE
        )
        for budget in BLOCK_BUDGETS
    ]
    for out in outputs:
        np.testing.assert_allclose(out, jnp.broadcast_to(out[:1], out.shape), rtol=1e-6)
        np.testing.assert_allclose(out, outputs[0], rtol=1e-5, atol=1e-6)
    undropped = attention.multi_head_attention(*same)
    assert float(jnp.abs(outputs[0] - undropped).max()) > 1e-3
