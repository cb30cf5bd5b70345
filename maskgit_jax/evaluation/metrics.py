"""FID, Inception Score and precision/recall from Inception outputs; numpy and scipy only.

Statistics files are .npz with keys "mu" and "sigma" (the layout pytorch-fid and the ADM
evaluation suite read), plus optionally "features" (the raw 2048-d features, needed for
precision/recall) and "num_examples".
"""

from typing import Any

import numpy as np
import scipy.linalg
from etils import epath


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D]; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return scipy.linalg.sqrtm(matrix)


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). As in the standard
    implementation: when the square root is not finite (near-singular product), `eps` is
    added to both diagonals and it is recomputed; a complex result whose diagonal has an
    imaginary part above 1e-3 is an error, a smaller one is dropped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {sigma1.shape} vs {sigma2.shape}."
        )
    if sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"sigma shape {sigma1.shape} does not match mu shape {mu1.shape}.")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(mu1.size) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if imaginary > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component {imaginary:.3g}.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _looks_like_probabilities(x: np.ndarray) -> bool:
    return bool(x.min() >= 0 and x.max() <= 1 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))


def inception_score(
    logits_or_probs: np.ndarray, splits: int = 10, from_logits: bool | None = None
) -> tuple[float, float]:
    """Mean and standard deviation over `splits` chunks of exp(E_x KL(p(y|x) || p(y))).

    Input [N, C]: logits, or probabilities (rows in [0, 1] summing to 1), detected
    automatically unless `from_logits` says which. With the FID Inception network these are
    its 1008-way outputs, as in the original Inception Score code.
    """
    x = np.asarray(logits_or_probs, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [N, num_classes]; got shape {x.shape}.")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(f"splits={splits} must be in [1, N={x.shape[0]}].")
    if from_logits is None:
        from_logits = not _looks_like_probabilities(x)
    probs = _softmax(x) if from_logits else x
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def _kth_neighbour_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest other point."""
    radii = np.empty(features.shape[0], features.dtype)
    for start in range(0, features.shape[0], batch_size):
        d = _squared_distances(features[start : start + batch_size], features)
        # Column k of the sorted row: column 0 is the point itself (distance 0).
        radii[start : start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _fraction_in_manifold(
    manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, batch_size: int
) -> float:
    inside = np.zeros(queries.shape[0], bool)
    for start in range(0, queries.shape[0], batch_size):
        d = _squared_distances(queries[start : start + batch_size], manifold)
        inside[start : start + batch_size] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to
    the point's k-th nearest neighbour in the same set. Precision: fraction of fake points
    inside the real manifold; recall: fraction of real points inside the fake manifold.
    Distances are computed `batch_size` rows at a time (memory ~ batch_size * N floats).
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D]; got {real.shape} and {fake.shape}.")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k={k} must be in [1, min(N, M)) = [1, {min(len(real), len(fake))}).")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_in_manifold(real, real_radii, fake, batch_size)
    recall = _fraction_in_manifold(fake, fake_radii, real, batch_size)
    return precision, recall


def save_statistics(
    path: str | epath.PathLike, features: np.ndarray, *, keep_features: bool = False
) -> dict[str, np.ndarray]:
    """Writes mu, sigma (and the features themselves if `keep_features`) to an .npz file."""
    mu, sigma = compute_statistics(features)
    stats = {"mu": mu, "sigma": sigma, "num_examples": np.int64(len(features))}
    if keep_features:
        stats["features"] = np.asarray(features, np.float32)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **stats)
    return stats


def load_statistics(path: str | epath.PathLike) -> dict[str, Any]:
    """Reads an .npz with "mu" and "sigma" (and "features" when saved); checks the shapes."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"reference statistics {path} not found; write them with "
            "`python -m maskgit_jax.evaluate --mode=reference ...`."
        )
    with path.open("rb") as f, np.load(f) as data:
        stats = {key: data[key] for key in data.files}
    for key in ("mu", "sigma"):
        if key not in stats:
            raise ValueError(f"{path} has no {key!r} array (it holds {sorted(stats)}).")
    d = stats["mu"].shape[-1]
    if stats["mu"].shape != (d,) or stats["sigma"].shape != (d, d):
        raise ValueError(
            f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not [D], [D, D]."
        )
    return stats
