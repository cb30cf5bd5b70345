"""Multi-head attention core, computed the way each backend runs it fastest.

Three implementations of the same function, softmax(q k^T) v (`IMPLEMENTATIONS`):
- "einsum": blocks of (examples, heads) whose float32 score block stays near `block_bytes`: on
  CPU a [B, H, L, L] score tensor of a large batch falls out of cache (batch 64 ran at half the
  per-image speed of batch 8), while 2 MiB blocks keep every batch size at its best;
- "cudnn": `jax.nn.dot_product_attention` on cuDNN's fused flash attention (GPU, bf16/fp16);
  where cuDNN declines the call (no cuDNN, float32, an unsupported shape) it runs as "xla";
- "xla": `jax.nn.dot_product_attention` as XLA compiles it (its default on every backend).
The fused two take no dropout on the probabilities, so with attention dropout (training) the
einsum core runs whatever the choice.
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array

EINSUM, XLA, CUDNN = "einsum", "xla", "cudnn"
IMPLEMENTATIONS = (EINSUM, XLA, CUDNN)
# Set to one of IMPLEMENTATIONS, it replaces the backend's choice in `default_attention` (to
# compare them in the real programs, or to leave a GPU's cuDNN kernel out).
OVERRIDE_VARIABLE = "MASKGIT_JAX_ATTENTION"
# Each backend's fastest implementation (XLA's attention where not listed).
_BACKEND_IMPLEMENTATIONS = {"cpu": EINSUM, "gpu": CUDNN, "cuda": CUDNN}
# The compute dtypes cuDNN's fused attention takes.
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Float32 scores per block on CPU: 8 (example, head) pairs of 257 x 257 (2.1 MB). Measured
# with benchmarks/attention_blocks.py on a 2-core Xeon: blocks of 2-4 heads x 2-4 examples
# beat one [64, 16, 257, 257] block by 2-3x per image and match the best batch-8 blocking.
CPU_BLOCK_BYTES = 8 * 257 * 257 * 4
# At most this many heads per block; with room to spare, blocks take more examples instead.
MAX_HEADS_PER_BLOCK = 4


def default_attention(backend: str | None = None) -> dict[str, Any]:
    """The attention settings of `MaskedTransformer` that are fastest on `backend`.

    CPU: byte-sized blocks of the einsum core. GPU: cuDNN's fused attention; TPU: XLA's
    (`jax.nn.dot_product_attention`), each wherever no attention dropout is applied, and one
    einsum block where it is. `OVERRIDE_VARIABLE`, where set, names the implementation instead.
    """
    backend = backend or jax.default_backend()
    implementation = os.environ.get(OVERRIDE_VARIABLE) or _BACKEND_IMPLEMENTATIONS.get(backend, XLA)
    if implementation not in IMPLEMENTATIONS:
        # Not a ValueError: loaders report those as a config that cannot build the model.
        raise RuntimeError(
            f"{OVERRIDE_VARIABLE}={implementation!r} names no attention implementation; "
            f"expected one of {IMPLEMENTATIONS}."
        )
    block_bytes = CPU_BLOCK_BYTES if backend == "cpu" else None
    return {"attention_block_bytes": block_bytes, "attention_implementation": implementation}


def block_shape(
    batch: int, num_heads: int, queries: int, keys: int, block_bytes: int | None
) -> tuple[int, int]:
    """(examples, heads) per block so that its float32 scores fit in `block_bytes`.

    None: the whole batch and all heads in one block. Heads are blocked first (up to
    MAX_HEADS_PER_BLOCK), then examples fill what the budget leaves; both divide their axis.
    """
    if block_bytes is None:
        return batch, num_heads
    pairs = max(1, block_bytes // (4 * queries * keys))
    heads = largest_divisor_at_most(num_heads, min(pairs, MAX_HEADS_PER_BLOCK))
    examples = largest_divisor_at_most(batch, max(1, pairs // heads))
    return examples, heads


def largest_divisor_at_most(size: int, limit: int) -> int:
    """The largest divisor of `size` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, min(size, limit) + 1) if size % d == 0)


