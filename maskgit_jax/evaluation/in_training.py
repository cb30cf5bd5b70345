"""Sample-quality metrics inside training: FID/IS of samples, rFID of reconstructions.

Enabled by `config.evaluation.inception_path` (TensorFlow's 2015-12-05 Inception graph, see
`maskgit_jax.evaluation.inception`); they run inside the held-out evaluation, every
`evaluation.every_steps` steps (0: at every one).

Transformer stage (`SampleQuality`): `evaluation.num_samples` images are sampled by
`MaskGITPipeline` with the config's sampling options at the training compute dtype (labels
0..num_classes-1 repeated, each process its share, label i with the key of row i, so the
images do not depend on the process count; the batches split over the process's devices);
their Inception outputs give `fid` against the reference statistics, `inception_score` (and
its std), and `precision`/`recall` when the reference holds raw features. The reference is
`evaluation.reference_statistics` (our .npz or an ADM reference batch, whose images give the
features when `keep_reference_features` is set), or, when that is empty, the eval split's
statistics computed once (as `evaluate --mode=reference` does) and cached in
WORKDIR/fid_reference.npz, so that restarts reuse it (delete it to recompute).

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

from maskgit_jax import config_lib, multihost
from maskgit_jax.decoding.options import DecodeOptions
from maskgit_jax.evaluation import inception, metrics, reference_sets, samples
from maskgit_jax.sampling.pipeline import MaskGITPipeline

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
        return metrics.fid_between(real, reconstructed)


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

    Built once per run, before training (the reference file named in the config is read and
    checked, the decoding options validated); call it at an evaluation step on every process
    with the tokenizer variables and the transformer's sampling parameters. The samples come
    from one `MaskGITPipeline` on this process's devices, made at the first call and given
    the new weights at each later one, so its compiled programs are reused.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | epath.PathLike,
        inception_fn: InceptionNetwork,
        dtype: Any = None,
    ):
        self.config = config
        self.settings = config_lib.evaluation_settings(config)
        self.inception_fn = inception_fn
        self.mesh = inception_fn.mesh
        self.workdir = epath.Path(workdir)
        # The transformer's compute dtype (default: the training config's).
        self.dtype = jnp.dtype(config.training.compute_dtype if dtype is None else dtype).name
        self.options = DecodeOptions.from_config(config, dtype=self.dtype)
        self.pipeline: MaskGITPipeline | None = None
        given = self.settings.reference_statistics
        if given and not epath.Path(given).exists():
            raise FileNotFoundError(
                f"evaluation.reference_statistics={given!r} does not exist; write it with "
                "`python -m maskgit_jax.evaluate --mode=reference ...`, or leave it empty to "
                "compute the eval split's statistics during training."
            )
        check_batch_split(config, self.mesh.size)
        try:
            self.share = samples.process_share(self.settings.num_samples, config.num_classes)
        except ValueError as error:
            raise ValueError(f"evaluation.num_samples: {error}") from None
        # One seed for every evaluation: the values then follow the model, not the noise.
        self.rng = jax.random.PRNGKey(config.seed)
        # A given file is read (and its shapes checked) now, an eval-split one at first use.
        self._reference: dict[str, Any] | None = None
        if given:
            self._reference = metrics.load_statistics(
                given,
                feature_dim=inception.FEATURE_DIM,
                images=bool(self.settings.keep_reference_features),
            )

    def reference(self) -> dict[str, Any]:
        """The reference statistics: read, or computed and cached, once per run.

        A given ADM reference batch's images (kept with `keep_reference_features`) become
        its features here, for precision/recall.
        """
        if self._reference is None:
            self._reference = self._cached_or_computed_reference()
        if "images" in self._reference:
            self._reference = reference_sets.with_image_features(
                self._reference, self.inception_fn, self.settings.batch_size
            )
        return self._reference

    def _cached_or_computed_reference(self) -> dict[str, Any]:
        path = self.workdir / REFERENCE_FILE
        if path.exists():
            stats = metrics.load_statistics(path, feature_dim=inception.FEATURE_DIM)
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
        features = reference_sets.eval_split_features(
            self.config, self.inception_fn, batch_size, max_batches=max_batches
        )
        features = multihost.gather_rows(features)
        return features[:limit] if limit else features

    def _sampler(self, tokenizer_variables: Any, transformer_variables: Any) -> MaskGITPipeline:
        """The pipeline with these weights: made at the first call, then given new weights."""
        if self.pipeline is None:
            self.pipeline = MaskGITPipeline(
                self.config,
                tokenizer_variables,
                transformer_variables,
                devices=list(self.mesh.devices.flat),
                keep_cast_weights=False,
            )
            self.options = self.pipeline.options(dtype=self.dtype)
        else:
            self.pipeline.set_variables(tokenizer_variables, transformer_variables)
        return self.pipeline

    def __call__(self, tokenizer_variables: Any, transformer_params: Any) -> dict[str, float]:
        """Samples, Inception outputs and the metrics (a collective: call on every process)."""
        stats = self.reference()
        started = time.time()
        pipe = self._sampler(
            multihost.host_copy(tokenizer_variables),
            multihost.host_copy({"params": transformer_params}),
        )
        with multihost.local_context(pipe.mesh):
            outputs = samples.sample_outputs(
                samples.pipeline_sample_fn(pipe, self.rng, self.options),
                self.inception_fn,
                self.share,
                batch_size=self.settings.batch_size,
            )
        outputs = {key: multihost.gather_rows(value) for key, value in outputs.items()}
        result = metrics.report(
            outputs,
            stats,
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
