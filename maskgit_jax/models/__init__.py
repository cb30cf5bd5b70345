"""Flax modules (VQGAN tokenizer, masked transformer) and their builders from a config."""

import jax.numpy as jnp
import ml_collections

from maskgit_jax import config_lib
from maskgit_jax.models.attention import default_attention
from maskgit_jax.models.tokenizer import VQGANTokenizer
from maskgit_jax.models.transformer import MaskedTransformer

__all__ = ["MaskedTransformer", "VQGANTokenizer", "build_tokenizer", "build_transformer"]


def build_tokenizer(config: ml_collections.ConfigDict, dtype=jnp.float32) -> VQGANTokenizer:
    """The tokenizer of `config.tokenizer` with the loss weights of `config.tokenizer_loss`."""
    loss = config.get("tokenizer_loss", {})
    return VQGANTokenizer(**config.tokenizer, **loss, dtype=dtype)


def build_transformer(
    config: ml_collections.ConfigDict,
    dtype=jnp.float32,
    remat: bool = False,
    backend: str | None = None,
) -> MaskedTransformer:
    """The transformer of `config.transformer`, sized for the config's image and classes.

    Its attention runs the way that is fastest on `backend` (default: JAX's default backend;
    `models.attention.default_attention`); that changes speed, never parameters or outputs.
    """
    return MaskedTransformer(
        vocab_size=config_lib.vocab_size(config),
        max_length=config_lib.sequence_length(config),
        **config.transformer,
        dtype=dtype,
        remat=remat,
        **default_attention(backend),
    )
