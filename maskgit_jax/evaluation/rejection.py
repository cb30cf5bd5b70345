"""Classifier-based rejection sampling (the paper's acceptance-rate rows, e.g. a = 0.05).

For each requested class with n requested samples, ceil(n / acceptance_rate) candidates are
drawn and the n to which the classifier gives the highest probability of that class are
kept. Candidates are streamed in fixed-size batches and only the current best n per class
are held, so memory is that of the output plus one batch.

Every candidate has a global row index, from which the sampler draws its key
(`MaskGITPipeline.sample(..., row_offset=r)`): the first candidates are the requested labels
themselves, in order, at rows `row_offset + i`; the extra draws follow, grouped by class, at
rows from `extra_row_offset`. With acceptance rate 1 there are no extra draws and the result
is exactly the sampler's images for the labels, so an evaluation split over processes or
batches samples what one `generate(all_labels, rng)` call does.

The classifier is any function images -> logits (or a mapping with a "logits" entry).
`class_index` maps the generator's labels to the classifier's logit columns. The default
classifier of `maskgit_jax.evaluate` is the FID Inception network's own 1008-way output, whose
columns are NOT ImageNet's usual class order: column 0 is background, 1001-1007 are unused,
and the 1000 ILSVRC-2012 classes sit at the node ids listed in
`imagenet_2012_challenge_label_map_proto.pbtxt` (in the same inception-2015-12-05.tgz; e.g.
tench, n01440764, usual class 0, is column 449). `inception_class_index` reads that file and
returns, for each usual class id (synsets in sorted order, as tfds imagenet2012 labels them),
its column.
"""

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

_ENTRY = re.compile(r'target_class:\s*(\d+)\s*target_class_string:\s*"(n\d+)"')


def inception_class_index(label_map_path: str | epath.PathLike) -> np.ndarray:
    """[1000] int: the 2015 Inception graph's logit column of each ImageNet class id."""
    path = epath.Path(label_map_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: extract imagenet_2012_challenge_label_map_proto.pbtxt from "
            "inception-2015-12-05.tgz (the archive that holds classify_image_graph_def.pb)."
        )
    entries = {synset: int(node) for node, synset in _ENTRY.findall(path.read_text())}
    if len(entries) != 1000:
        raise ValueError(f"{path} lists {len(entries)} synsets; the ImageNet label map has 1000.")
    return np.array([entries[synset] for synset in sorted(entries)], np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _keep_images(images: Any, classifier_output: Any) -> Any:
    del classifier_output
    return images


def check_acceptance_rate(acceptance_rate: float) -> None:
    """Raises ValueError unless 0 < acceptance_rate <= 1."""
    if not 0.0 < acceptance_rate <= 1.0:
        raise ValueError(f"acceptance_rate={acceptance_rate} must be in (0, 1].")


def _check(labels: np.ndarray, acceptance_rate: float) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer array; got {labels.shape}.")
    check_acceptance_rate(acceptance_rate)
    return labels


def extra_candidates(labels: np.ndarray, acceptance_rate: float) -> np.ndarray:
    """Labels of the draws beyond `labels` themselves: ceil(n / rate) - n per class, grouped."""
    labels = _check(labels, acceptance_rate)
    classes, counts = np.unique(labels, return_counts=True)
    draws = np.array([math.ceil(n / acceptance_rate - 1e-9) for n in counts])
    return np.repeat(classes, draws - counts)


def _batches(
    candidates: np.ndarray, first_row: int, batch_size: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    """(labels [batch_size], global row of the first, valid count); the last batch padded."""
    for start in range(0, candidates.size, batch_size):
        batch = candidates[start : start + batch_size]
        valid = batch.size
        padding = np.full(batch_size - valid, batch[-1], batch.dtype)
        yield np.concatenate([batch, padding]), first_row + start, valid


def rejection_sample(
    sample_fn: Callable[[np.ndarray, int], Any],
    classifier_fn: Callable[[Any], Any],
    labels: np.ndarray,
    *,
    acceptance_rate: float,
    batch_size: int,
    row_offset: int = 0,
    extra_row_offset: int | None = None,
    class_index: np.ndarray | None = None,
    keep_fn: Callable[[Any, Any], Any] = _keep_images,
) -> Any:
    """Samples for `labels` [N], keeping the top `acceptance_rate` fraction of each class.

    sample_fn(labels [batch_size], row) -> images, the image of labels[j] being that of
    global row `row + j`; it is always called with exactly `batch_size` labels (the last batch
    of the requested labels, and of the extra draws, is padded and the padding discarded).
    Rows: the labels are candidates `row_offset + i`, the extra draws (`extra_candidates`)
    `extra_row_offset + j` (default: right after the labels; processes sampling shares of one
    evaluation give each share its own range). classifier_fn(images) -> logits
    [batch_size, C] or a mapping with "logits".
    keep_fn(images, classifier_output) -> the pytree kept per sample (default: the images),
    batched on axis 0. Returns that pytree for all N samples: row i is for labels[i]; within a
    class, rows are in decreasing classifier probability. With acceptance_rate 1 every
    candidate is kept in order: row i is the image of row `row_offset + i`.
    """
    labels = _check(labels, acceptance_rate)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    extras = extra_candidates(labels, acceptance_rate)
    if extra_row_offset is None:
        extra_row_offset = row_offset + labels.size
    if acceptance_rate == 1.0:
        parts = []
        for batch, row, valid in _batches(labels, row_offset, batch_size):
            images = sample_fn(batch, row)
            kept = keep_fn(images, classifier_fn(images))
            parts.append(jax.tree.map(lambda x, v=valid: np.asarray(x)[:v], kept))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

    classes, counts = np.unique(labels, return_counts=True)
    wanted = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    best: dict[int, tuple[np.ndarray, Any]] = {}  # class -> (scores, kept pytree)
    for candidates, first_row in ((labels, row_offset), (extras, extra_row_offset)):
        for batch, row, valid in _batches(candidates, first_row, batch_size):
            images = sample_fn(batch, row)
            output = classifier_fn(images)
            logits = output["logits"] if isinstance(output, Mapping) else output
            probs = _softmax(np.asarray(logits, np.float64)[:valid])
            ids = batch[:valid]
            columns = ids if class_index is None else np.asarray(class_index)[ids]
            scores = probs[np.arange(valid), columns]
            kept = jax.tree.map(lambda x, v=valid: np.asarray(x)[:v], keep_fn(images, output))
            for c in np.unique(ids).tolist():
                rows = np.nonzero(ids == c)[0]
                new_scores, new_items = scores[rows], jax.tree.map(lambda x, r=rows: x[r], kept)
                if c in best:
                    old_scores, old_items = best[c]
                    new_scores = np.concatenate([old_scores, new_scores])
                    new_items = jax.tree.map(
                        lambda a, b: np.concatenate([a, b]), old_items, new_items
                    )
                order = np.argsort(-new_scores, kind="stable")[: wanted[c]]
                best[c] = (new_scores[order], jax.tree.map(lambda x, o=order: x[o], new_items))

    first = best[int(classes[0])][1]
    result = jax.tree.map(lambda x: np.empty((labels.size, *x.shape[1:]), x.dtype), first)
    for c in classes.tolist():
        rows = np.nonzero(labels == c)[0]
        result = jax.tree.map(_assign(rows), result, best[c][1])
    return result


def _assign(rows: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def assign(out: np.ndarray, values: np.ndarray) -> np.ndarray:
        out[rows] = values
        return out

    return assign
