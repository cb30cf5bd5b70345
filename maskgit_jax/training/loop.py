"""The training loop both stages share: sharded state, resumable checkpoints, metrics, guards.

A stage (tokenizer or transformer) describes itself as a `Stage`: how to build its state,
its jittable train step, and what to do periodically (evaluate, sample, export). The loop
owns everything else: the mesh, the Orbax manager, resuming, SIGTERM, NaN checks, writers.
"""

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath

from maskgit_jax import config_lib, paths, sharding
from maskgit_jax.checkpoints import manager as checkpoints
from maskgit_jax.data import input_pipeline
from maskgit_jax.models import attention

PyTree = Any
StepFn = Callable[[PyTree, dict[str, jax.Array], PyTree], tuple[PyTree, dict[str, jax.Array]]]
TrainerT = TypeVar("TrainerT")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class BadStateError(FloatingPointError):
    """The parameters became non-finite or exploded; nothing after the last good step is saved."""


@dataclasses.dataclass
class Stage:
    """What a training stage provides to the shared loop.

    Attributes:
      name: "tokenizer" or "transformer" (used in logs).
      training: the stage's training sub-config (batch_size, num_train_steps, ...).
      init_state: rng -> train state whose params may carry logical-partitioning boxes.
      train_step: (state, global batch, constants) -> (state, scalar metrics); jitted by the
        loop with sharded inputs/outputs and the state donated.
      constants: frozen inputs of the step (e.g. the tokenizer's params), or None.
      on_eval: (state, step, writer) -> None, called every `logging.eval_every_steps`.
      on_sample: (state, step, writer) -> None, called every `logging.sample_every_steps`.
      export: (state) -> None, writes the stage's models for later use (end of training).
      batches: (start_step) -> iterator of per-process numpy batches, replacing the image
        pipeline (e.g. pre-tokenized data).
    """

    name: str
    training: ml_collections.ConfigDict
    init_state: Callable[[jax.Array], PyTree]
    train_step: StepFn
    constants: PyTree = None
    on_eval: Callable[[PyTree, int, Any], None] | None = None
    on_sample: Callable[[PyTree, int, Any], None] | None = None
    export: Callable[[PyTree], None] | None = None
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]] | None = None


@dataclasses.dataclass(frozen=True)
class BuiltStage(Generic[TrainerT]):
    """What a stage's `build_stage` returns: its `Stage` (no periodic hooks) and its trainer.

    Training, `aot_compile`, the benchmarks and the tests all build a stage this way, so they
    compile one and the same step; `train_and_evaluate` adds the hooks (`dataclasses.replace`).
    """

    stage: Stage
    trainer: TrainerT


@dataclasses.dataclass
class ShardedSetup:
    """The mesh with the state's abstract shapes and shardings (boxes stripped)."""

    mesh: jax.sharding.Mesh
    rules: Any
    abstract_state: PyTree
    state_shardings: PyTree
    constants_shardings: PyTree

    def activate(self):
        """Context for tracing: the mesh and the logical-axis rules."""
        return _Contexts(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))


class _Contexts:
    def __init__(self, *contexts):
        self._contexts = contexts

    def __enter__(self):
        for context in self._contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)


