"""The embedded default: scikit-learn's 8x8 digits (shipped in the package), at 8x8.

Trains a small tokenizer, then a small transformer on its tokens, and writes a sample grid;
under 15 minutes on 2 laptop CPU cores. The sizes come from `benchmarks/digits_quality.py`
(see the README's "Quality of the embedded default"): one token per digit pixel, because a
4x4 grid of 2x2-pixel tokens caps reconstructions at about 0.78 of the digits' diversity.
"""

from maskgit_jax import config_lib


def get_config():
    """Tokenizer then transformer on digits, sized for a laptop CPU."""
    c = config_lib.base_config()
    # Train the tokenizer, then the transformer on its tokens.
    c.stage = "both"
    # The digits' own 8x8 pixels (the stored 32x32 is a 4x pixel repetition), one token each.
    c.image_size = 8
    # The ten digits.
    c.num_classes = 10
    # Read the whole (small) dataset in every process: global batches then do not depend on
    # the process count.
    c.dataset.name = "digits"
    c.dataset.global_order = True
    # Digits are centred: no random crop, and flips would change a digit's identity.
    c.dataset.random_crop = False
    c.dataset.random_flip = False
    c.dataset.shuffle_buffer = 2000

    # A small tokenizer: one level, no downsampling: 8x8 latents, 64 codes.
    c.tokenizer.filters = 32
    c.tokenizer.channel_multipliers = (1,)
    c.tokenizer.num_res_blocks = 1
    c.tokenizer.embedding_dim = 32
    c.tokenizer.codebook_size = 64
    c.tokenizer.norm_groups = 8
    c.tokenizer_training.batch_size = 64
    # 22 steps/s at 8x8: 2000 steps take 1.5 minutes (1000 leave the held-out FD 1.35x).
    c.tokenizer_training.num_train_steps = 2000
    c.tokenizer_training.learning_rate = 1e-3
    c.tokenizer_training.warmup_steps = 100
    c.tokenizer_training.ema_decay = 0.99
    # No pretrained perceptual network ships offline, and digits need no adversarial loss.
    c.tokenizer_training.perceptual_weight = 0.0
    c.tokenizer_training.gan_weight = 0.0

    # A small transformer over 1 + 64 tokens, without dropout. Label smoothing stays at the
    # paper's 0.1: without it samples were less varied (benchmarks/digits_quality.py).
    c.transformer.hidden_size = 128
    c.transformer.num_layers = 4
    c.transformer.num_heads = 4
    c.transformer.mlp_dim = 512
    c.transformer.dropout_rate = 0.0
    c.transformer.attention_dropout_rate = 0.0
    # Batch 32 for 6000 steps rather than 64 for 3000 (the same compute, 9-10 minutes): more
    # updates fit the agreement between positions better (diversity 0.79 -> 0.83 of real,
    # benchmarks/digits_quality.py).
    c.training.batch_size = 32
    c.training.num_train_steps = 6000
    c.training.learning_rate = 1e-3
    c.training.warmup_steps = 200
    c.training.lr_schedule = "cosine"
    c.training.weight_decay = 0.01
    c.training.ema_decay = 0.99

    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 2
    c.logging.log_every_steps = 100
    c.logging.eval_every_steps = 1000
    c.logging.eval_batches = 8
    c.logging.sample_every_steps = 2000
    c.logging.samples_per_class = 8

    # 24 steps (under 3 tokens a step): closer to exact sampling, more varied digits and a
    # lower Fréchet distance than 12 or 16 steps at the same accuracy.
    c.sampling.num_steps = 24
    # A fixed Halton order samples more varied digits than the confidence order (higher
    # diversity and lower Fréchet distance at the same accuracy, benchmarks/digits_quality.py).
    c.sampling.ordering = "halton"
    return c
