"""Local TFDS builders; importing this package registers them with tfds by name."""

from maskgit_jax.datasets.digits import Digits
from maskgit_jax.datasets.photos import Photos

__all__ = ["Digits", "Photos"]
