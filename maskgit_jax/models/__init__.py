"""Flax modules (VQGAN tokenizer, masked transformer) and their builders from a config."""

import jax.numpy as jnp
import ml_collections

from maskgit_jax import config_lib
from maskgit_jax.models.tokenizer import VQGANTokenizer
from maskgit_jax.models.transformer import MaskedTransformer, default_heads_per_block

__all__ = ["MaskedTransformer", "VQGANTokenizer", "build_tokenizer", "build_transformer"]


def build_tokenizer(config: ml_collections.ConfigDict, dtype=jnp.float32) -> VQGANTokenizer:
    """The tokenizer of `config.tokenizer` with the loss weights of `config.tokenizer_loss`."""
    loss = config.get("tokenizer_loss", {})
    return VQGANTokenizer(**config.tokenizer, **loss, dtype=dtype)


def build_transformer(
    config: ml_collections.ConfigDict,
    dtype=jnp.float32,
    remat: bool = False,
    attention_heads_per_block: int | None | str = "auto",
) -> MaskedTransformer:
    """The transformer of `config.transformer`, sized for the config's image and classes.

    `attention_heads_per_block="auto"` picks the blocking that is fastest on the default
    backend (`default_heads_per_block`); it changes speed, never parameters or outputs.
    """
    if attention_heads_per_block == "auto":
        attention_heads_per_block = default_heads_per_block(config.transformer.num_heads)
    return MaskedTransformer(
        vocab_size=config_lib.vocab_size(config),
        max_length=config_lib.sequence_length(config),
        **config.transformer,
        dtype=dtype,
        remat=remat,
        attention_heads_per_block=attention_heads_per_block,
    )
