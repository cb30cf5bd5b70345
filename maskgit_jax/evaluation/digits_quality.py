"""Sample quality on the embedded digits, judged at the digits' own 8x8 resolution.

Inception features mean nothing for 8x8 handwriting, so the digits default is judged in
spaces fitted on its own training split (the first 1500 of scikit-learn's 1797, as the tfds
builder splits them) and compared with the 297 held-out digits:

- class accuracy of an SVM fitted on the training digits;
- Fréchet distance in the PCA space of the training digits (`PCA_COMPONENTS` dimensions);
- within-class diversity: mean pairwise distance inside each class, averaged over classes;
- near-copies: the fraction of images closer to their nearest training digit than all but
  `NEAR_COPY_PERCENTILE`% of held-out digits are (held-out digits score that by definition).

Real digits go through the training input path (`preprocess_eval` at `image_size`) and are
pooled back to 8x8 like samples, so real, reconstructed and sampled images are compared alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from maskgit_jax.data.datasets.digits import NUM_TEST, digits_arrays
from maskgit_jax.data.input_pipeline import preprocess_eval
from maskgit_jax.evaluation.metrics import fid_between

DIGIT_SIDE = 8
PCA_COMPONENTS = 20
NEAR_COPY_PERCENTILE = 5.0


def digit_features(images: np.ndarray) -> np.ndarray:
    """RGB images [N, S, S, 3] in [0, 1], S a multiple of 8 -> grayscale 8x8 means [N, 64]."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % DIGIT_SIDE:
        raise ValueError(
            f"images must be [N, S, S, C] with S a multiple of {DIGIT_SIDE}; got {images.shape}."
        )
    gray = images.mean(axis=-1)
    factor = gray.shape[1] // DIGIT_SIDE
    pooled = gray.reshape(len(gray), DIGIT_SIDE, factor, DIGIT_SIDE, factor).mean(axis=(2, 4))
    return pooled.reshape(len(gray), DIGIT_SIDE * DIGIT_SIDE)


def pipeline_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as the input pipeline feeds them at `image_size`: [N, S, S, 3], labels."""
    images, labels = digits_arrays()
    resized = [
        preprocess_eval(tf.io.encode_png(tf.constant(image)), image_size).numpy()
        for image in images
    ]
    return np.stack(resized).astype(np.float32), labels


def within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise Euclidean distance inside each class, averaged over the classes present."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    means = []
    for label in np.unique(labels):
        members = features[labels == label]
        if len(members) < 2:
            continue
        squared = np.sum(members**2, axis=1)
        distances = squared[:, None] + squared[None, :] - 2.0 * members @ members.T
        distances = np.sqrt(np.clip(distances, 0.0, None))
        count = len(members)
        means.append(distances.sum() / (count * (count - 1)))
    if not means:
        raise ValueError("within-class diversity needs at least two images of one class.")
    return float(np.mean(means))


def nearest_distances(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Euclidean distance from each row of `features` to its nearest row of `bank`."""
    features, bank = np.asarray(features, np.float64), np.asarray(bank, np.float64)
    squared = (
        np.sum(features**2, axis=1)[:, None]
        + np.sum(bank**2, axis=1)[None, :]
        - 2.0 * features @ bank.T
    )
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


@dataclasses.dataclass(frozen=True)
class QualityRow:
    """One image set's scores; ratios are filled against a baseline by `DigitsReference`."""

    name: str
    count: int
    accuracy: float
    frechet: float
    diversity: float
    near_copies: float


class DigitsReference:
    """The training and held-out digits at `image_size` and the judges fitted on them."""

    def __init__(self, image_size: int, pca_components: int = PCA_COMPONENTS):
        images, labels = pipeline_digits(image_size)
        self.image_size = image_size
        self.train_images, self.test_images = images[:-NUM_TEST], images[-NUM_TEST:]
        self.train_labels, self.test_labels = labels[:-NUM_TEST], labels[-NUM_TEST:]
        self.train_features = digit_features(self.train_images)
        self.test_features = digit_features(self.test_images)
        self.classifier = SVC(gamma="scale").fit(self.train_features, self.train_labels)
        self.pca = PCA(pca_components, random_state=0).fit(self.train_features)
        held_out_nearest = nearest_distances(self.test_features, self.train_features)
        self.near_copy_radius = float(np.percentile(held_out_nearest, NEAR_COPY_PERCENTILE))

    def frechet(self, features: np.ndarray, other: np.ndarray) -> float:
        """Fréchet distance of two feature sets in the training digits' PCA space."""
        return fid_between(self.pca.transform(features), self.pca.transform(other))

    def score(self, name: str, images: np.ndarray, labels: np.ndarray) -> QualityRow:
        """Scores images [N, S, S, 3] in [0, 1] meant to be of class `labels` [N]."""
        features = digit_features(images)
        labels = np.asarray(labels)
        if len(labels) != len(features):
            raise ValueError(f"{len(features)} images but {len(labels)} labels.")
        nearest = nearest_distances(features, self.train_features)
        return QualityRow(
            name=name,
            count=len(features),
            accuracy=float(np.mean(self.classifier.predict(features) == labels)),
            frechet=self.frechet(features, self.test_features),
            diversity=within_class_diversity(features, labels),
            near_copies=float(np.mean(nearest < self.near_copy_radius)),
        )

    def real_rows(self) -> tuple[QualityRow, QualityRow]:
        """The held-out digits (diversity 1.0 of real) and the training digits (FD baseline)."""
        return (
            self.score("held-out digits", self.test_images, self.test_labels),
            self.score("training digits", self.train_images, self.train_labels),
        )


def format_table(rows: list[QualityRow], real: QualityRow, baseline: QualityRow) -> str:
    """A markdown table: each row's scores, diversity / real's and FD / the baseline's."""
    lines = [
        "| images | n | accuracy | FD | FD / train | diversity / real | near-copies |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.count} | {row.accuracy:.3f} | {row.frechet:.3f} | "
            f"{row.frechet / baseline.frechet:.2f} | {row.diversity / real.diversity:.3f} | "
            f"{row.near_copies:.3f} |"
        )
    return "\n".join(lines)
