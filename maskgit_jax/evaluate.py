r"""FID, Inception Score and precision/recall of a pretrained MaskGIT, and reference statistics.

Samples (class labels 0, 1, ..., num_classes-1 repeated up to --num_samples):

  python -m maskgit_jax.evaluate --checkpoint=PRETRAINED_DIR \
    --inception=classify_image_graph_def.pb --reference=STATS.npz \
    --num_samples=50000 --batch_size=64 [--num_steps=12 --guidance_scale=... \
    --acceptance_rate=0.05 --inception_label_map=imagenet_2012_challenge_label_map_proto.pbtxt]

Reference statistics of a dataset's eval split (any dataset the input pipeline reads):

  python -m maskgit_jax.evaluate --mode=reference --config=configs/imagenet256.py \
    --inception=classify_image_graph_def.pb --output=STATS.npz [--keep_features]

--inception is TensorFlow's 2015-12-05 graph (`classify_image_graph_def.pb`, or the
inception-2015-12-05.tgz that holds it; see `maskgit_jax.evaluation.inception`).
--reference is our statistics file or an ADM reference batch (e.g.
VIRTUAL_imagenet256_labeled.npz). Precision/recall need the reference's raw features
(--keep_features when writing it) or an ADM batch's images, whose features are computed once.
The decoding options default to the checkpoint config's `sampling` values. Every input is
checked before anything is sampled. Label i is sampled with the key of row i, so the images are
those of one `MaskGITPipeline.generate(labels, rng)` call whatever the batch size or process
count. Run as several processes (one per host: SLURM's srun, mpirun, a Cloud TPU slice on
GKE, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID; see
`maskgit_jax.cluster`), each samples its contiguous share of the labels, and the features are
gathered before the metrics are computed.
"""

import os
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from maskgit_jax import cluster, multihost
from maskgit_jax.decoding import options as decode_options
from maskgit_jax.evaluation import inception, metrics, reference_sets, rejection, samples
from maskgit_jax.sampling.pipeline import MaskGITPipeline

FLAGS = flags.FLAGS

# Decoding option flags, passed to `MaskGITPipeline.options` (None: the config's value).
OPTION_FLAGS = (
    "num_steps",
    "schedule",
    "choice_temperature",
    "temperature",
    "guidance_scale",
    "top_k",
    "ordering",
    "dtype",
)


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
    flags.DEFINE_string(
        "reference", None, "Reference statistics .npz or ADM reference batch (sample mode)."
    )
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
    flags.DEFINE_bool(
        "precision_recall",
        True,
        "Precision/recall, when the reference has features or (ADM batch) images.",
    )
    flags.DEFINE_integer("pr_k", 3, "Nearest neighbours of precision/recall manifolds.")
    flags.DEFINE_integer("num_steps", None, "Decoding steps.")
    flags.DEFINE_string("schedule", None, "Mask schedule (cosine, linear, ..., pow<k>).")
    flags.DEFINE_float("choice_temperature", None, "Initial re-masking Gumbel temperature.")
    flags.DEFINE_float("temperature", None, "Softmax temperature of token sampling.")
    flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.")
    flags.DEFINE_bool(
        "force_guidance", False, "Guide although the config reports no label dropout."
    )
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely codes.")
    flags.DEFINE_enum("ordering", None, decode_options.ORDERINGS, "Reveal order.")
    flags.DEFINE_enum("dtype", None, decode_options.DTYPES, "Transformer compute dtype.")
    config_flags.DEFINE_config_file("config", None, "Dataset config (reference mode).")
    flags.DEFINE_string(
        "output",
        None,
        "Reference mode: .npz to write. Sample mode: optional .npz of the samples' "
        "statistics and features.",
    )
    flags.DEFINE_bool("keep_features", False, "Also store the raw features (for precision/recall).")


