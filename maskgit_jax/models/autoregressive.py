"""Causal (GPT-style) transformer the size of MaskGIT's, with a KV cache: the speed baseline.

The sequence is the class token `codebook_size + label` followed by the image tokens in
raster order; position `t` predicts token `t + 1`. Layers are the MaskGIT layers made causal
(post-LayerNorm, the same projections, MLP and tied output head), so the per-token FLOPs of
the two models match. The vocabulary is codebook + classes: no mask token.

The KV cache is an explicit pytree: one `(keys, values)` pair per layer, each
[B, max_length, heads, head_dim] in the compute dtype. `decode_step` writes the current
token's key and value at `position` and attends to positions <= `position`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskgit_jax import config_lib
from maskgit_jax.models.attention import multi_head_attention
from maskgit_jax.models.transformer import (
    MlmLayer,
    Mlp,
    _dense,
    _layer_norm,
    truncated_normal_init,
)

Array = jax.Array
LayerCache = tuple[Array, Array]
Cache = tuple[LayerCache, ...]


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which a query at position p sees keys at positions <= p.

    Without a cache the keys are the input's own (positions 0..S-1). With a cache the input's
    keys and values are written into it at `position` and the queries, at positions
    `position .. position + S - 1`, attend over the whole cache under the causal mask.
    """

    num_heads: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, cache: LayerCache | None, position: Array | int
    ) -> tuple[Array, LayerCache | None]:
        """Maps x [B, S, hidden] to (output [B, S, hidden], updated cache or None)."""
        head_dim = self.hidden_size // self.num_heads
        shape = (self.num_heads, head_dim)

        def projection(name):
            return _dense(shape, ("embed", "heads", "kv"), name, self.dtype)(x)

        query = projection("query") / math.sqrt(head_dim)
        key, value = projection("key"), projection("value")
        if cache is not None:
            start = (0, position, 0, 0)
            key = jax.lax.dynamic_update_slice(cache[0], key.astype(cache[0].dtype), start)
            value = jax.lax.dynamic_update_slice(cache[1], value.astype(cache[1].dtype), start)
            cache = (key, value)
        query_positions = position + jnp.arange(x.shape[1])
        key_positions = jnp.arange(key.shape[1])
        allowed = key_positions[None, :] <= query_positions[:, None]
        context = multi_head_attention(query, key, value, dtype=self.dtype, allowed=allowed)
        out = _dense(
            self.hidden_size,
            ("heads", "kv", "embed"),
            "out",
            self.dtype,
            axis=(-2, -1),
            bias_names=("embed",),
        )(context)
        return out, cache


class CausalLayer(nn.Module):
    """Post-LayerNorm layer: causal attention + residual + LN, then MaskGIT's MLP sub-layer."""

    num_heads: int
    hidden_size: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, cache: LayerCache | None, position: Array | int
    ) -> tuple[Array, LayerCache | None]:
        """Maps x [B, S, hidden] to (x [B, S, hidden], updated cache or None)."""
        attended, cache = CausalSelfAttention(
            self.num_heads, self.hidden_size, self.dtype, name="self_attention"
        )(x, cache, position)
        x = _layer_norm("attention_output_ln")(attended + x)
        x = Mlp(self.hidden_size, self.mlp_dim, 0.0, self.dtype, name="mlp")(x, True)
        return x, cache


class CausalTransformer(nn.Module):
    """ids [B, L] (class token, then image tokens in raster order) -> next-token logits.

    `__call__` is the teacher-forced forward over a whole sequence; `decode_step` runs one
    token through the layers using and updating the KV cache made by `init_cache`. Logits are
    float32 over the first `num_logits` vocabulary rows (default: the whole vocabulary); the
    vocabulary is `codebook_size` codes then `num_classes` class tokens.
    """

    codebook_size: int
    num_classes: int
    max_length: int
    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    dtype: Any = jnp.float32

    @property
    def vocab_size(self) -> int:
        """Codebook codes, then one class token per label."""
        return self.codebook_size + self.num_classes

    def setup(self):
        """Embedding tables, the causal layers and the tied output head."""
        self.word_embeddings = nn.Embed(
            self.vocab_size,
            self.hidden_size,
            embedding_init=truncated_normal_init(),
            name="word_embeddings",
        )
        self.position_embeddings = nn.Embed(
            self.max_length,
            self.hidden_size,
            embedding_init=truncated_normal_init(),
            name="position_embeddings",
        )
        self.embeddings_ln = _layer_norm("embeddings_ln")
        self.layers = [
            CausalLayer(
                self.num_heads, self.hidden_size, self.mlp_dim, self.dtype, name=f"layer_{i}"
            )
            for i in range(self.num_layers)
        ]
        self.head = MlmLayer(self.hidden_size, self.vocab_size, self.dtype, name="head")

    def _run(
        self,
        ids: Array,
        position: Array | int,
        cache: Cache | None,
        num_logits: int | None,
    ) -> tuple[Array, Cache | None]:
        positions = position + jnp.arange(ids.shape[1])
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = self.embeddings_ln(x.astype(self.dtype))
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, None if cache is None else cache[i], position)
            new_cache.append(layer_cache)
        logits = self.head(x, self.word_embeddings.embedding, num_logits)
        return logits, None if cache is None else tuple(new_cache)

    def __call__(self, ids: Array, *, num_logits: int | None = None) -> Array:
        """Teacher-forced causal forward: ids [B, L] -> logits [B, L, num_logits or vocab]."""
        logits, _ = self._run(ids, 0, None, num_logits)
        return logits

    def decode_step(
        self, token: Array, position: Array | int, cache: Cache, *, num_logits: int | None = None
    ) -> tuple[Array, Cache]:
        """Runs token [B] at `position` (traceable): (logits [B, vocab], cache with it written).

        The logits predict the token at `position + 1`; they equal `__call__`'s logits at
        `position` when the cache holds the keys and values of positions 0..position-1.
        """
        logits, cache = self._run(token[:, None], position, cache, num_logits)
        return logits[:, 0], cache

    def init_cache(self, batch_size: int) -> Cache:
        """An empty cache (zeros) for `batch_size` sequences; needs no variables."""
        head_dim = self.hidden_size // self.num_heads
        shape = (batch_size, self.max_length, self.num_heads, head_dim)
        return tuple(
            (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in range(self.num_layers)
        )


def build_autoregressive(
    config: ml_collections.ConfigDict, dtype: Any = jnp.float32
) -> CausalTransformer:
    """The causal transformer with `config.transformer`'s sizes for the config's token grid."""
    t = config.transformer
    return CausalTransformer(
        codebook_size=config.tokenizer.codebook_size,
        num_classes=config.num_classes,
        max_length=config_lib.sequence_length(config),
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        mlp_dim=t.mlp_dim,
        dtype=dtype,
    )
