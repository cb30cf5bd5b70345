"""Inception outputs of sampled images: which labels a process samples, at which rows.

An evaluation samples labels 0, 1, ..., num_classes-1 repeated up to `num_samples`. Each
process takes a contiguous share of them, and every candidate image has a global row index
from which the sampler draws its key (`MaskGITPipeline.sample(labels, rng, options,
row_offset=r)` gives labels[j] the key of row r + j). Label i is row i, whatever the process
count or batch size; rejection sampling's extra draws take rows after all labels, one range
per process. With acceptance rate 1 the processes together sample exactly
`MaskGITPipeline.generate(labels, rng)`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from maskgit_jax.evaluation import rejection

# images for (labels [B], global row of labels[0]); see `rejection.rejection_sample`.
SampleFn = Callable[[np.ndarray, int], Any]


class ProcessShare(NamedTuple):
    """One process's part of an evaluation's samples.

    Attributes:
        labels: int32 [n], its contiguous share of all labels.
        row_offset: global row (and label index) of `labels[0]`.
        acceptance_rate: fraction of candidates kept per class (1: plain sampling).
        extra_row_offset: global row of its first extra rejection-sampling draw.
    """

    labels: np.ndarray
    row_offset: int
    acceptance_rate: float
    extra_row_offset: int


def all_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """The labels of an evaluation: 0..num_classes-1 repeated up to `num_samples`."""
    return (np.arange(num_samples) % num_classes).astype(np.int32)


def process_share(
    num_samples: int,
    num_classes: int,
    acceptance_rate: float = 1.0,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> ProcessShare:
    """The share of process `process_index` (default: this one) of `process_count` (all)."""
    rejection.check_acceptance_rate(acceptance_rate)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    shares = np.array_split(all_labels(num_samples, num_classes), count)
    if not len(shares[index]):
        raise ValueError(
            f"{num_samples} samples leave process {index} of {count} nothing to sample."
        )
    extras = [rejection.extra_candidates(share, acceptance_rate).size for share in shares[:index]]
    return ProcessShare(
        labels=shares[index],
        row_offset=sum(len(share) for share in shares[:index]),
        acceptance_rate=acceptance_rate,
        extra_row_offset=num_samples + sum(extras),
    )


def pipeline_sample_fn(pipe: Any, rng: jax.Array, options: Any) -> SampleFn:
    """`MaskGITPipeline.sample` as a `SampleFn`: images on the pipeline's devices."""

    def sample(labels: np.ndarray, row_offset: int) -> jax.Array:
        return pipe.sample(labels, rng, options, row_offset=row_offset)

    return sample


def _inception_outputs(images: Any, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    del images
    return {"pool_3": outputs["pool_3"], "logits": outputs["logits"]}


def sample_outputs(
    sample_fn: SampleFn,
    inception_fn: Callable[[Any], dict[str, np.ndarray]],
    share: ProcessShare,
    *,
    batch_size: int,
    class_index: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """{"pool_3", "logits"} of the (rejection-)sampled images of `share`, row i for label i.

    `class_index` maps labels to Inception logit columns (rejection sampling of ImageNet
    classes; `rejection.inception_class_index`).
    """
    return rejection.rejection_sample(
        sample_fn,
        inception_fn,
        share.labels,
        acceptance_rate=share.acceptance_rate,
        batch_size=batch_size,
        row_offset=share.row_offset,
        extra_row_offset=share.extra_row_offset,
        class_index=class_index,
        keep_fn=_inception_outputs,
    )
