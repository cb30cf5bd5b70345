"""Local TFDS builders; importing this package registers them with tfds by name."""

from maskgit_jax.datasets.digits import Digits

__all__ = ["Digits"]
