"""Multi-head attention core, computed the way each backend runs it fastest.

Two implementations of the same function, softmax(q k^T) v:
- blocks of (examples, heads) whose float32 score block stays near `block_bytes`: on CPU a
  [B, H, L, L] score tensor of a large batch falls out of cache (batch 64 ran at half the
  per-image speed of batch 8), while 2 MiB blocks keep every batch size at its best;
- `jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16, XLA elsewhere) when
  no dropout is applied to the probabilities, which it does not support.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Float32 scores per block on CPU: 8 (example, head) pairs of 257 x 257 (2.1 MB). Measured
# with benchmarks/attention_blocks.py on a 2-core Xeon: blocks of 2-4 heads x 2-4 examples
# beat one [64, 16, 257, 257] block by 2-3x per image and match the best batch-8 blocking.
CPU_BLOCK_BYTES = 8 * 257 * 257 * 4
# At most this many heads per block; with room to spare, blocks take more examples instead.
MAX_HEADS_PER_BLOCK = 4


def default_attention(backend: str | None = None) -> dict[str, Any]:
    """The attention settings of `MaskedTransformer` that are fastest on `backend`.

    CPU: byte-sized blocks of the einsum core. GPU and TPU: one block, and the fused
    `jax.nn.dot_product_attention` wherever no attention dropout is applied.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return {"attention_block_bytes": CPU_BLOCK_BYTES, "fused_attention": False}
    return {"attention_block_bytes": None, "fused_attention": True}


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
    heads = _largest_divisor_at_most(num_heads, min(pairs, MAX_HEADS_PER_BLOCK))
    examples = _largest_divisor_at_most(batch, max(1, pairs // heads))
    return examples, heads


def _largest_divisor_at_most(size: int, limit: int) -> int:
    return max(d for d in range(1, min(size, limit) + 1) if size % d == 0)


def multi_head_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    dtype: Any = jnp.float32,
    block_bytes: int | None = None,
    fused: bool = False,
    allowed: Array | None = None,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """softmax(q k^T) v for query [B, Q, H, D] and key/value [B, K, H, D] -> [B, Q, H, D].

    The query comes scaled. Matmul operands are cast to `dtype`; scores and softmax are
    float32. `allowed` [Q, K] (True where a query may see a key) masks scores; `dropout` is
    applied to the probabilities. `fused` uses `jax.nn.dot_product_attention` when there is
    no dropout; otherwise the work runs in blocks of about `block_bytes` float32 scores.
    """
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    if fused and dropout is None:
        mask = None if allowed is None else allowed[None, None]
        context = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=1.0)
        return context.astype(jnp.float32)
    batch, queries, num_heads, _ = query.shape
    examples, heads = block_shape(batch, num_heads, queries, key.shape[1], block_bytes)
    rows = []
    for first_example in range(0, batch, examples):
        in_block = slice(first_example, first_example + examples)
        contexts = [
            _attention_block(
                query[in_block, :, first : first + heads],
                key[in_block, :, first : first + heads],
                value[in_block, :, first : first + heads],
                dtype,
                allowed,
                dropout,
            )
            for first in range(0, num_heads, heads)
        ]
        rows.append(_concatenate(contexts, axis=2))
    return _concatenate(rows, axis=0)


def _attention_block(query, key, value, dtype, allowed, dropout) -> Array:
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if allowed is not None:
        scores = jnp.where(allowed[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum(
        "bhqk,bkhd->bqhd", probs.astype(dtype), value, preferred_element_type=jnp.float32
    )


def _concatenate(parts: list[Array], axis: int) -> Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