def create_sharded_setup(
    config: ml_collections.ConfigDict, stage: Stage, mesh: jax.sharding.Mesh | None = None
) -> ShardedSetup:
    """Builds the mesh and derives state shardings from logical names (FSDP fallback)."""
    mesh = mesh or sharding.create_mesh(config.mesh)
    sharding.check_batch_divisible(stage.training.batch_size, mesh)
    rules = tuple(tuple(rule) for rule in config.mesh.logical_axis_rules)
    # The key is made before the mesh is set: eager ops under a mesh of devices this process
    # cannot run on (an ahead-of-time TPU topology) fail.
    key = jax.random.PRNGKey(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(stage.init_state, key)
        shardings = sharding.strip_boxes(sharding.state_shardings(boxed, mesh, rules))
        constants_shardings = None
        if stage.constants is not None:
            constants_shardings = sharding.state_shardings(stage.constants, mesh, rules)
    return ShardedSetup(mesh, rules, sharding.strip_boxes(boxed), shardings, constants_shardings)


def preflight(config: ml_collections.ConfigDict, stages: Sequence[str]) -> None:
    """Checks, before any stage starts, what each of the run's `stages` needs of the devices.

    A `stage=both` run then fails on a transformer batch the mesh cannot split, or on a
    MASKGIT_JAX_ATTENTION naming no attention implementation, before the tokenizer has trained
    for hours.
    """
    if "transformer" in stages:
        attention.default_attention()
    mesh = sharding.create_mesh(config.mesh)
    for name in stages:
        section = config_lib.TRAINING_SECTIONS[name]
        batch_size = config[section].batch_size
        try:
            sharding.check_batch_divisible(batch_size, mesh)
        except ValueError as e:
            raise ValueError(f"{name} stage ({section}.batch_size): {e}") from None
        if batch_size % jax.process_count():
            raise ValueError(
                f"{name} stage: {section}.batch_size={batch_size} is not divisible by the "
                f"{jax.process_count()} processes (each reads an equal share)."
            )


def init_state(setup: ShardedSetup, stage: Stage, seed: int) -> PyTree:
    """Initialises the state directly sharded (no full copy on any one device)."""
    with setup.activate():
        init = jax.jit(
            lambda rng: sharding.strip_boxes(stage.init_state(rng)),
            out_shardings=setup.state_shardings,
        )
        return init(jax.random.PRNGKey(seed))


def jit_train_step(setup: ShardedSetup, stage: Stage) -> Callable:
    """Jits the stage's step with explicit shardings; the state's buffers are donated."""
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    batch_sharding = sharding.batch_sharding(setup.mesh)
    return jax.jit(
        stage.train_step,
        in_shardings=(setup.state_shardings, batch_sharding, setup.constants_shardings),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=(0,),
    )


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
    stacked = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]}


def _resume_advice(last_good: int | None, checkpoint_dir: epath.Path) -> str:
    if last_good is None:
        return "No checkpoint of this run was saved before it."
    return (
        f"The last good checkpoint is step {last_good} in {checkpoint_dir}; nothing later was "
        "saved. Lower the learning rate, enable gradient clipping or use float32 compute, "
        "and resume from it."
    )


def _check_finite(
    metrics: dict[str, float], step: int, name: str, last_good: int | None, directory
) -> None:
    if not np.isfinite(metrics.get("loss", 0.0)):
        raise NonFiniteLossError(
            f"{name} training loss is {metrics['loss']} at or before step {step}; stopping. "
            + _resume_advice(last_good, directory)
        )


def _params_of(state: PyTree) -> PyTree:
    """The trained parameters of a stage's state (the whole state if it has no `params`)."""
    return getattr(state, "params", state)


@jax.jit
def state_health(state: PyTree) -> tuple[jax.Array, jax.Array]:
    """(every floating leaf of the state is finite, largest |parameter|), as two scalars."""
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
    params = [
        x for x in jax.tree.leaves(_params_of(state)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in params]))
    return finite, largest