def multi_head_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    dtype: Any = jnp.float32,
    block_bytes: int | None = None,
    implementation: str = EINSUM,
    allowed: Array | None = None,
    dropout_keep: Array | None = None,
    dropout_rate: float = 0.0,
) -> Array:
    """softmax(q k^T) v for query [B, Q, H, D] and key/value [B, K, H, D] -> [B, Q, H, D].

    The query comes scaled. Matmul operands are cast to `dtype`; scores and softmax are
    float32. `allowed` [Q, K] (True where a query may see a key) masks scores. `dropout_keep`
    [H, Q, K] (True where a probability is kept, shared by all examples) applies dropout at
    `dropout_rate` to the probabilities. `implementation` (one of `IMPLEMENTATIONS`) other than
    "einsum" runs `jax.nn.dot_product_attention` when there is no dropout; otherwise the work
    runs in blocks of about `block_bytes` float32 scores, with a hand-written backward pass
    (`_blocked_attention`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation {implementation!r}; expected one of "
            f"{IMPLEMENTATIONS}."
        )
    if implementation != EINSUM and dropout_keep is None:
        return _fused_attention(query, key, value, allowed, jnp.dtype(dtype), implementation)
    batch, queries, num_heads, _ = query.shape
    blocks = block_shape(batch, num_heads, queries, key.shape[1], block_bytes)
    keep_scale = None
    if dropout_keep is not None:
        keep_scale = jnp.where(dropout_keep, 1.0 / (1.0 - dropout_rate), 0.0)
    input_dtypes = tuple(x.dtype for x in (query, key, value))
    attend = _blocked_attention(jnp.dtype(dtype), blocks, input_dtypes)
    return attend(query, key, value, allowed, keep_scale)


def _fused_attention(
    query: Array, key: Array, value: Array, allowed: Array | None, dtype: jnp.dtype, kind: str
) -> Array:
    """`jax.nn.dot_product_attention` on cuDNN (`kind` "cudnn", where it takes the call) or XLA.

    cuDNN's checks (library present, dtype, head size, GPU generation) run while tracing, so
    a declined call falls back to XLA's attention before anything is compiled.
    """
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    mask = None if allowed is None else allowed[None, None]
    if kind == CUDNN and dtype in _CUDNN_DTYPES:
        try:
            context = jax.nn.dot_product_attention(
                query, key, value, mask=mask, scale=1.0, implementation=CUDNN
            )
            return context.astype(jnp.float32)
        except (RuntimeError, NotImplementedError, ValueError) as declined:
            _log_fallback(f"{type(declined).__name__}: {declined}")
    context = jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=1.0, implementation=XLA
    )
    return context.astype(jnp.float32)


@functools.cache
def _log_fallback(reason: str) -> None:
    """Says once per reason that cuDNN declined the attention and XLA's runs instead."""
    logging.warning("cuDNN attention declined (%s); using XLA's attention.", reason)


