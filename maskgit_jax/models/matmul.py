"""Matmul with compute-dtype operands and float32 accumulation, forward and backward.

Autodiff of `dot(x.astype(bf16), w.astype(bf16), preferred_element_type=f32)` multiplies the
float32 cotangent by a bf16 operand, so both backward matmuls run in float32 (XLA converts the
bf16 side up). `matmul` casts the cotangent to the compute dtype as well, so all three matmuls
of a projection take bf16 operands with float32 accumulation (the standard mixed-precision
recipe), and it keeps bf16 residuals. In float32 it is the same arithmetic as autodiff.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul(
    x: Array, kernel: Array, dtype: Any = jnp.float32, *, kernel_transposed: bool = False
) -> Array:
    """Returns x [..., K] @ kernel [K, M] (or kernel [M, K], transposed) as float32 [..., M].

    Operands, and in the backward pass the cotangent, are cast to `dtype`. Leading axes are
    folded to [rows, length] so a bf16 weight gradient contracts two axes straight into the
    kernel's own layout: forms XLA:CPU keeps on its bf16 matmul path (a single contracted row
    axis, or a gradient transposed afterwards, is turned into a float32 or unsupported dot).
    float32 weight gradients contract one flattened axis instead (`_weight_gradient`).
    """
    *lead, features = x.shape
    rows, length = (lead[0], math.prod(lead[1:])) if len(lead) >= 2 else (1, math.prod(lead))
    folded = x.reshape(rows, length, features)
    fn = _matmul_fn(jnp.dtype(dtype), x.dtype, kernel.dtype, kernel_transposed)
    y = fn(folded, kernel)
    return y.reshape(*lead, y.shape[-1])


def _dot(x: Array, kernel: Array, kernel_contracting: int) -> Array:
    return jax.lax.dot_general(
        x, kernel, (((2,), (kernel_contracting,)), ((), ())), preferred_element_type=jnp.float32
    )


def _weight_gradient(left: Array, right: Array) -> Array:
    """The kernel gradient: left [R, L, F] and right [R, L, M] contracted over R and L -> [F, M].

    bf16 operands contract both leading axes (XLA:CPU's bf16 matmul path, see `matmul`).
    float32 operands are flattened to 2-D first: with two contracted axes XLA:CPU wrote the
    left operand transposed inside its producer's fusion (the GELU's), a strided write that
    cost more than the layer's matmuls; flat, the digits train step (batch 64) runs 0.219 ->
    0.180 s (`benchmarks/train_speed.py --config=configs/digits.py`).
    """
    if left.dtype == jnp.float32:
        left, right = (x.reshape(-1, x.shape[-1]) for x in (left, right))
        dims = (((0,), (0,)), ((), ()))
    else:
        dims = (((0, 1), (0, 1)), ((), ()))
    return jax.lax.dot_general(left, right, dims, preferred_element_type=jnp.float32)


@functools.cache
def _matmul_fn(dtype: jnp.dtype, x_dtype: jnp.dtype, kernel_dtype: jnp.dtype, transposed: bool):
    """The custom-VJP matmul for one (compute, input, kernel) dtype triple and kernel layout."""
    kernel_in, kernel_out = (1, 0) if transposed else (0, 1)

    @jax.custom_vjp
    def fn(x, kernel):
        return _dot(x.astype(dtype), kernel.astype(dtype), kernel_in)

    def forward(x, kernel):
        x_c, kernel_c = x.astype(dtype), kernel.astype(dtype)
        return _dot(x_c, kernel_c, kernel_in), (x_c, kernel_c)

    def backward(residuals, grad):
        x_c, kernel_c = residuals
        grad_c = grad.astype(dtype)
        grad_x = _dot(grad_c, kernel_c, kernel_out)
        operands = (grad_c, x_c) if transposed else (x_c, grad_c)
        grad_kernel = _weight_gradient(*operands)
        return grad_x.astype(x_dtype), grad_kernel.astype(kernel_dtype)

    fn.defvjp(forward, backward)
    return fn
