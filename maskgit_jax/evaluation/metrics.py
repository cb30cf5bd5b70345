"""FID, Inception Score and precision/recall from Inception outputs; numpy and scipy only.

Statistics files are .npz with keys "mu" and "sigma" (the layout pytorch-fid and the ADM
evaluation suite read), plus optionally "features" (the raw 2048-d features, needed for
precision/recall) and "num_examples". The ADM suite's reference batches (e.g.
VIRTUAL_imagenet256_labeled.npz) hold "mu", "sigma", the images themselves as "arr_0" (uint8
[N, H, W, 3], whose features give precision/recall) and sFID's "mu_s", "sigma_s" (ignored).
"""

import pickle
import zipfile
from typing import Any

import numpy as np
import scipy.linalg
from etils import epath

# Key of the images in an ADM reference batch (np.savez's name for its first positional array).
ADM_IMAGES_KEY = "arr_0"


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


def _centred(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and X = (features - mean) / sqrt(N - 1), so that X^T X is the covariance."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"FID needs features [N >= 2, D] (at least 2 images); got shape {features.shape}."
        )
    mu = features.mean(axis=0)
    return mu, (features - mu) / np.sqrt(features.shape[0] - 1)


def fid_to_reference(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID between features [N, D] and reference statistics (mu [D], sigma [D, D]).

    For N <= D (few samples: the features' covariance S = X^T X has rank < N) the trace of
    (S sigma)^(1/2) is the sum of the square roots of the eigenvalues of the N x N matrix
    X sigma X^T, which share S sigma's nonzero spectrum: exact, and O(N D^2) instead of a
    D x D matrix square root (minutes for D = 2048 on a small CPU). Otherwise this is
    `fid_from_stats`.
    """
    mu_x, x = _centred(features)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != mu_x.shape or sigma.shape != (mu.size, mu.size):
        raise ValueError(
            f"features {np.shape(features)} do not match the reference statistics: mu "
            f"{mu.shape}, sigma {sigma.shape}."
        )
    if x.shape[0] > x.shape[1]:
        return fid_from_stats(mu_x, x.T @ x, mu, sigma)
    eigenvalues = np.linalg.eigvalsh(x @ sigma @ x.T)
    diff = mu_x - mu
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(diff @ diff + np.sum(x * x) + np.trace(sigma) - 2.0 * trace_sqrt)


def fid_between(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two sets of Inception features [N, D] and [M, D] (N, M >= 2).

    With min(N, M) <= D, trace (S_a S_b)^(1/2) is the nuclear norm of X_a X_b^T (the
    centred, scaled features; the singular values of X_a X_b^T are the square roots of the
    eigenvalues of S_a S_b): exact without a D x D matrix square root.
    """
    mu_a, a = _centred(features_a)
    mu_b, b = _centred(features_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape} and {mu_b.shape}.")
    if min(a.shape[0], b.shape[0]) > a.shape[1]:
        return fid_from_stats(mu_a, a.T @ a, mu_b, b.T @ b)
    diff = mu_a - mu_b
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_sqrt)


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


def report(
    outputs: dict[str, np.ndarray], reference: dict[str, Any], *, splits: int, k: int
) -> dict[str, float]:
    """FID, Inception Score (mean, std) and, when the reference has features, precision/recall.

    `outputs`: {"pool_3" [N, D], "logits" [N, C]} of the samples; `reference`: statistics as
    `load_statistics` returns them. Precision/recall need more than `k` points on each side.
    """
    result = {"fid": fid_to_reference(outputs["pool_3"], reference["mu"], reference["sigma"])}
    result["inception_score"], result["inception_score_std"] = inception_score(
        outputs["logits"], splits=splits, from_logits=True
    )
    if "features" in reference and min(len(reference["features"]), len(outputs["pool_3"])) > k:
        result["precision"], result["recall"] = precision_recall(
            reference["features"], outputs["pool_3"], k=k
        )
    return result


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


def load_statistics(
    path: str | epath.PathLike, *, feature_dim: int | None = None, images: bool = False
) -> dict[str, Any]:
    """Reads reference statistics (our .npz or an ADM reference batch) and checks every shape.

    Returns "mu" [D] and "sigma" [D, D], "features" [N, D] and "num_examples" when stored,
    and with `images`, in a file without features, an ADM batch's uint8 images
    [N, H, W, 3] (its "arr_0") as "images", to compute the features from.
    Other arrays (sFID's "mu_s", "sigma_s") are not read. `feature_dim` is the D the caller's
    network produces (`inception.FEATURE_DIM`); a file of another D is an error here rather
    than after sampling.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"reference statistics {path} not found; write them with "
            "`python -m maskgit_jax.evaluate --mode=reference ...`."
        )
    try:
        with path.open("rb") as f, np.load(f) as data:
            stored = sorted(data.files)
            wanted = ["mu", "sigma", "features", "num_examples"]
            if images and "features" not in stored:
                wanted.append(ADM_IMAGES_KEY)
            stats = {key: data[key] for key in wanted if key in stored}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not an .npz statistics file ({e}).") from e
    for key in ("mu", "sigma"):
        if key not in stats:
            raise ValueError(f"{path} has no {key!r} array (it holds {stored}).")
    d = stats["mu"].shape[-1] if stats["mu"].ndim else 0
    if stats["mu"].shape != (d,) or stats["sigma"].shape != (d, d):
        raise ValueError(
            f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not [D], [D, D]."
        )
    if feature_dim is not None and d != feature_dim:
        raise ValueError(
            f"{path} holds statistics of {d}-d features (mu {stats['mu'].shape}); the FID "
            f"Inception network's pool_3 features are {feature_dim}-d."
        )
    if "features" in stats and stats["features"].shape[1:] != (d,):
        raise ValueError(f"{path}: features {stats['features'].shape} are not [N, {d}].")
    if ADM_IMAGES_KEY in stats:
        pictures = stats.pop(ADM_IMAGES_KEY)
        if pictures.dtype != np.uint8 or pictures.ndim != 4 or pictures.shape[-1] != 3:
            raise ValueError(
                f"{path}: {ADM_IMAGES_KEY!r} is {pictures.dtype} {pictures.shape}; an ADM "
                "reference batch holds uint8 images [N, H, W, 3]."
            )
        stats["images"] = pictures
    return stats
