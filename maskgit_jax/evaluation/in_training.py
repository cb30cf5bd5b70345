"""Sample-quality metrics inside training: FID/IS of samples, rFID of reconstructions.

Enabled by `config.evaluation.inception_path` (TensorFlow's 2015-12-05 Inception graph, see
`maskgit_jax.evaluation.inception`); they run inside the held-out evaluation, every
`evaluation.every_steps` steps (0: at every one).

Transformer stage (`SampleQuality`): `evaluation.num_samples` images are sampled with the
sampling parameters (labels 0..num_classes-1 repeated, each process its share, the batches
split over the process's devices), their Inception outputs give `fid` against the reference
statistics, `inception_score` (and its std), and `precision`/`recall` when the reference
holds raw features. The reference is `evaluation.reference_statistics`, or, when that is
empty, the eval split's statistics computed once (as `evaluate --mode=reference` does) and
cached in WORKDIR/fid_reference.npz, so that restarts reuse it (delete it to recompute).

Tokenizer stage (`ReconstructionFID`): the FID between the Inception features of held-out
images and those of their reconstructions over the same batches (`eval_rfid`).

The Inception parameters are read once per run (`load_inception`), before training starts.
Everything runs on a 1-D mesh over this process's devices, outside the training mesh; the
features of all processes are gathered before the metrics are computed.
"""

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from maskgit_jax import config_lib, evaluate, multihost
from maskgit_jax.evaluation import inception, metrics
from maskgit_jax.sampling import sampler as sampling

# Reference statistics computed during training, in the stage's workdir.
REFERENCE_FILE = "fid_reference.npz"
# Nearest neighbours of the precision/recall manifolds (as `evaluate --pr_k`).
PRECISION_RECALL_K = 3


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks for the Inception metrics."""
    return bool(config_lib.evaluation_settings(config).inception_path)


def due(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether the metrics run at this (held-out evaluation) step."""
    every = config_lib.evaluation_settings(config).every_steps
    return not every or step % every == 0


def check_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises if evaluation.batch_size cannot be split over this process's `num_devices`."""
    batch_size = config_lib.evaluation_settings(config).batch_size
    if batch_size % num_devices:
        raise ValueError(
            f"evaluation.batch_size={batch_size} must be a multiple of this process's "
            f"{num_devices} devices (the batch is split over them)."
        )


class InceptionNetwork:
    """The FID Inception network on this process's devices: images -> {"pool_3", "logits"}.

    Images [B, H, W, 3] in [0, 1] (any size; resized to 299x299); B is split over the
    devices (padded to a multiple of their count). Outputs are numpy.
    """

    def __init__(self, params: Any, mesh: Mesh | None = None):
        self.mesh = mesh if mesh is not None else multihost.local_mesh()
        self._apply = inception.make_apply_fn(params, self.mesh)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        with multihost.local_context(self.mesh):
            return self._apply(images)


