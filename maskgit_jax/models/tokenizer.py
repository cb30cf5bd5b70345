"""VQGAN tokenizer (no attention layers), parameter-compatible with the released checkpoints.

Module and parameter names (`encoder/ResBlock_3/Conv_1/kernel`, `quantizer/codebook`, ...)
follow the authors' tree exactly, so their msgpack files load without renaming. The quirk
of their residual block is kept (see `ResBlock`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _group_norm(groups: int) -> nn.Module:
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a shortcut.

    Where the width changes, the released model's 1x1 shortcut conv is applied to the output
    of the second conv, not to the block input: `out = h + conv1x1(h)`. We keep that so the
    released weights compute the released function.
    """

    features: int
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        input_features = x.shape[-1]
        residual = x
        x = nn.swish(_group_norm(self.norm_groups)(x))
        x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x)
        x = nn.swish(_group_norm(self.norm_groups)(x))
        x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype)(x)
        if input_features != self.features:
            residual = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype)(x)
        return x + residual


def _downsample(x: Array) -> Array:
    """2x2 average pool, stride 2, 'SAME' padding whose average ignores padded cells."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


def _upsample(x: Array) -> Array:
    """2x nearest-neighbour upsampling of an NHWC tensor."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> latents [B, H/f, W/f, embedding_dim]."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    embedding_dim: int
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(x)
        num_levels = len(self.channel_multipliers)
        for level, multiplier in enumerate(self.channel_multipliers):
            for _ in range(self.num_res_blocks):
                x = ResBlock(self.filters * multiplier, self.norm_groups, self.dtype)(x)
            if level < num_levels - 1:
                x = _downsample(x)
        for _ in range(self.num_res_blocks):
            x = ResBlock(x.shape[-1], self.norm_groups, self.dtype)(x)
        x = nn.swish(_group_norm(self.norm_groups)(x))
        return nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Latents [B, h, w, embedding_dim] -> images [B, h*f, w*f, 3] (unclipped, ~[0, 1])."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    norm_groups: int = 32
    output_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = self.filters * self.channel_multipliers[-1]
        x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
        for _ in range(self.num_res_blocks):
            x = ResBlock(width, self.norm_groups, self.dtype)(x)
        for level in reversed(range(len(self.channel_multipliers))):
            width = self.filters * self.channel_multipliers[level]
            for _ in range(self.num_res_blocks):
                x = ResBlock(width, self.norm_groups, self.dtype)(x)
            if level > 0:
                x = _upsample(x)
                x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
        x = nn.swish(_group_norm(self.norm_groups)(x))
        return nn.Conv(self.output_channels, (3, 3), dtype=self.dtype)(x)


def squared_distances(latents: Array, codebook: Array) -> Array:
    """|a|^2 - 2ab + |b|^2 between latents [N, D] and codes [K, D], as the authors compute it."""
    return (
        jnp.sum(latents**2, axis=1, keepdims=True)
        - 2 * jnp.dot(latents, codebook.T, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(codebook**2, axis=1)
    )


def entropy_loss(distances: Array, temperature: float) -> Array:
    """Per-sample entropy minus codebook-average entropy of softmax(-d / temperature).

    Low per-sample entropy makes assignments confident; high average entropy spreads use over
    the whole codebook.
    """
    logits = -distances / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through gradient and its training losses."""

    codebook_size: int
    embedding_dim: int
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.1
    entropy_temperature: float = 0.01

    def setup(self):
        self.codebook = self.param(
            "codebook",
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
            (self.codebook_size, self.embedding_dim),
        )

    def __call__(self, latents: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        """Returns quantized latents (straight-through) and a dict of ids, losses and stats."""
        flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
        distances = squared_distances(flat, self.codebook)
        ids = jnp.argmin(distances, axis=1)
        quantized = jnp.take(self.codebook, ids, axis=0).reshape(latents.shape)
        result = {"encoding_indices": ids.reshape(latents.shape[:-1])}
        if train:
            latents32 = latents.astype(jnp.float32)
            commitment = jnp.mean((jax.lax.stop_gradient(quantized) - latents32) ** 2)
            codebook = jnp.mean((quantized - jax.lax.stop_gradient(latents32)) ** 2)
            entropy = (
                entropy_loss(distances, self.entropy_temperature)
                if self.entropy_loss_ratio
                else jnp.zeros((), jnp.float32)
            )
            counts = jnp.zeros((self.codebook_size,), jnp.float32).at[ids].add(1.0)
            usage = counts / flat.shape[0]
            result.update(
                latents=latents32,
                commitment_loss=self.commitment_cost * commitment,
                codebook_loss=codebook,
                entropy_loss=self.entropy_loss_ratio * entropy,
                code_counts=counts,
                codebook_usage=jnp.mean(counts > 0),
                perplexity=jnp.exp(-jnp.sum(usage * jnp.log(usage + 1e-10))),
            )
            result["quantizer_loss"] = (
                result["commitment_loss"] + result["codebook_loss"] + result["entropy_loss"]
            )
            quantized = latents32 + jax.lax.stop_gradient(quantized - latents32)
        return quantized, result

    def embed_ids(self, ids: Array) -> Array:
        """Looks up codebook vectors: ids [...] -> [..., embedding_dim]."""
        return jnp.take(self.codebook, ids, axis=0)


class VQGANTokenizer(nn.Module):
    """Encoder + vector quantizer + decoder; images are float NHWC in [0, 1].

    Methods (call through `apply(..., method=...)`): `encode` (images -> token ids),
    `decode` (ids -> images), `__call__` (training forward: reconstruction + quantizer
    losses and code-usage statistics).
    """

    filters: int = 128
    channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embedding_dim: int = 256
    codebook_size: int = 1024
    norm_groups: int = 32
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.1
    entropy_temperature: float = 0.01
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(
            self.filters,
            tuple(self.channel_multipliers),
            self.num_res_blocks,
            self.embedding_dim,
            self.norm_groups,
            self.dtype,
        )
        self.quantizer = VectorQuantizer(
            self.codebook_size,
            self.embedding_dim,
            self.commitment_cost,
            self.entropy_loss_ratio,
            self.entropy_temperature,
        )
        self.decoder = Decoder(
            self.filters,
            tuple(self.channel_multipliers),
            self.num_res_blocks,
            self.norm_groups,
            dtype=self.dtype,
        )

    @property
    def downsample_factor(self) -> int:
        """Pixels per token along each side."""
        return 2 ** (len(self.channel_multipliers) - 1)

    def encode(self, images: Array) -> Array:
        """Images [B, H, W, 3] in [0, 1] -> token ids [B, H/f, W/f] int32."""
        _, result = self.quantizer(self.encoder(images))
        return result["encoding_indices"].astype(jnp.int32)

    def decode(self, ids: Array) -> Array:
        """Token ids [B, h, w] -> images [B, h*f, w*f, 3], unclipped (clip for display)."""
        return self.decoder(self.quantizer.embed_ids(ids))

    def __call__(self, images: Array, train: bool = True) -> tuple[Array, dict[str, Array]]:
        """Training forward: reconstruction and the quantizer's losses and statistics."""
        quantized, result = self.quantizer(self.encoder(images), train=train)
        return self.decoder(quantized), result
