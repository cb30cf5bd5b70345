r"""FID, Inception Score and precision/recall of a pretrained MaskGIT, and reference statistics.

Samples (class labels 0, 1, ..., num_classes-1 repeated up to --num_samples):

  python -m maskgit_jax.evaluate --checkpoint=PRETRAINED_DIR \
    --inception=classify_image_graph_def.pb --reference=STATS.npz \
    --num_samples=50000 --batch_size=64 [--acceptance_rate=0.05 \
    --inception_label_map=imagenet_2012_challenge_label_map_proto.pbtxt]

Reference statistics of a dataset's eval split (any dataset the input pipeline reads):

  python -m maskgit_jax.evaluate --mode=reference --config=configs/imagenet256.py \
    --inception=classify_image_graph_def.pb --output=STATS.npz [--keep_features]

--inception is TensorFlow's 2015-12-05 graph (`classify_image_graph_def.pb`, or the
inception-2015-12-05.tgz that holds it; see `maskgit_jax.evaluation.inception`).
Precision/recall need the reference's raw features (--keep_features when writing it).
Batches are split over this process's devices; with several processes each samples its
share of the labels and the features are gathered before the metrics are computed.
"""

from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from maskgit_jax import multihost
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.evaluation import inception, metrics, rejection
from maskgit_jax.sampling import sampler as sampling

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defines the command's flags, only when run as a program.

    Importing this module beside another command (`maskgit_jax.sample` has --mode too)
    then cannot clash in absl's global flag registry.
    """
    flags.DEFINE_enum("mode", "sample", ["sample", "reference"], "What to compute.")
    flags.DEFINE_string("checkpoint", None, "Pretrained directory (sample mode).")
    flags.DEFINE_string(
        "inception", None, "classify_image_graph_def.pb or inception-2015-12-05.tgz."
    )
    flags.DEFINE_string("reference", None, "Reference statistics .npz (sample mode).")
    flags.DEFINE_integer("num_samples", 50000, "Images to sample.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch and process.")
    flags.DEFINE_float(
        "acceptance_rate", 1.0, "Fraction of candidates kept per class by rejection sampling."
    )
    flags.DEFINE_string(
        "inception_label_map",
        None,
        "imagenet_2012_challenge_label_map_proto.pbtxt from the same .tgz: maps ImageNet class "
        "ids to the Inception graph's logit columns (needed for --acceptance_rate < 1).",
    )
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("is_splits", 10, "Inception Score splits.")
    flags.DEFINE_integer("pr_k", 3, "Nearest neighbours of precision/recall manifolds.")
    config_flags.DEFINE_config_file("config", None, "Dataset config (reference mode).")
    flags.DEFINE_string(
        "output",
        None,
        "Reference mode: .npz to write. Sample mode: optional .npz of the samples' "
        "statistics and features.",
    )
    flags.DEFINE_bool("keep_features", False, "Also store the raw features (for precision/recall).")


def process_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels of this process: its share of 0..num_classes-1 repeated up to `num_samples`."""
    labels = np.arange(num_samples) % num_classes
    return np.array_split(labels, jax.process_count())[jax.process_index()]


class ShardedSampler:
    """Images for a batch of labels, the batch split over `mesh` (one compiled program).

    The variables (host arrays, or arrays this process can read whole) are replicated over
    `mesh`; `sampler` is a `sampling.MaskGITSampler` of the models' config.
    """

    def __init__(
        self,
        sampler: sampling.MaskGITSampler,
        tokenizer_variables: Any,
        transformer_variables: Any,
        mesh: Mesh,
    ):
        self.sampler = sampler
        replicated = NamedSharding(mesh, PartitionSpec())
        self.tokenizer_variables = jax.device_put(tokenizer_variables, replicated)
        self.transformer_variables = jax.device_put(transformer_variables, replicated)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    @classmethod
    def from_pretrained(cls, model: pretrained.Pretrained, mesh: Mesh) -> "ShardedSampler":
        """A sampler of a loaded pretrained pair."""
        return cls(
            sampling.MaskGITSampler(model.config),
            model.tokenizer_variables,
            model.transformer_variables,
            mesh,
        )

    def __call__(self, labels: np.ndarray, rng: jax.Array) -> jax.Array:
        labels = jax.device_put(labels.astype(np.int32), self.batch_sharding)
        return self.sampler.sample(
            self.tokenizer_variables, self.transformer_variables, labels, rng
        )


