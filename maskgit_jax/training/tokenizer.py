"""VQGAN tokenizer training as the authors configured it (they released no training code).

Generator (encoder, quantizer, decoder) loss: L2 (or L1) reconstruction + quantizer losses
(commitment, codebook, entropy) + perceptual loss (weight 0.1) + non-saturating GAN loss
(weight 0.1, after a delayed start). A StyleGAN discriminator with blur-pool resampling is
trained with its own Adam, an R1 penalty (cost 10) and optional LeCam regularisation. The
generator's parameter EMA (0.999) is used for evaluation and export. Every term can be
switched off by a zero weight; optional dead-code restarts re-seed unused codes.
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

from maskgit_jax import config_lib, convert_perceptual, multihost, paths
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.data import images_io, input_pipeline
from maskgit_jax.evaluation import in_training, reconstruction_metrics
from maskgit_jax.models import build_tokenizer
from maskgit_jax.models.discriminator import StyleGANDiscriminator
from maskgit_jax.models.perceptual import perceptual_loss, vgg16_features_fn
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import losses, optimizers


@flax.struct.dataclass
class TokenizerState:
    """Generator and discriminator parameters with their optimizer states and statistics.

    `disc_params`/`disc_opt_state` are empty dicts when the GAN loss is off; `lecam_ema`
    holds the running means of real and fake logits; `code_usage` the running fraction of
    assignments per code (for dead-code restarts and the usage metric).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    disc_params: Any
    disc_opt_state: Any
    lecam_ema: jax.Array
    code_usage: jax.Array


