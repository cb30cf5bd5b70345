r"""Trains MaskGIT: the tokenizer stage, the transformer stage, or both in sequence.

  python -m maskgit_jax.main --config=configs/imagenet256.py --workdir=gs://bucket/run

The config's `stage` picks `train_tokenizer` or `train_transformer` (or "both": the
tokenizer in WORKDIR/tokenizer, then the transformer on it in WORKDIR/transformer).
Multi-process jobs (SLURM, Open MPI, Cloud TPU slices, or an explicit coordinator) are
joined before anything else runs; see `maskgit_jax.cluster` and `--distributed`.
"""

# ruff: noqa: E402 (the allocator relaunch below must run before the heavy imports)
import os

from maskgit_jax import host_memory

# glibc reads its tunables at start-up only: restarting before jax and TF are imported costs
# milliseconds instead of their import time.
_HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

import jax
import ml_collections
from absl import app, flags, logging
from clu import platform
from etils import epath
from ml_collections import config_flags

from maskgit_jax import cluster, config_lib, paths
from maskgit_jax.evaluation import in_training
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import tokenizer as train_tokenizer
from maskgit_jax.training import transformer as train_transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    cluster.MODES,
    "Join a multi-process JAX job: auto (when SLURM, Open MPI, GKE or a coordinator address "
    "shows one), on (always; JAX detects the cluster, e.g. on Cloud TPU VMs), off.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (or JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job, with --coordinator_address (JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, with --coordinator_address (JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])

# Where `stage=both` trains each stage, under the workdir.
TOKENIZER_SUBDIR = "tokenizer"
TRANSFORMER_SUBDIR = "transformer"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Runs the stage(s) the config names, after checking every stage the run will train.

    The config is validated here, once for all of them; the stages do not validate again.
    """
    config_lib.validate(config)
    workdir = paths.absolute(workdir)
    if in_training.enabled(config):
        # The transformer stage's metrics check this too, but only after a stage=both
        # tokenizer has trained.
        in_training.check_batch_split(config, jax.local_device_count())
    train_loop.preflight(config, config_lib.stages_to_train(config))
    if config.stage == "tokenizer":
        train_tokenizer.train_and_evaluate(config, workdir, validated=True)
    elif config.stage == "transformer":
        train_transformer.train_and_evaluate(config, workdir, validated=True)
    else:
        _train_both(config, workdir)


def _train_both(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    tokenizer_dir = workdir / TOKENIZER_SUBDIR
    state = train_tokenizer.train_and_evaluate(config, tokenizer_dir, validated=True)
    done = int(jax.device_get(state.step))
    if done < config.tokenizer_training.num_train_steps:
        # Preempted: the tokenizer saved its step; the transformer needs the finished one.
        logging.warning(
            "tokenizer stage stopped at step %d of %d; rerun the same command to continue.",
            done,
            config.tokenizer_training.num_train_steps,
        )
        return
    config = config.copy_and_resolve_references()
    config.training.tokenizer_checkpoint = str(tokenizer_dir)
    train_transformer.train_and_evaluate(config, workdir / TRANSFORMER_SUBDIR, validated=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    decision = cluster.initialize(
        os.environ,
        _DISTRIBUTED.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    logging.info("%s; multi-process: %s.", cluster.describe(), decision.reason)
    logging.info("Host malloc: %s.", _HOST_MALLOC)
    platform.work_unit().set_task_status(
        f"process_index: {jax.process_index()}, process_count: {jax.process_count()}"
    )
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
