"""MaskGIT transformer (MVTM) training: masked-token prediction on tokens of a frozen tokenizer.

Per example: r ~ U(0, 1), ceil(gamma(r) * N) image tokens masked uniformly, class token never
masked, cross-entropy with label smoothing on the masked positions only, AdamW with warm-up.
Tokens come from the frozen tokenizer inside the jitted step, or from a pre-tokenized copy.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from maskgit_jax import config_lib, multihost, paths
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.data import images_io, input_pipeline, pretokenized
from maskgit_jax.evaluation import in_training
from maskgit_jax.models import build_tokenizer, build_transformer
from maskgit_jax.sampling.pipeline import MaskGITPipeline
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import masking, optimizers


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, AdamW state and (optionally) the parameter EMA."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def _compute_dtype(training: ml_collections.ConfigDict):
    if training.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"training.compute_dtype={training.compute_dtype!r}; use 'float32' or 'bfloat16'."
        )
    return jnp.dtype(training.compute_dtype)


def masked_token_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, label_smoothing: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed smoothed cross-entropy and correct predictions over masked positions, and count.

    `logits` [B, N, K] over the codebook, `targets` [B, N] ids, `mask` [B, N] bool.
    """
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, labels)
    weights = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


class TransformerTrainer:
    """Builds the transformer stage's state, step and periodic actions from a config."""

    def __init__(self, config: ml_collections.ConfigDict, backend: str | None = None):
        self.config = config
        self.training = config.training
        # The attention runs as is fastest on `backend` (default: JAX's), where the step runs.
        self.model = build_transformer(
            config, dtype=_compute_dtype(self.training), remat=self.training.remat, backend=backend
        )
        self.tokenizer = build_tokenizer(config)
        self.tx = optimizers.adamw_optimizer(self.training)
        self.codebook_size = config.tokenizer.codebook_size
        self.mask_token_id = config_lib.mask_token_id(config)
        self.num_tokens = config_lib.sequence_length(config) - 1
        if self.training.batch_size % self.training.grad_accum_steps:
            raise ValueError(
                f"training.batch_size={self.training.batch_size} is not divisible by "
                f"training.grad_accum_steps={self.training.grad_accum_steps}."
            )

    def init_state(self, rng: jax.Array) -> TrainState:
        """Fresh parameters (logically boxed), AdamW state and EMA copy."""
        ids = jnp.zeros((1, self.num_tokens + 1), jnp.int32)
        params = self.model.init(rng, ids)["params"]
        ema = params if self.training.ema_decay else None
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), ema)

    def _image_tokens(self, batch: dict[str, jax.Array], tokenizer_variables: Any) -> jax.Array:
        if "tokens" in batch:
            return batch["tokens"].reshape(batch["tokens"].shape[0], -1)
        ids = self.tokenizer.apply(tokenizer_variables, batch["image"], method="encode")
        return jax.lax.stop_gradient(ids.reshape(ids.shape[0], -1))

    def _inputs(self, rng, tokens, labels):
        mask_rng, label_rng = jax.random.split(rng)
        mask = masking.random_token_mask(mask_rng, tokens.shape, self.training.mask_schedule)
        drop = None
        if self.training.label_dropout:
            drop = jax.random.bernoulli(label_rng, self.training.label_dropout, labels.shape)
        ids = masking.transformer_inputs(
            tokens,
            labels,
            mask,
            codebook_size=self.codebook_size,
            mask_token_id=self.mask_token_id,
            drop_label=drop,
        )
        return ids, mask

    def train_step(self, state: TrainState, batch: dict[str, jax.Array], tokenizer_variables):
        """One AdamW update on the global batch (micro-batched when grad_accum_steps > 1).

        The loss is the mean over all masked tokens of the global batch: each micro-batch's
        summed loss is divided by the global masked count (known before the scan) and the
        gradients are summed, so k micro-batches give the update of one batch k times larger.
        """
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
        tokens = self._image_tokens(batch, tokenizer_variables)
        ids, mask = self._inputs(jax.random.fold_in(rng, 0), tokens, batch["label"])
        dropout_rng = jax.random.fold_in(rng, 1)
        accum = self.training.grad_accum_steps
        total_count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)

        def micro_loss(params, micro):
            micro_ids, micro_tokens, micro_mask, micro_rng = micro
            logits = self.model.apply(
                {"params": params},
                micro_ids,
                deterministic=False,
                num_logits=self.codebook_size,
                rngs={"dropout": micro_rng},
            )[:, 1:]
            loss_sum, correct, count = masked_token_loss(
                logits, micro_tokens, micro_mask, self.training.label_smoothing
            )
            return loss_sum / total_count, (loss_sum, correct, count)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])  # noqa: E731
        micro_batches = (
            split(ids),
            split(tokens),
            split(mask),
            jax.random.split(dropout_rng, accum),
        )

        def accumulate(carry, micro):
            grads_sum, stats_sum = carry
            (_, stats), grads = grad_fn(state.params, micro)
            return (
                jax.tree.map(jnp.add, grads_sum, grads),
                jax.tree.map(jnp.add, stats_sum, stats),
            ), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        stats0 = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
        (grads, (loss_sum, correct, count)), _ = jax.lax.scan(
            accumulate, (zeros, stats0), micro_batches
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optimizers.update_ema(ema, params, self.training.ema_decay)
        metrics = {
            "loss": loss_sum / total_count,
            "masked_accuracy": correct / total_count,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": optimizers.learning_rate_schedule(self.training)(state.step),
            "masked_fraction": count / mask.size,
        }
        new_state = TrainState(state.step + 1, params, opt_state, ema)
        return new_state, metrics

    @functools.partial(jax.jit, static_argnums=(0,))
    def eval_step(self, params, tokenizer_variables, batch, rng):
        """Masked-token loss sums at a fixed mask ratio (padding rows excluded)."""
        tokens = self._image_tokens(batch, tokenizer_variables)
        mask = masking.fixed_ratio_token_mask(rng, tokens.shape, self.training.eval_mask_ratio)
        mask = mask & batch["mask"][:, None]
        ids = masking.transformer_inputs(
            tokens,
            batch["label"],
            mask,
            codebook_size=self.codebook_size,
            mask_token_id=self.mask_token_id,
        )
        logits = self.model.apply({"params": params}, ids, num_logits=self.codebook_size)
        return masked_token_loss(logits[:, 1:], tokens, mask, 0.0)

    def sample_params(self, state: TrainState) -> Any:
        """The parameters used for samples and export: the EMA where enabled."""
        return state.ema_params if state.ema_params is not None else state.params


def _load_tokenizer(config: ml_collections.ConfigDict) -> Any:
    """The frozen tokenizer's variables on the host, from `_tokenizer_source(config)`."""
    path = _tokenizer_source(config)
    loaded = pretrained.load_pretrained(path, config, parts=("tokenizer",))
    return jax.device_get(loaded.tokenizer_variables)


def _tokenizer_source(config: ml_collections.ConfigDict) -> epath.Path:
    """The tokenizer's pretrained directory: training.tokenizer_checkpoint, else pretokenized's.

    With only training.pretokenized_dir, it is the tokenizer the tokens were made with, which
    sample grids and the exported pretrained directory need.
    """
    given = config.training.tokenizer_checkpoint
    if given:
        return pretrained.find_pretrained(given, "tokenizer", "training.tokenizer_checkpoint")
    if config.training.pretokenized_dir:
        return pretokenized.tokenizer_dir(config.training.pretokenized_dir)
    raise ValueError(
        "training.tokenizer_checkpoint is empty: the transformer stage needs a trained "
        "tokenizer (a pretrained directory, or the workdir of a tokenizer-stage run), or "
        "training.pretokenized_dir written by maskgit_jax.pretokenize (which holds one)."
    )


def build_stage(
    config: ml_collections.ConfigDict,
    tokenizer_variables: Any | None = None,
    backend: str | None = None,
) -> train_loop.BuiltStage[TransformerTrainer]:
    """The transformer stage as the loop trains it (hooks aside), and its trainer.

    With `tokenizer_variables` (host arrays, or ShapeDtypeStructs to compile from shapes) the
    batches are images, tokenized inside the step by that frozen tokenizer, a constant input.
    Without, the batches are tokens: training.pretokenized_dir's (which then feeds the loop),
    or the caller's own. `backend` is the platform the step will run on (default: JAX's);
    `aot_compile` names the TPU or GPU it compiles for from a CPU machine.
    """
    pretokenized_dir = config.training.pretokenized_dir
    if pretokenized_dir and tokenizer_variables is not None:
        raise ValueError(
            f"training.pretokenized_dir={pretokenized_dir!r}: the step takes its tokens, so "
            "build_stage takes no tokenizer_variables."
        )
    batches = None
    if pretokenized_dir:
        batches = functools.partial(
            pretokenized.train_batches,
            pretokenized_dir,
            global_batch_size=config.training.batch_size,
            seed=config.seed,
        )
    trainer = TransformerTrainer(config, backend)
    stage = train_loop.Stage(
        name="transformer",
        training=config.training,
        init_state=trainer.init_state,
        train_step=trainer.train_step,
        constants=tokenizer_variables,
        batches=batches,
    )
    return train_loop.BuiltStage(stage, trainer)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, validated: bool = False
) -> TrainState:
    """Trains the transformer stage in `workdir` (resuming), with eval, samples and export.

    `validated`: the caller has run `config_lib.validate` for its whole run (`main` does, once
    for every stage); otherwise the config is validated here, for this stage.
    """
    if not validated:
        config_lib.validate(config, stages=("transformer",))
    workdir = paths.absolute(workdir)
    sample_quality = None
    if in_training.enabled(config):
        # Read once, before anything is trained: a missing file stops the run here.
        sample_quality = in_training.SampleQuality(
            config,
            workdir,
            in_training.load_inception(config),
            dtype=_compute_dtype(config.training),
        )
    # The frozen tokenizer: samples and export need it even when the step takes tokens.
    tokenizer_variables = _load_tokenizer(config)
    pretokenized_run = bool(config.training.pretokenized_dir)
    built = build_stage(config, None if pretokenized_run else tokenizer_variables)
    trainer = built.trainer
    # The grids' sampler: this process's devices, weights replaced at each grid.
    grid_sampler = MaskGITPipeline(config, tokenizer_variables, None, keep_cast_weights=False)
    _, eval_ds, _ = input_pipeline.create_datasets(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.training.batch_size,
        seed=config.seed,
    )
    if (
        sample_quality is not None
        and eval_ds is None
        and not sample_quality.settings.reference_statistics
    ):
        raise ValueError(
            "evaluation.inception_path is set but the dataset has no eval split to compute the "
            "FID reference from: set dataset.eval_split or evaluation.reference_statistics."
        )
    mesh_holder = {}

    def on_eval(state, step, writer):
        if eval_ds is not None:
            held_out_loss(state, step, writer)
        if sample_quality is not None and in_training.due(config, step):
            writer.write_scalars(
                step, sample_quality(tokenizer_variables, trainer.sample_params(state))
            )

    def held_out_loss(state, step, writer):
        totals = np.zeros(3)
        for index, batch in enumerate(eval_ds):
            if config.logging.eval_batches and index >= config.logging.eval_batches:
                break
            batch = input_pipeline.make_global_batch(batch, mesh_holder["mesh"])
            sums = trainer.eval_step(
                state.params, mesh_holder["tokenizer"], batch, jax.random.PRNGKey(index)
            )
            totals += np.asarray(jax.device_get(sums))
        loss, correct, count = totals
        writer.write_scalars(
            step, {"eval_loss": loss / count, "eval_masked_accuracy": correct / count}
        )

    def on_sample(state, step, writer):
        # Every process samples the same small grid on its own devices from a host copy of
        # the parameters (gathered where they span processes); process 0 writes it.
        params = multihost.host_copy(trainer.sample_params(state))
        with multihost.local_context():
            grid_sampler.set_variables(transformer_variables={"params": params})
            grid = sample_grid(grid_sampler, step)
        if jax.process_index() == 0:
            images_io.write_png(grid, workdir / "samples" / f"step_{step:08d}.png")
        writer.write_images(step, {"samples": grid[None]})

    def export(state):
        pretrained.save_pretrained(
            workdir / "pretrained",
            config,
            tokenizer_variables,
            {"params": trainer.sample_params(state)},
            overwrite=True,
        )

    stage = dataclasses.replace(built.stage, on_eval=on_eval, on_sample=on_sample, export=export)
    setup = train_loop.create_sharded_setup(config, stage)
    mesh_holder["mesh"] = setup.mesh
    mesh_holder["tokenizer"] = tokenizer_variables
    logging.info("transformer: mesh %s", dict(setup.mesh.shape))
    return train_loop.run(config, str(workdir), stage, setup=setup)


def sample_grid(pipe: MaskGITPipeline, step: int) -> np.ndarray:
    """A [rows * H, cols * W, 3] grid: one row per class (up to 10), samples_per_class columns.

    Drawn with the config's sampling options and the training compute dtype, from the key
    `fold_in(PRNGKey(seed), step)`: a loaded export redraws the same grid.
    """
    config = pipe.config
    classes = min(config.num_classes, 10)
    labels = np.repeat(np.arange(classes), config.logging.samples_per_class)
    options = pipe.options(dtype=jnp.dtype(_compute_dtype(config.training)).name)
    images = pipe.generate(
        labels, jax.random.fold_in(jax.random.PRNGKey(config.seed), step), options
    )
    return images_io.make_grid(
        images, rows=classes, row_labels=[f"class {label}" for label in range(classes)]
    )
