"""Inception features of reference images: a dataset's eval split, or an ADM reference batch.

FID needs only a reference's statistics (mu, sigma), precision/recall its features. Both
functions here run Inception on this process's devices and are collectives across processes
(`image_features` gathers; `eval_split_features` reads this process's share of the split).
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from maskgit_jax import multihost
from maskgit_jax.evaluation import inception

InceptionFn = Callable[[Any], dict[str, np.ndarray]]


def eval_split_features(
    config: ml_collections.ConfigDict,
    inception_fn: InceptionFn,
    batch_size: int,
    max_batches: int = 0,
) -> np.ndarray:
    """Inception pool_3 features of the config's dataset eval split (this process's share).

    `batch_size` is per process; `max_batches` > 0 stops after that many batches.
    """
    from maskgit_jax.data import input_pipeline  # TensorFlow input pipeline: only here

    _, eval_ds, info = input_pipeline.create_datasets(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=batch_size * jax.process_count(),
        seed=config.seed,
    )
    if eval_ds is None:
        raise ValueError(f"dataset {info.name!r} has no eval split; set dataset.eval_split.")
    features = []
    for index, batch in enumerate(eval_ds):
        if max_batches and index >= max_batches:
            break
        mask = np.asarray(batch["mask"], bool)
        features.append(inception_fn(batch["image"])["pool_3"][mask])
    return np.concatenate(features)


def image_features(inception_fn: InceptionFn, images: np.ndarray, batch_size: int) -> np.ndarray:
    """pool_3 features [N, D] of uint8 images [N, H, W, 3], all processes' rows gathered.

    Each process runs its contiguous share in batches of `batch_size` (the last one padded,
    so that Inception runs one compiled shape); a collective: call it on every process.
    """
    share = np.array_split(np.arange(len(images)), jax.process_count())[jax.process_index()]
    features = []
    for start in range(0, len(share), batch_size):
        rows = share[start : start + batch_size]
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        batch = np.asarray(images[padded], np.float32) / 255.0
        features.append(inception_fn(batch)["pool_3"][: len(rows)])
    if not features:  # more processes than images
        features = [np.zeros((0, inception.FEATURE_DIM), np.float32)]
    return multihost.gather_rows(np.concatenate(features))


def with_image_features(
    stats: dict[str, Any], inception_fn: InceptionFn, batch_size: int
) -> dict[str, Any]:
    """`stats` with "features" computed from its ADM images when it has images but no features.

    The images are dropped afterwards (only their features are used). A collective when it
    computes: call it on every process.
    """
    stats = dict(stats)
    images = stats.pop("images", None)
    if images is not None and "features" not in stats:
        stats["features"] = image_features(inception_fn, images, batch_size)
    return stats
