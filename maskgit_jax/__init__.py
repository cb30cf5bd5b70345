"""MaskGIT in JAX/Flax: VQGAN tokenizer, masked transformer and parallel decoding."""
