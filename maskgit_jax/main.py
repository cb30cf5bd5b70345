r"""Trains MaskGIT: the tokenizer stage, the transformer stage, or both in sequence.

  python -m maskgit_jax.main --config=configs/imagenet256.py --workdir=gs://bucket/run

The config's `stage` picks `train_tokenizer` or `train_transformer` (or "both": the
tokenizer in WORKDIR/tokenizer, then the transformer on it in WORKDIR/transformer).
"""

import jax
from absl import app, flags, logging
from clu import platform
from ml_collections import config_flags

from maskgit_jax import config_lib, train_tokenizer, train_transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
flags.mark_flags_as_required(["config", "workdir"])


def train_and_evaluate(config, workdir: str) -> None:
    """Runs the stage(s) the config names."""
    config_lib.validate(config)
    if config.stage == "tokenizer":
        train_tokenizer.train_and_evaluate(config, workdir)
    elif config.stage == "transformer":
        train_transformer.train_and_evaluate(config, workdir)
    else:
        tokenizer_dir = f"{workdir.rstrip('/')}/tokenizer"
        train_tokenizer.train_and_evaluate(config, tokenizer_dir)
        config = config.copy_and_resolve_references()
        config.training.tokenizer_checkpoint = tokenizer_dir
        train_transformer.train_and_evaluate(config, f"{workdir.rstrip('/')}/transformer")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _is_multiprocess_job():
        jax.distributed.initialize()
    logging.info(
        "JAX process %d/%d; local devices %s; %d devices in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )
    platform.work_unit().set_task_status(
        f"process_index: {jax.process_index()}, process_count: {jax.process_count()}"
    )
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _is_multiprocess_job() -> bool:
    """True on a multi-host TPU slice or a multi-task SLURM job (JAX detects the rest)."""
    import os

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hostnames


if __name__ == "__main__":
    app.run(main)