def sample_outputs(
    sample_fn: Any,
    inception_fn: Any,
    labels: np.ndarray,
    rng: jax.Array,
    *,
    batch_size: int,
    acceptance_rate: float = 1.0,
    class_index: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """{"pool_3", "logits"} of the (rejection-)sampled images for `labels`."""
    return rejection.rejection_sample(
        sample_fn,
        inception_fn,
        labels,
        rng,
        acceptance_rate=acceptance_rate,
        batch_size=batch_size,
        class_index=class_index,
        keep_fn=lambda images, out: {"pool_3": out["pool_3"], "logits": out["logits"]},
    )


def report(
    outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, splits: int, k: int
) -> dict[str, float]:
    """FID against `reference`, IS, and precision/recall when the reference has features."""
    mu, sigma = metrics.compute_statistics(outputs["pool_3"])
    result = {"fid": metrics.fid_from_stats(mu, sigma, reference["mu"], reference["sigma"])}
    result["inception_score"], result["inception_score_std"] = metrics.inception_score(
        outputs["logits"], splits=splits, from_logits=True
    )
    if "features" in reference:
        result["precision"], result["recall"] = metrics.precision_recall(
            reference["features"], outputs["pool_3"], k=k
        )
    return result


def evaluate_samples() -> dict[str, float]:
    """Sample mode: samples, Inception outputs, metrics."""
    for name, value in (("checkpoint", FLAGS.checkpoint), ("reference", FLAGS.reference)):
        if not value:
            raise app.UsageError(f"--{name} is required in sample mode.")
    reference = metrics.load_statistics(FLAGS.reference)
    class_index = None
    if FLAGS.acceptance_rate < 1.0:
        if not FLAGS.inception_label_map:
            raise app.UsageError(
                "--acceptance_rate < 1 ranks samples by the Inception network's class "
                "probability and needs --inception_label_map (see evaluation/rejection.py)."
            )
        class_index = rejection.inception_class_index(FLAGS.inception_label_map)
    mesh = multihost.local_mesh()
    if FLAGS.batch_size % mesh.size:
        raise app.UsageError(f"--batch_size must be a multiple of the {mesh.size} local devices.")
    model = pretrained.load_pretrained(FLAGS.checkpoint)
    inception_fn = inception.make_apply_fn(inception.load_inception_params(FLAGS.inception), mesh)
    labels = process_labels(FLAGS.num_samples, model.config.num_classes)
    rng = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), jax.process_index())
    outputs = sample_outputs(
        ShardedSampler.from_pretrained(model, mesh),
        inception_fn,
        labels,
        rng,
        batch_size=FLAGS.batch_size,
        acceptance_rate=FLAGS.acceptance_rate,
        class_index=class_index,
    )
    outputs = {key: multihost.gather_rows(value) for key, value in outputs.items()}
    if FLAGS.output and jax.process_index() == 0:
        metrics.save_statistics(FLAGS.output, outputs["pool_3"], keep_features=True)
    return report(outputs, reference, splits=FLAGS.is_splits, k=FLAGS.pr_k)


def reference_features(
    config: Any, inception_fn: Any, batch_size: int, max_batches: int = 0
) -> np.ndarray:
    """Inception pool_3 features of the config's dataset eval split (this process's share).

    `batch_size` is per process; `max_batches` > 0 stops after that many batches.
    """
    from maskgit_jax import input_pipeline  # TensorFlow input pipeline: reference mode only

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


def write_reference() -> dict[str, Any]:
    """Reference mode: features of a dataset's eval split -> statistics file."""
    if FLAGS.config is None or not FLAGS.output:
        raise app.UsageError("--config and --output are required in reference mode.")
    inception_fn = inception.make_apply_fn(
        inception.load_inception_params(FLAGS.inception), multihost.local_mesh()
    )
    features = multihost.gather_rows(
        reference_features(FLAGS.config, inception_fn, FLAGS.batch_size)
    )
    if jax.process_index() == 0:
        metrics.save_statistics(FLAGS.output, features, keep_features=FLAGS.keep_features)
    return {"num_examples": len(features), "output": FLAGS.output}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.inception:
        raise app.UsageError("--inception is required (" + inception.DOWNLOAD_HELP + ")")
    result = evaluate_samples() if FLAGS.mode == "sample" else write_reference()
    if jax.process_index() == 0:
        for key, value in result.items():
            logging.info("%s: %s", key, value)
            print(f"{key}: {value}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
