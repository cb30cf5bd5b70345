"""Local TFDS builders; importing this package registers them with tfds by name."""

from maskgit_jax.data.datasets.digits import Digits
from maskgit_jax.data.datasets.photos import Photos

__all__ = ["Digits", "Photos"]
