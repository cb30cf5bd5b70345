"""Classifier-based rejection sampling (the paper's acceptance-rate rows, e.g. a = 0.05).

For each requested class with n requested samples, ceil(n / acceptance_rate) candidates are
drawn and the n to which the classifier gives the highest probability of that class are
kept. Candidates are streamed in fixed-size batches and only the current best n per class
are held, so memory is that of the output plus one batch.

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
from collections.abc import Callable, Mapping
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


def rejection_sample(
    sample_fn: Callable[[np.ndarray, jax.Array], Any],
    classifier_fn: Callable[[Any], Any],
    labels: np.ndarray,
    rng: jax.Array,
    *,
    acceptance_rate: float,
    batch_size: int,
    class_index: np.ndarray | None = None,
    keep_fn: Callable[[Any, Any], Any] = _keep_images,
) -> Any:
    """Samples for `labels` [N], keeping the top `acceptance_rate` fraction of each class.

    sample_fn(labels [batch_size], rng) -> images; it is always called with exactly
    `batch_size` labels (the last batch is padded and the padding discarded) and rng
    `fold_in(rng, batch_number)`. classifier_fn(images) -> logits [batch_size, C] or a mapping
    with "logits". keep_fn(images, classifier_output) -> the pytree kept per sample (default:
    the images), batched on axis 0. Returns that pytree for all N samples: row i is for
    labels[i]; within a class, rows are in decreasing classifier probability. With
    acceptance_rate 1 every candidate is kept (plain sampling, grouped by class).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D integer array; got {labels.shape}.")
    if not 0.0 < acceptance_rate <= 1.0:
        raise ValueError(f"acceptance_rate={acceptance_rate} must be in (0, 1].")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    classes, counts = np.unique(labels, return_counts=True)
    wanted = dict(zip(classes.tolist(), counts.tolist(), strict=True))
    draws = [math.ceil(n / acceptance_rate - 1e-9) for n in counts]
    stream = np.repeat(classes, draws)

    best: dict[int, tuple[np.ndarray, Any]] = {}  # class -> (scores, kept pytree)
    for batch_number, start in enumerate(range(0, stream.size, batch_size)):
        batch = stream[start : start + batch_size]
        valid = batch.size
        batch = np.concatenate([batch, np.full(batch_size - valid, batch[-1], batch.dtype)])
        images = sample_fn(batch, jax.random.fold_in(rng, batch_number))
        output = classifier_fn(images)
        logits = output["logits"] if isinstance(output, Mapping) else output
        probs = _softmax(np.asarray(logits, np.float64)[:valid])
        columns = batch[:valid] if class_index is None else np.asarray(class_index)[batch[:valid]]
        scores = probs[np.arange(valid), columns]
        kept = jax.tree.map(lambda x, v=valid: np.asarray(x)[:v], keep_fn(images, output))
        for c in np.unique(batch[:valid]).tolist():
            rows = np.nonzero(batch[:valid] == c)[0]
            new_scores, new_items = scores[rows], jax.tree.map(lambda x, r=rows: x[r], kept)
            if c in best:
                old_scores, old_items = best[c]
                new_scores = np.concatenate([old_scores, new_scores])
                new_items = jax.tree.map(lambda a, b: np.concatenate([a, b]), old_items, new_items)
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