def _check_counts() -> None:
    """Sample counts the metrics can use, and a batch this process's devices split."""
    if FLAGS.num_samples < max(2, jax.process_count()):
        raise app.UsageError(
            f"--num_samples={FLAGS.num_samples}: FID needs at least 2 samples, and every one of "
            f"the {jax.process_count()} processes at least one."
        )
    if not 1 <= FLAGS.is_splits <= FLAGS.num_samples:
        raise app.UsageError(f"--is_splits={FLAGS.is_splits} must be in [1, --num_samples].")
    num_devices = jax.local_device_count()
    if FLAGS.batch_size < 1 or FLAGS.batch_size % num_devices:
        raise app.UsageError(
            f"--batch_size={FLAGS.batch_size} must be a positive multiple of the {num_devices} "
            "local devices (each batch is split over them)."
        )


def evaluate_samples() -> dict[str, float]:
    """Sample mode: every input checked, then samples, Inception outputs, metrics."""
    for name in ("checkpoint", "reference"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required in sample mode.")
    _check_counts()
    reference = metrics.load_statistics(
        FLAGS.reference, feature_dim=inception.FEATURE_DIM, images=FLAGS.precision_recall
    )
    if not FLAGS.precision_recall:
        reference.pop("features", None)
    class_index = None
    if FLAGS.acceptance_rate < 1.0:
        if not FLAGS.inception_label_map:
            raise app.UsageError(
                "--acceptance_rate < 1 ranks samples by the Inception network's class "
                "probability and needs --inception_label_map (see evaluation/rejection.py)."
            )
        class_index = rejection.inception_class_index(FLAGS.inception_label_map)
    pipe = MaskGITPipeline.from_pretrained(FLAGS.checkpoint, devices=jax.local_devices())
    options = pipe.options(
        **{name: FLAGS[name].value for name in OPTION_FLAGS},
        force_guidance=FLAGS.force_guidance,
    )
    share = samples.process_share(FLAGS.num_samples, pipe.config.num_classes, FLAGS.acceptance_rate)
    # Inception on the sampler's mesh: the images it samples stay on the devices.
    inception_fn = inception.make_apply_fn(
        inception.load_inception_params(FLAGS.inception), pipe.mesh
    )
    reference = reference_sets.with_image_features(reference, inception_fn, FLAGS.batch_size)
    logging.info(
        "Sampling %d images (%d on this process) with %s.",
        FLAGS.num_samples,
        len(share.labels),
        options,
    )
    outputs = samples.sample_outputs(
        samples.pipeline_sample_fn(pipe, jax.random.PRNGKey(FLAGS.seed), options),
        inception_fn,
        share,
        batch_size=FLAGS.batch_size,
        class_index=class_index,
    )
    outputs = {key: multihost.gather_rows(value) for key, value in outputs.items()}
    if FLAGS.output and jax.process_index() == 0:
        metrics.save_statistics(FLAGS.output, outputs["pool_3"], keep_features=True)
    return metrics.report(outputs, reference, splits=FLAGS.is_splits, k=FLAGS.pr_k)


def write_reference() -> dict[str, Any]:
    """Reference mode: features of a dataset's eval split -> statistics file."""
    if FLAGS.config is None or not FLAGS.output:
        raise app.UsageError("--config and --output are required in reference mode.")
    inception_fn = inception.make_apply_fn(
        inception.load_inception_params(FLAGS.inception), multihost.local_mesh()
    )
    features = multihost.gather_rows(
        reference_sets.eval_split_features(FLAGS.config, inception_fn, FLAGS.batch_size)
    )
    if jax.process_index() == 0:
        metrics.save_statistics(FLAGS.output, features, keep_features=FLAGS.keep_features)
    return {"num_examples": len(features), "output": FLAGS.output}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.inception:
        raise app.UsageError("--inception is required (" + inception.DOWNLOAD_HELP + ")")
    inception.check_file(FLAGS.inception)
    decision = cluster.initialize(os.environ)
    logging.info("%s; multi-process: %s.", cluster.describe(), decision.reason)
    result = evaluate_samples() if FLAGS.mode == "sample" else write_reference()
    if jax.process_index() == 0:
        for key, value in result.items():
            logging.info("%s: %s", key, value)
            print(f"{key}: {value}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
