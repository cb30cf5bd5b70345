"""VQGAN tokenizer training: reconstruction plus the quantizer's losses.

The adversarial and perceptual terms of the authors' configuration are added by the
tokenizer-stage losses; this stage already trains a usable tokenizer on small data.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from maskgit_jax import config_lib, images_io, input_pipeline, optimizers, pretrained, train_loop
from maskgit_jax.models import build_tokenizer


@flax.struct.dataclass
class TokenizerState:
    """Step counter, generator parameters, optimizer state and the parameter EMA."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


def reconstruction_loss(recon: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """Mean L2 (squared error) or L1 distance between reconstructions and inputs."""
    if kind == "l2":
        return jnp.mean((recon - images) ** 2)
    if kind == "l1":
        return jnp.mean(jnp.abs(recon - images))
    raise ValueError(f"reconstruction_loss={kind!r}; use 'l2' or 'l1'.")


class TokenizerTrainer:
    """Builds the tokenizer stage's state, step and periodic actions from a config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.training = config.tokenizer_training
        self.model = build_tokenizer(config, dtype=jnp.dtype(self.training.compute_dtype))
        self.tx = optimizers.adamw_optimizer(self.training)

    def init_state(self, rng: jax.Array) -> TokenizerState:
        """Fresh generator parameters, optimizer state and EMA copy."""
        images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3))
        params = self.model.init(rng, images, train=False)["params"]
        ema = params if self.training.ema_decay else None
        return TokenizerState(jnp.zeros((), jnp.int32), params, self.tx.init(params), ema)

    def train_step(self, state: TokenizerState, batch: dict[str, jax.Array], constants=None):
        """One update of encoder, quantizer and decoder on the global batch."""
        del constants
        images = batch["image"]

        def loss_fn(params):
            recon, result = self.model.apply({"params": params}, images, train=True)
            recon = recon.astype(jnp.float32)
            rec = reconstruction_loss(recon, images, self.training.reconstruction_loss)
            loss = self.training.reconstruction_weight * rec + result["quantizer_loss"]
            return loss, (rec, result)

        (loss, (rec, result)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optimizers.update_ema(ema, params, self.training.ema_decay)
        metrics = {
            "loss": loss,
            "reconstruction_loss": rec,
            "commitment_loss": result["commitment_loss"],
            "codebook_loss": result["codebook_loss"],
            "entropy_loss": result["entropy_loss"],
            "codebook_usage": result["codebook_usage"],
            "perplexity": result["perplexity"],
            "grad_norm": optax.global_norm(grads),
            "learning_rate": optimizers.learning_rate_schedule(self.training)(state.step),
        }
        return TokenizerState(state.step + 1, params, opt_state, ema), metrics

    def eval_params(self, state: TokenizerState) -> Any:
        """The parameters used for evaluation and export: the EMA where enabled."""
        return state.ema_params if state.ema_params is not None else state.params

    @functools.partial(jax.jit, static_argnums=(0,))
    def reconstruct(self, params, images):
        """Encode-quantize-decode with the given parameters, clipped to [0, 1]."""
        recon, _ = self.model.apply({"params": params}, images, train=False)
        return jnp.clip(recon, 0.0, 1.0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TokenizerState:
    """Trains the tokenizer in `workdir` (resuming) and exports it to workdir/pretrained."""
    config_lib.validate(config)
    trainer = TokenizerTrainer(config)
    workdir = epath.Path(workdir)
    _, eval_ds, _ = input_pipeline.create_datasets(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.tokenizer_training.batch_size,
        seed=config.seed,
    )

    def on_eval(state, step, writer):
        if eval_ds is None:
            return
        batch = next(iter(eval_ds))
        images = batch["image"][: config.logging.samples_per_class * 4]
        recon = np.asarray(trainer.reconstruct(jax.device_get(trainer.eval_params(state)), images))
        mse = float(np.mean((recon - images) ** 2))
        psnr = float(10 * np.log10(1.0 / max(mse, 1e-10)))
        writer.write_scalars(step, {"eval_psnr": psnr, "eval_mse": mse})
        grid = images_io.make_grid(np.concatenate([images, recon]), rows=2)
        writer.write_images(step, {"reconstructions": grid[None]})
        if jax.process_index() == 0:
            images_io.write_png(grid, workdir / "samples" / f"reconstructions_{step:08d}.png")

    def export(state):
        pretrained.save_pretrained(
            workdir / "pretrained",
            config,
            tokenizer_variables={"params": trainer.eval_params(state)},
            overwrite=True,
        )

    stage = train_loop.Stage(
        name="tokenizer",
        training=config.tokenizer_training,
        init_state=trainer.init_state,
        train_step=trainer.train_step,
        on_eval=on_eval,
        export=export,
    )
    return train_loop.run(config, str(workdir), stage)