def check_state(
    state: PyTree, step: int, name: str, max_abs: float, last_good: int | None, directory
) -> None:
    """Raises BadStateError if the state is non-finite or a parameter exceeds `max_abs` (> 0)."""
    finite, largest = (float(x) for x in jax.device_get(state_health(state)))
    if not finite:
        problem = "non-finite values (NaN or inf) in the train state"
    elif max_abs and not largest <= max_abs:
        problem = (
            f"a parameter of magnitude {largest:.3g} (above checkpoint.max_abs_param="
            f"{max_abs:g}): training has diverged"
        )
    else:
        return
    raise BadStateError(
        f"{name} at step {step}: {problem}; stopping without saving it. "
        + _resume_advice(last_good, directory)
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    stage: Stage,
    setup: ShardedSetup | None = None,
) -> PyTree:
    """Trains `stage` in `workdir`, resuming from its latest readable checkpoint."""
    training, log_config = stage.training, config.logging
    workdir = paths.absolute(workdir)
    setup = setup or create_sharded_setup(config, stage)
    checkpoint_dir = workdir / "checkpoints"
    manager = checkpoints.create_checkpoint_manager(
        checkpoint_dir,
        save_every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
    )
    target = sharding.with_shardings(setup.abstract_state, setup.state_shardings)
    restored = checkpoints.restore_latest(manager, target)
    if restored is None:
        state, step = init_state(setup, stage, config.seed), 0
        logging.info("%s: starting from scratch.", stage.name)
    else:
        state, _, step = restored
        logging.info("%s: resumed from step %d.", stage.name, step)
    # The newest step known to be good: restored, or saved after passing the guards.
    last_good = None if restored is None else step
    max_abs = config.checkpoint.get("max_abs_param", 0.0)

    if stage.batches is not None:
        train_iter = stage.batches(step)
    else:
        train_iter, _, _ = input_pipeline.create_datasets(
            config.dataset,
            image_size=config.image_size,
            global_batch_size=training.batch_size,
            seed=config.seed,
            start_step=step,
        )
    step_fn = jit_train_step(setup, stage)
    constants = None
    if stage.constants is not None:
        constants = place_on_mesh(stage.constants, setup.constants_shardings)
    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0
    )
    report = periodic_actions.ReportProgress(
        num_train_steps=training.num_train_steps,
        writer=writer,
        every_steps=log_config.log_every_steps,
    )
    metadata = {"config": config.to_json(), "stage": stage.name}
    unchecked: list[dict[str, jax.Array]] = []
    history: list[dict[str, jax.Array]] = []

    def checked_save(force: bool) -> None:
        # Never save a state produced after a non-finite loss, or itself non-finite/exploded.
        nonlocal last_good
        if unchecked:
            _check_finite(_mean_metrics(unchecked), step, stage.name, last_good, checkpoint_dir)
            unchecked.clear()
        check_state(state, step, stage.name, max_abs, last_good, checkpoint_dir)
        checkpoints.save(manager, step, state, metadata, force=force)
        last_good = step

    def evaluate_and_sample(state: Any, step: int) -> None:
        """The stage's eval and samples, where `step` is due for them."""
        if stage.on_eval and _due(step, log_config.eval_every_steps):
            stage.on_eval(state, step, writer)
        if stage.on_sample and _due(step, log_config.sample_every_steps):
            stage.on_sample(state, step, writer)

    preemption = checkpoints.PreemptionHandler().install()
    previous_loss = None
    try:
        with setup.activate():
            while step < training.num_train_steps:
                batch = input_pipeline.make_global_batch(next(train_iter), setup.mesh)
                state, metrics = step_fn(state, batch, constants)
                step += 1
                # Keep the host at most one step ahead of the device: the next batch is
                # prepared while this step runs, but a preemption save (and the logged
                # steps/s and ETA) never waits behind a queue of dispatched steps.
                if previous_loss is not None:
                    previous_loss.block_until_ready()
                previous_loss = metrics["loss"]
                history.append(metrics)
                unchecked.append({"loss": metrics["loss"]})
                report(step)
                if step % log_config.log_every_steps == 0 or step == training.num_train_steps:
                    summary = _mean_metrics(history)
                    history.clear()
                    _check_finite(summary, step, stage.name, last_good, checkpoint_dir)
                    unchecked.clear()
                    writer.write_scalars(step, summary)
                if manager.should_save(step):
                    checked_save(force=False)
                if preemption.should_stop(step):
                    logging.warning(
                        "%s: preempted at step %d; saving and exiting.", stage.name, step
                    )
                    if manager.latest_step() != step:  # Not already saved just above.
                        checked_save(force=True)
                    # The resumed run starts after this step, so its due eval and samples run
                    # now, once the checkpoint is on disk: a grace period that ends during
                    # them loses only them.
                    manager.wait_until_finished()
                    evaluate_and_sample(state, step)
                    break
                evaluate_and_sample(state, step)
            else:
                if manager.latest_step() != step:
                    checked_save(force=True)
                if stage.export:
                    stage.export(state)
    finally:
        preemption.uninstall()
        manager.wait_until_finished()
        writer.flush()
    return state


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def place_on_mesh(tree: PyTree, shardings: PyTree) -> PyTree:
    """Places host arrays (identical on every process) as global arrays with `shardings`."""

    def place(x, sharding_):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])

    return jax.tree.map(place, tree, shardings)