def load_inception(config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    """Reads `evaluation.inception_path` once; a missing file is a clear error."""
    path = config_lib.evaluation_settings(config).inception_path
    if not epath.Path(path).exists():
        raise FileNotFoundError(
            f"evaluation.inception_path={path!r} does not exist. {inception.DOWNLOAD_HELP} "
            "Or set evaluation.inception_path='' to train without FID/IS/rFID."
        )
    started = time.time()
    network = InceptionNetwork(inception.load_inception_params(path), mesh)
    logging.info("Inception network read from %s in %.1f s.", path, time.time() - started)
    return network


def _centred(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    `metrics.fid_from_stats`.
    """
    mu_x, x = _centred(features)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != mu_x.shape or sigma.shape != (mu.size, mu.size):
        raise ValueError(
            f"features {np.shape(features)} do not match the reference statistics: mu "
            f"{mu.shape}, sigma {sigma.shape}."
        )
    if x.shape[0] > x.shape[1]:
        return metrics.fid_from_stats(mu_x, x.T @ x, mu, sigma)
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
        return metrics.fid_from_stats(mu_a, a.T @ a, mu_b, b.T @ b)
    diff = mu_a - mu_b
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_sqrt)


def report(
    outputs: dict[str, np.ndarray], reference: dict[str, Any], *, splits: int, k: int
) -> dict[str, float]:
    """`evaluate.report`'s metrics, with the FID of `fid_to_reference` (fast for few samples)."""
    result = {"fid": fid_to_reference(outputs["pool_3"], reference["mu"], reference["sigma"])}
    result["inception_score"], result["inception_score_std"] = metrics.inception_score(
        outputs["logits"], splits=splits, from_logits=True
    )
    # k-NN manifolds need more than k points on each side.
    if "features" in reference and min(len(reference["features"]), len(outputs["pool_3"])) > k:
        result["precision"], result["recall"] = metrics.precision_recall(
            reference["features"], outputs["pool_3"], k=k
        )
    return result


class ReconstructionFID:
    """Reconstruction FID: Inception features of inputs and reconstructions, batch by batch."""

    def __init__(self, inception_fn: Any):
        self.inception_fn = inception_fn
        self.real: list[np.ndarray] = []
        self.reconstructed: list[np.ndarray] = []

    def add(self, images: Any, reconstructions: Any, mask: np.ndarray | None = None) -> None:
        """Adds a batch pair [B, H, W, 3] in [0, 1]; `mask` [B] drops padding rows."""
        real = self.inception_fn(images)["pool_3"]
        reconstructed = self.inception_fn(reconstructions)["pool_3"]
        if mask is not None:
            mask = np.asarray(mask, bool)
            real, reconstructed = real[mask], reconstructed[mask]
        self.real.append(real)
        self.reconstructed.append(reconstructed)

    def compute(self) -> float:
        """FID between all processes' inputs and reconstructions (a collective)."""
        real = multihost.gather_rows(_concat(self.real))
        reconstructed = multihost.gather_rows(_concat(self.reconstructed))
        return fid_between(real, reconstructed)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros((0, inception.FEATURE_DIM), np.float32)
    return np.concatenate(parts)


def reconstruction_fid(
    inception_fn: Any, images: np.ndarray, reconstructions: np.ndarray, batch_size: int
) -> float:
    """The reconstruction FID of two aligned image sets [N, H, W, 3] in [0, 1].

    Inception runs on `batch_size` images at a time (`ReconstructionFID` batch by batch).
    """
    if len(images) != len(reconstructions):
        raise ValueError(f"{len(images)} images but {len(reconstructions)} reconstructions.")
    accumulator = ReconstructionFID(inception_fn)
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        accumulator.add(images[start:end], reconstructions[start:end])
    return accumulator.compute()


class SampleQuality:
    """FID / Inception Score (/ precision, recall) of the transformer stage's samples.

    Built once per run, before training (the reference file named in the config must
    exist); call it at an evaluation step on every process with the tokenizer variables and
    the transformer's sampling parameters.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | epath.PathLike,
        inception_fn: InceptionNetwork,
        dtype: Any = jnp.float32,
    ):
        self.config = config
        self.settings = config_lib.evaluation_settings(config)
        self.inception_fn = inception_fn
        self.mesh = inception_fn.mesh
        self.workdir = epath.Path(workdir)
        # An own sampler: its compiled programs are those of the local mesh, not the grid's.
        self.sampler = sampling.MaskGITSampler(config, dtype=dtype)
        given = self.settings.reference_statistics
        if given and not epath.Path(given).exists():
            raise FileNotFoundError(
                f"evaluation.reference_statistics={given!r} does not exist; write it with "
                "`python -m maskgit_jax.evaluate --mode=reference ...`, or leave it empty to "
                "compute the eval split's statistics during training."
            )
        check_batch_split(config, self.mesh.size)
        self.labels = evaluate.process_labels(self.settings.num_samples, config.num_classes)
        if not len(self.labels):
            raise ValueError(
                f"evaluation.num_samples={self.settings.num_samples} leaves process "
                f"{jax.process_index()} of {jax.process_count()} nothing to sample."
            )
        # One seed for every evaluation: the values then follow the model, not the noise.
        self.rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), jax.process_index())
        self._reference: dict[str, Any] | None = None

    @property
    def reference_path(self) -> epath.Path:
        """The statistics file the samples are compared with."""
        given = self.settings.reference_statistics
        return epath.Path(given) if given else self.workdir / REFERENCE_FILE

    def reference(self) -> dict[str, Any]:
        """The reference statistics: read, or computed and cached, once per run."""
        if self._reference is None:
            self._reference = self._load_or_compute_reference()
        return self._reference

    def _load_or_compute_reference(self) -> dict[str, Any]:
        path = self.reference_path
        if self.settings.reference_statistics:
            return metrics.load_statistics(path)
        if path.exists():
            stats = metrics.load_statistics(path)
            if "features" in stats or not self.settings.keep_reference_features:
                logging.info(
                    "FID reference statistics of %s examples read from %s.",
                    stats.get("num_examples", "?"),
                    path,
                )
                return stats
            logging.info("%s has no raw features (keep_reference_features): recomputing.", path)
        started = time.time()
        features = self._reference_features()
        keep = self.settings.keep_reference_features
        if jax.process_index() == 0:
            # Written whole, then renamed: an interrupted write leaves no truncated cache.
            temporary = path.parent / (path.name + ".tmp.npz")
            stats = metrics.save_statistics(temporary, features, keep_features=keep)
            temporary.rename(path)
        else:
            mu, sigma = metrics.compute_statistics(features)
            stats = {"mu": mu, "sigma": sigma, "num_examples": np.int64(len(features))}
            if keep:
                stats["features"] = features
        logging.info(
            "FID reference: %d eval examples in %.1f s, cached in %s.",
            len(features),
            time.time() - started,
            path,
        )
        return stats

    def _reference_features(self) -> np.ndarray:
        limit = self.settings.reference_examples
        batch_size = self.settings.batch_size
        max_batches = math.ceil(limit / (batch_size * jax.process_count())) if limit else 0
        features = evaluate.reference_features(
            self.config, self.inception_fn, batch_size, max_batches=max_batches
        )
        features = multihost.gather_rows(features)
        return features[:limit] if limit else features

    def __call__(self, tokenizer_variables: Any, transformer_params: Any) -> dict[str, float]:
        """Samples, Inception outputs and the metrics (a collective: call on every process)."""
        reference = self.reference()
        started = time.time()
        tokenizer_variables = multihost.host_copy(tokenizer_variables)
        transformer_variables = multihost.host_copy({"params": transformer_params})
        with multihost.local_context(self.mesh):
            sample_fn = evaluate.ShardedSampler(
                self.sampler, tokenizer_variables, transformer_variables, self.mesh
            )
            outputs = evaluate.sample_outputs(
                sample_fn,
                self.inception_fn,
                self.labels,
                self.rng,
                batch_size=self.settings.batch_size,
            )
        outputs = {key: multihost.gather_rows(value) for key, value in outputs.items()}
        result = report(
            outputs,
            reference,
            splits=self.settings.inception_score_splits,
            k=PRECISION_RECALL_K,
        )
        logging.info(
            "%d samples evaluated in %.1f s: %s",
            len(outputs["pool_3"]),
            time.time() - started,
            result,
        )
        return result