@functools.cache
def _blocked_attention(
    dtype: jnp.dtype, blocks: tuple[int, int], input_dtypes: tuple[jnp.dtype, ...]
) -> Callable[..., Array]:
    """The attention core over (examples, heads) blocks, with its VJP written out.

    Autodiff of the blocked core costs twice: the cotangent of each block's input slice is
    padded to full size and summed (on CPU the imagenet256 bf16 train step spent ~10% there),
    and the backward matmuls multiply a float32 cotangent by bf16 operands, so they run in
    float32. The written-out VJP differentiates block by block, concatenating the blocks'
    gradients, and casts the cotangents to `dtype` like `models.matmul`. It is softmax
    attention's backward with FlashAttention's arithmetic: the forward keeps exp(scores - max)
    unnormalised and scales each block's [Q, D] output by 1/rowsum instead of dividing the
    [Q, K] probabilities, and the backward takes rowsum(dP * P) as rowsum(grad * output), a
    [Q, D] product. Residuals are the compute-dtype q, k, v, the float32 exps, 1/rowsum and
    the blocks' outputs. In float32 it is autodiff's gradient up to rounding.
    imagenet256 train step, batch 4 on a 2-core AMX Xeon (`benchmarks/train_speed.py --batch 4`):
    bf16 3.26 -> 2.37 s (one block with autodiff: 2.72 s), fp32 5.01 -> 4.76 s; the
    unnormalised softmax then bf16 2.27-2.34 -> 2.18-2.29 s (fp32 within its noise).
    Called without a gradient (decoding, evaluation), the primal `context_only` runs instead:
    it keeps no residuals and, in bf16, takes the row sums from the value matmul.
    """
    examples, heads = blocks

    def block_slices(batch, num_heads):
        for first_example in range(0, batch, examples):
            for first_head in range(0, num_heads, heads):
                yield (
                    slice(first_example, first_example + examples),
                    slice(first_head, first_head + heads),
                )

    def gather(parts, batch, num_heads):
        """Reassembles per-block [e, L, h, D] arrays (in `block_slices` order) to [B, L, H, D]."""
        per_row = num_heads // heads
        rows = [_concatenate(parts[i : i + per_row], 2) for i in range(0, len(parts), per_row)]
        return _concatenate(rows, 0)

    def block_scores(q, k, allowed):
        """float32 scores [e, h, Q, K] of one block, disallowed pairs at float32's minimum."""
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if allowed is not None:
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        return scores

    def context_only(query, key, value, allowed, keep_scale):
        """The output without residuals (no gradient asked); in bf16, row sums from [v, 1].

        exp(scores - max) multiplies [v, 1]: the last column is each row's sum, which replaces
        the sum pass over the scores.
        imagenet256 bf16 decoding, batch 8, T=8 on a 2-core AMX Xeon, two pipelines
        alternating in one process: 1.03-1.07 -> 1.10-1.13 images/s. float32 decoding (its
        dots on XLA's own path, `compile_options`) was slower that way, 0.38-0.40 -> 0.36-0.38,
        so float32 keeps `forward`'s sum, as does dropout, whose kept weights do not sum to it.
        """
        if keep_scale is not None or dtype == jnp.float32:
            return forward(query, key, value, allowed, keep_scale)[0]
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        batch, _, num_heads, depth = q.shape
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), dtype)], axis=-1)
        contexts = []
        for rows, cols in block_slices(batch, num_heads):
            scores = block_scores(q[rows, :, cols], k[rows, :, cols], allowed)
            weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
            weighted = jnp.einsum(
                "bhqk,bkhd->bqhd",
                weights.astype(dtype),
                v[rows, :, cols],
                preferred_element_type=jnp.float32,
            )
            contexts.append(weighted[..., :depth] / weighted[..., depth:])
        return gather(contexts, batch, num_heads)

    def forward(query, key, value, allowed, keep_scale):
        """The output and its residuals; per block, exp(scores - max) meets the values."""
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        batch, _, num_heads, _ = q.shape
        contexts, exps, inverse_sums = [], [], []
        for rows, cols in block_slices(batch, num_heads):
            scores = block_scores(q[rows, :, cols], k[rows, :, cols], allowed)
            exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
            inverse_sum = 1.0 / jnp.sum(exp, axis=-1, keepdims=True)
            kept = exp if keep_scale is None else exp * keep_scale[cols]
            weighted = jnp.einsum(
                "bhqk,bkhd->bqhd",
                kept.astype(dtype),
                v[rows, :, cols],
                preferred_element_type=jnp.float32,
            )
            contexts.append(weighted * _swap_heads_and_queries(inverse_sum))
            exps.append(exp)
            inverse_sums.append(inverse_sum)
        context = gather(contexts, batch, num_heads)
        return context, (q, k, v, keep_scale, exps, inverse_sums, contexts)

    def backward(residuals, grad_context):
        """The VJP from the unnormalised exps.

        With P = exp * s (s = 1/rowsum) and D = rowsum(dP * P) = rowsum(grad * output),
        dScores = P * (dP - D) = exp * (g' v^T - s D) and dValue = exp^T g', where g' = s grad
        (dropout's scale applies to the [Q, K] terms as in the forward).
        """
        q, k, v, keep_scale, exps, inverse_sums, contexts = residuals
        batch, _, num_heads, _ = q.shape
        grads = ([], [], [])
        blocks = zip(block_slices(batch, num_heads), exps, inverse_sums, contexts, strict=True)
        for (rows, cols), exp, inverse_sum, context in blocks:
            g_block = grad_context[rows, :, cols]
            q_block, k_block, v_block = (x[rows, :, cols] for x in (q, k, v))
            row_dots = _swap_heads_and_queries(jnp.sum(g_block * context, axis=-1, keepdims=True))
            g_scaled = (g_block * _swap_heads_and_queries(inverse_sum)).astype(dtype)
            grad_kept = jnp.einsum(
                "bqhd,bkhd->bhqk", g_scaled, v_block, preferred_element_type=jnp.float32
            )
            kept = exp if keep_scale is None else exp * keep_scale[cols]
            grad_v = jnp.einsum(
                "bhqk,bqhd->bkhd", kept.astype(dtype), g_scaled, preferred_element_type=jnp.float32
            )
            grad_exp = grad_kept if keep_scale is None else grad_kept * keep_scale[cols]
            grad_scores = (exp * (grad_exp - row_dots * inverse_sum)).astype(dtype)
            grad_q = jnp.einsum(
                "bhqk,bkhd->bqhd", grad_scores, k_block, preferred_element_type=jnp.float32
            )
            grad_k = jnp.einsum(
                "bhqk,bqhd->bkhd", grad_scores, q_block, preferred_element_type=jnp.float32
            )
            for collected, grad in zip(grads, (grad_q, grad_k, grad_v), strict=True):
                collected.append(grad)
        grad_q, grad_k, grad_v = (
            gather(parts, batch, num_heads).astype(d)
            for parts, d in zip(grads, input_dtypes, strict=True)
        )
        return grad_q, grad_k, grad_v, None, None

    @jax.custom_vjp
    def attend(query, key, value, allowed, keep_scale):
        return context_only(query, key, value, allowed, keep_scale)

    attend.defvjp(forward, backward)
    return attend


def _swap_heads_and_queries(x: Array) -> Array:
    """[e, h, Q, .] <-> [e, Q, h, .]: per-row values of a score block against its outputs."""
    return jnp.swapaxes(x, 1, 2)


def _concatenate(parts: list[Array], axis: int) -> Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