def reconstruction_loss(recon: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """Mean L2 (squared error, the authors' choice) or L1 distance to the inputs."""
    if kind == "l2":
        return losses.l2_loss(recon, images)
    if kind == "l1":
        return losses.l1_loss(recon, images)
    raise ValueError(f"tokenizer_training.reconstruction_loss={kind!r}; use 'l2' or 'l1'.")


def restart_dead_codes(
    codebook: jax.Array, usage: jax.Array, latents: jax.Array, rng: jax.Array, threshold: float
) -> tuple[jax.Array, jax.Array]:
    """Re-seeds codes whose running usage is below `threshold` from random encoder outputs.

    `latents` [N, D] are this batch's encoder outputs; restarted codes get the uniform usage
    1/K so they are not restarted again at once.
    """
    dead = usage < threshold
    picks = jax.random.randint(rng, (codebook.shape[0],), 0, latents.shape[0])
    codebook = jnp.where(dead[:, None], latents[picks].astype(codebook.dtype), codebook)
    usage = jnp.where(dead, 1.0 / codebook.shape[0], usage)
    return codebook, usage


class TokenizerTrainer:
    """Builds the tokenizer stage's state, step and evaluation from a config."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.training = config.tokenizer_training
        self.model = build_tokenizer(config, dtype=jnp.dtype(self.training.compute_dtype))
        self.tx = optimizers.adamw_optimizer(self.training)
        self.use_gan = self.training.gan_weight > 0
        self.use_perceptual = self.training.perceptual_weight > 0
        self.discriminator = StyleGANDiscriminator(
            image_size=config.image_size,
            **config.discriminator,
            dtype=jnp.dtype(self.training.compute_dtype),
        )
        disc_training = self.training.copy_and_resolve_references()
        disc_training.learning_rate = self.training.disc_learning_rate
        disc_training.weight_decay = 0.0
        self.disc_tx = optimizers.adamw_optimizer(disc_training)
        self.perceptual_features = vgg16_features_fn()

    def init_state(self, rng: jax.Array) -> TokenizerState:
        """Fresh generator (and discriminator) parameters and optimizer states."""
        gen_rng, disc_rng = jax.random.split(rng)
        images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3))
        params = self.model.init(gen_rng, images, train=False)["params"]
        disc_params, disc_opt_state = {}, {}
        if self.use_gan:
            disc_params = self.discriminator.init(disc_rng, images)["params"]
            disc_opt_state = self.disc_tx.init(disc_params)
        codebook_size = self.config.tokenizer.codebook_size
        return TokenizerState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            ema_params=params if self.training.ema_decay else None,
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
            lecam_ema=jnp.zeros((2,), jnp.float32),
            code_usage=jnp.full((codebook_size,), 1.0 / codebook_size, jnp.float32),
        )

    def _discriminate(self, disc_params, images):
        return self.discriminator.apply({"params": disc_params}, images)

    def _generator_loss(self, params, state, images, perceptual_params, gan_active):
        recon, result = self.model.apply({"params": params}, images, train=True)
        recon = recon.astype(jnp.float32)
        rec = reconstruction_loss(recon, images, self.training.reconstruction_loss)
        loss = self.training.reconstruction_weight * rec + result["quantizer_loss"]
        terms = {"reconstruction_loss": rec}
        if self.use_perceptual:
            perceptual = perceptual_loss(
                self.perceptual_features, perceptual_params, jnp.clip(recon, 0.0, 1.0), images
            )
            loss += self.training.perceptual_weight * perceptual
            terms["perceptual_loss"] = perceptual
        if self.use_gan:

            def adversarial_loss(recon):
                fake_logits = self._discriminate(state.disc_params, recon)
                return losses.generator_loss(fake_logits, self.training.gan_loss)

            # lax.cond: before the delayed start the discriminator is not run at all.
            adversarial = jax.lax.cond(
                gan_active, adversarial_loss, lambda _: jnp.zeros((), jnp.float32), recon
            )
            loss += self.training.gan_weight * adversarial
            terms["generator_adversarial_loss"] = adversarial
        return loss, (recon, result, terms)

    def _discriminator_update(self, state, images, fake):
        def disc_loss(disc_params):
            real_logits = self._discriminate(disc_params, images)
            fake_logits = self._discriminate(disc_params, fake)
            loss = losses.discriminator_loss(real_logits, fake_logits, self.training.gan_loss)
            r1 = jnp.zeros(())
            if self.training.r1_cost:
                r1 = losses.r1_penalty(lambda x: self._discriminate(disc_params, x), images)
                loss += self.training.r1_cost * r1
            if self.training.lecam_weight:
                loss += self.training.lecam_weight * losses.lecam_regularization(
                    real_logits, fake_logits, state.lecam_ema[0], state.lecam_ema[1]
                )
            return loss, (real_logits, fake_logits, r1)

        (loss, (real_logits, fake_logits, r1)), grads = jax.value_and_grad(disc_loss, has_aux=True)(
            state.disc_params
        )
        updates, disc_opt_state = self.disc_tx.update(
            grads, state.disc_opt_state, state.disc_params
        )
        disc_params = optax.apply_updates(state.disc_params, updates)
        lecam_ema = jnp.stack(
            losses.update_lecam_ema(
                state.lecam_ema[0], state.lecam_ema[1], real_logits, fake_logits
            )
        )
        metrics = {
            "discriminator_loss": loss,
            "r1_penalty": r1,
            "real_logits": jnp.mean(real_logits),
            "fake_logits": jnp.mean(fake_logits),
        }
        return disc_params, disc_opt_state, lecam_ema, metrics

    def train_step(self, state: TokenizerState, batch: dict[str, jax.Array], perceptual_params):
        """One generator update, then `disc_steps` discriminator updates once the GAN starts."""
        images = batch["image"]
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), state.step)
        gan_active = state.step >= self.training.gan_start_step
        grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
        (loss, (recon, result, terms)), grads = grad_fn(
            state.params, state, images, perceptual_params, gan_active
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        counts = result["code_counts"]
        decay = self.training.code_usage_decay
        usage = decay * state.code_usage + (1 - decay) * counts / jnp.sum(counts)
        if self.training.dead_code_restart:
            latents = result["latents"].reshape(-1, result["latents"].shape[-1])
            codebook, usage = restart_dead_codes(
                params["quantizer"]["codebook"],
                usage,
                latents,
                jax.random.fold_in(rng, 1),
                self.training.dead_code_threshold / counts.shape[0],
            )
            params = {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
        ema = state.ema_params
        if ema is not None:
            ema = optimizers.update_ema(ema, params, self.training.ema_decay)
        metrics = {
            "loss": loss,
            **terms,
            "commitment_loss": result["commitment_loss"],
            "codebook_loss": result["codebook_loss"],
            "entropy_loss": result["entropy_loss"],
            "batch_codebook_usage": result["codebook_usage"],
            "perplexity": result["perplexity"],
            "codebook_usage": jnp.mean(usage > 0.01 / counts.shape[0]),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": optimizers.learning_rate_schedule(self.training)(state.step),
        }
        state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            code_usage=usage,
        )
        if self.use_gan:
            fake = jax.lax.stop_gradient(recon)

            def update(state):
                return self._discriminator_update(state, images, fake)

            def keep(state):
                # Before the delayed start the discriminator keeps its initial state, and its
                # update (forward, backward, R1) is skipped rather than computed and dropped.
                shapes = jax.eval_shape(update, state)[3]
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                return state.disc_params, state.disc_opt_state, state.lecam_ema, zeros

            for _ in range(self.training.disc_steps):
                disc_params, disc_opt_state, lecam_ema, disc_metrics = jax.lax.cond(
                    gan_active, update, keep, state
                )
                state = state.replace(
                    disc_params=disc_params, disc_opt_state=disc_opt_state, lecam_ema=lecam_ema
                )
            metrics.update(disc_metrics)
        return state, metrics

    def eval_params(self, state: TokenizerState) -> Any:
        """The generator parameters for evaluation and export: the EMA where enabled."""
        return state.ema_params if state.ema_params is not None else state.params

    @functools.partial(jax.jit, static_argnums=(0,))
    def reconstruct(self, params, images):
        """Encode-quantize-decode with `params`: images clipped to [0, 1] and token ids."""
        recon, result = self.model.apply({"params": params}, images, train=False)
        return jnp.clip(recon, 0.0, 1.0), result["encoding_indices"]


def evaluate_reconstruction(
    trainer: TokenizerTrainer,
    params: Any,
    eval_batches,
    max_batches: int,
    inception_fn: Any | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """PSNR, SSIM (images of 11x11 or more) and code usage on held-out batches; the first pair.

    With `inception_fn` (images -> {"pool_3", ...}, e.g. `in_training.load_inception`), also
    "eval_rfid": the FID between the inputs' and the reconstructions' Inception features over
    the same batches, gathered from every process (then every process must call this).
    Whole batches are reconstructed (one compiled shape) and padding rows dropped after.
    """
    psnrs, ssims, ids, first = [], [], [], None
    rfid = in_training.ReconstructionFID(inception_fn) if inception_fn is not None else None
    for index, batch in enumerate(eval_batches):
        if max_batches and index >= max_batches:
            break
        batch_images = np.asarray(batch["image"])
        keep = np.ones(len(batch_images), bool)
        if "mask" in batch:
            keep = np.asarray(batch["mask"], bool)
        if not keep.any():
            continue
        batch_recon, codes = jax.device_get(trainer.reconstruct(params, batch_images))
        images, recon = batch_images[keep], np.asarray(batch_recon)[keep]
        psnrs.append(reconstruction_metrics.psnr(recon, images, reduce=False))
        if min(images.shape[1:3]) >= reconstruction_metrics.SSIM_WINDOW:
            ssims.append(reconstruction_metrics.ssim(recon, images, reduce=False))
        ids.append(np.asarray(codes)[keep].reshape(-1))
        if rfid is not None:
            rfid.add(batch_images, batch_recon, keep)
        first = first if first is not None else (images, recon)
    # Every process's held-out examples count (each process read its own share).
    psnrs, ssims, ids = (
        multihost.gather_rows(np.concatenate(parts) if parts else np.zeros((0,), dtype))
        for parts, dtype in ((psnrs, np.float64), (ssims, np.float64), (ids, np.int64))
    )
    usage, perplexity = reconstruction_metrics.codebook_usage(
        ids, trainer.config.tokenizer.codebook_size
    )
    metrics = {
        "eval_psnr": float(np.mean(np.minimum(psnrs, 100.0))),
        "eval_codebook_usage": usage,
        "eval_perplexity": perplexity,
    }
    if len(ssims):  # Images smaller than SSIM's window (8x8 digits) have no SSIM.
        metrics["eval_ssim"] = float(np.mean(ssims))
    if rfid is not None:
        metrics["eval_rfid"] = rfid.compute()
    if first is None:  # This process held only padding rows.
        size = trainer.config.image_size
        first = (np.zeros((0, size, size, 3), np.float32),) * 2
    return metrics, first[0], first[1]


def _load_perceptual(config: ml_collections.ConfigDict) -> Any:
    """The perceptual loss's VGG16 on the host, from its converted checkpoint (None if off)."""
    training = config.tokenizer_training
    if training.perceptual_weight <= 0:
        return None
    if not training.perceptual_checkpoint:
        raise ValueError(
            "tokenizer_training.perceptual_weight > 0 needs tokenizer_training."
            "perceptual_checkpoint (a VGG16 converted by `python -m maskgit_jax."
            "convert_perceptual`), or set tokenizer_training.perceptual_weight=0."
        )
    return jax.device_get(convert_perceptual.load_perceptual_params(training.perceptual_checkpoint))


def build_stage(
    config: ml_collections.ConfigDict, perceptual_params: Any | None = None
) -> train_loop.BuiltStage[TokenizerTrainer]:
    """The tokenizer stage as the loop trains it (hooks aside), and its trainer.

    `perceptual_params`, the frozen VGG16 of the perceptual loss, is the step's constant
    input: host arrays, or ShapeDtypeStructs to compile from shapes. It is required while
    tokenizer_training.perceptual_weight > 0 and must be None when it is off.
    """
    trainer = TokenizerTrainer(config)
    if trainer.use_perceptual and perceptual_params is None:
        raise ValueError(
            "tokenizer_training.perceptual_weight > 0: build_stage needs the VGG16 "
            "perceptual_params (train_and_evaluate reads them from perceptual_checkpoint)."
        )
    if not trainer.use_perceptual and perceptual_params is not None:
        raise ValueError(
            "perceptual_params were given but tokenizer_training.perceptual_weight <= 0: the "
            "step would never use them."
        )
    stage = train_loop.Stage(
        name="tokenizer",
        training=config.tokenizer_training,
        init_state=trainer.init_state,
        train_step=trainer.train_step,
        constants=perceptual_params,
    )
    return train_loop.BuiltStage(stage, trainer)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, validated: bool = False
) -> TokenizerState:
    """Trains the tokenizer in `workdir` (resuming) and exports it to workdir/pretrained.

    `validated`: the caller has run `config_lib.validate` for its whole run (`main` does, once
    for every stage); otherwise the config is validated here, for this stage.
    """
    if not validated:
        config_lib.validate(config, stages=("tokenizer",))
    # rFID's Inception network is read once, before anything is trained.
    inception_fn = in_training.load_inception(config) if in_training.enabled(config) else None
    built = build_stage(config, _load_perceptual(config))
    trainer = built.trainer
    workdir = paths.absolute(workdir)
    _, eval_ds, _ = input_pipeline.create_datasets(
        config.dataset,
        image_size=config.image_size,
        global_batch_size=config.tokenizer_training.batch_size,
        seed=config.seed,
    )
    if inception_fn is not None and eval_ds is None:
        logging.warning("evaluation.inception_path is set, but without an eval split no rFID.")

    def on_eval(state, step, writer):
        if eval_ds is None:
            return
        # A host copy (gathered where the parameters span processes), evaluated on this
        # process's own devices, outside the training mesh.
        params = multihost.host_copy(trainer.eval_params(state))
        with multihost.local_context():
            metrics, images, recon = evaluate_reconstruction(
                trainer,
                params,
                eval_ds,
                config.logging.eval_batches,
                inception_fn=inception_fn if in_training.due(config, step) else None,
            )
        writer.write_scalars(step, metrics)
        count = min(len(images), 8)
        if not count:
            return
        grid = images_io.make_grid(
            np.concatenate([images[:count], recon[:count]]),
            rows=2,
            row_labels=["input", "recon"],
        )
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

    stage = dataclasses.replace(built.stage, on_eval=on_eval, export=export)
    return train_loop.run(config, str(workdir), stage)
