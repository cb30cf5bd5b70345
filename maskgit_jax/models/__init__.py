"""Flax modules: the VQGAN tokenizer and the bidirectional masked transformer."""
