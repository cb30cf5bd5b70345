"""The tokenizer stage's step: GAN start, discriminator updates, dead codes, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import config_lib
from maskgit_jax.training import tokenizer as train_tokenizer
from tests.helpers import load_config_file


def _config(**training):
    config = load_config_file("configs/digits.py")
    config.image_size = 16
    config.tokenizer.update(filters=16, channel_multipliers=(1, 2), codebook_size=16)
    config.tokenizer.embedding_dim = 8
    config.discriminator.update(filters=8, channel_multipliers=(1, 2), mbstd_group_size=2)
    config.tokenizer_training.update(gan_weight=0.1, **training)
    return config


@pytest.fixture(scope="module")
def gan_run():
    trainer = train_tokenizer.TokenizerTrainer(_config(gan_start_step=2, dead_code_restart=True))
    state = jax.jit(trainer.init_state)(jax.random.PRNGKey(0))
    step = jax.jit(trainer.train_step)
    images = np.random.RandomState(0).rand(4, 16, 16, 3).astype(np.float32)
    states, metrics = [state], []
    for _ in range(4):
        state, m = step(state, {"image": images}, None)
        states.append(state)
        metrics.append(jax.device_get(m))
    return trainer, states, metrics, images


def _max_change(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_discriminator_waits_for_the_delayed_start(gan_run):
    _, states, metrics, _ = gan_run
    # Steps 0 and 1 run before gan_start_step=2: the discriminator keeps its initial state.
    assert _max_change(states[0].disc_params, states[2].disc_params) == 0.0
    # The discriminator's own warm-up starts at its first update (learning rate 0 there).
    assert _max_change(states[2].disc_params, states[4].disc_params) > 0.0
    # Warm-up gives learning rate 0 at step 0; the generator moves from step 1 on.
    assert _max_change(states[1].params, states[2].params) > 0.0
    for m in metrics:
        assert np.isfinite(m["loss"]) and np.isfinite(m["discriminator_loss"])
        assert m["r1_penalty"] >= 0.0


def test_generator_ema_moves_towards_params(gan_run):
    _, states, _, _ = gan_run
    first, last = states[0], states[-1]
    ema_distance = _max_change(last.ema_params, last.params)
    assert 0.0 < ema_distance <= _max_change(first.params, last.params) + 1e-6


def test_restart_dead_codes_reseeds_only_unused_codes():
    codebook = jnp.arange(12.0).reshape(4, 3)
    usage = jnp.array([0.5, 0.0, 0.5, 0.001])
    latents = jnp.full((5, 3), 100.0)
    new_codebook, new_usage = train_tokenizer.restart_dead_codes(
        codebook, usage, latents, jax.random.PRNGKey(0), threshold=0.01
    )
    new_codebook, codebook = np.asarray(new_codebook), np.asarray(codebook)
    np.testing.assert_array_equal(new_codebook[[0, 2]], codebook[[0, 2]])
    np.testing.assert_array_equal(new_codebook[[1, 3]], np.full((2, 3), 100.0))
    np.testing.assert_allclose(new_usage, [0.5, 0.25, 0.5, 0.25])


def test_reconstruction_evaluation_reports_psnr_ssim_and_usage(gan_run):
    trainer, states, _, images = gan_run
    params = trainer.eval_params(states[-1])
    batches = [{"image": images, "mask": np.array([True, True, True, False])}]
    metrics, inputs, recon = train_tokenizer.evaluate_reconstruction(trainer, params, batches, 0)
    assert inputs.shape == (3, 16, 16, 3) and recon.shape == (3, 16, 16, 3)
    assert 0.0 < metrics["eval_psnr"] < 100.0
    assert -1.0 <= metrics["eval_ssim"] <= 1.0
    assert 0.0 < metrics["eval_codebook_usage"] <= 1.0
    assert metrics["eval_perplexity"] >= 1.0


def test_evaluation_of_images_smaller_than_the_ssim_window_omits_ssim():
    config = load_config_file("configs/digits.py")
    config.image_size = 8
    config.tokenizer.update(filters=8, channel_multipliers=(1,), codebook_size=16)
    config.tokenizer.embedding_dim = 8
    trainer = train_tokenizer.TokenizerTrainer(config)
    params = trainer.eval_params(jax.jit(trainer.init_state)(jax.random.PRNGKey(0)))
    images = np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)
    metrics, _, recon = train_tokenizer.evaluate_reconstruction(
        trainer, params, [{"image": images}], 0
    )
    assert recon.shape == (2, 8, 8, 3)
    assert "eval_ssim" not in metrics and 0.0 < metrics["eval_psnr"] < 100.0


def test_perceptual_loss_without_weights_is_a_config_error(tmp_path):
    config = _config()
    config.tokenizer_training.perceptual_weight = 0.1
    with pytest.raises(ValueError, match="perceptual_checkpoint"):
        train_tokenizer.train_and_evaluate(config, str(tmp_path))
    config.tokenizer_training.perceptual_checkpoint = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="convert_perceptual|VGG16"):
        train_tokenizer.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_gan_loss_is_rejected():
    config = _config(gan_loss="wasserstein")
    with pytest.raises(ValueError, match="gan_loss"):
        config_lib.validate(config)
