"""A small tokenizer on real photographs: bundled `photos` crops, evaluated on unseen photos.

Trains only the tokenizer stage on 32x32 random crops of scikit-image's and scikit-learn's
bundled photographs (maskgit_jax.data.datasets.photos, config `32px`) and evaluates its
reconstructions on crops of other photographs (the test split), which training never sees.

Sized for a 2-core CPU: 1600 reconstruction-only steps at about 1.9 steps/s (15 minutes),
then 400 steps with the adversarial term (generator and discriminator with R1). Short probes of
that phase ran at 0.4-0.5 steps/s, but in a full run it slowed to 0.12 steps/s (cause not found),
so budget up to an hour. Held-out PSNR at step 1500 measured 20.9 dB with all 256 codes in use.
64x64 crops (`photos/64px`, 16x16 tokens) measured about
2.3x (filters 16) to 8x (filters 32) slower per step, too slow for that budget; 32x32 with the
same 4x downsampling gives 8x8 tokens and the same bits-per-pixel compression.
"""

from maskgit_jax import config_lib


def get_config():
    """Tokenizer stage on 32x32 photo crops, sized for a laptop CPU."""
    c = config_lib.base_config()
    # Train the tokenizer only: the point is reconstruction of real images.
    c.stage = "tokenizer"
    # 32x32 crops -> 8x8 = 64 image tokens (two average pools).
    c.image_size = 32
    # Labels are source-photo indices (ten train photos); the tokenizer ignores them.
    c.num_classes = 10
    # The bundled 32x32 photo crops, prepared offline on first use.
    c.dataset.name = "photos/32px"
    # Evaluate on crops of photographs the train split never contains.
    c.dataset.eval_split = "test"
    # Read the whole (small) dataset in every process: global batches then do not depend on
    # the process count.
    c.dataset.global_order = True
    # Crops are square, so the random square crop is the whole crop (positions are random).
    c.dataset.random_crop = True
    # Natural images are mirror-symmetric in distribution.
    c.dataset.random_flip = True
    # Larger than the train split (3200 crops): a full shuffle every epoch.
    c.dataset.shuffle_buffer = 4000

    # A small tokenizer: 32 -> 8x8 latents, 256 codes of dimension 32.
    c.tokenizer.filters = 32
    c.tokenizer.channel_multipliers = (1, 2, 2)
    c.tokenizer.num_res_blocks = 1
    c.tokenizer.embedding_dim = 32
    c.tokenizer.codebook_size = 256
    c.tokenizer.norm_groups = 8
    # Batch of 32 crops per step.
    c.tokenizer_training.batch_size = 32
    # 2000 steps: 20 epochs of the train split.
    c.tokenizer_training.num_train_steps = 2000
    # Peak learning rate, warmed up linearly, then cosine-decayed to 0.
    c.tokenizer_training.learning_rate = 1e-3
    c.tokenizer_training.warmup_steps = 100
    c.tokenizer_training.lr_schedule = "cosine"
    # Short EMA horizon for a short run.
    c.tokenizer_training.ema_decay = 0.99
    # No VGG16 weights ship offline: train without the perceptual term (set the weight and
    # tokenizer_training.perceptual_checkpoint to use one).
    c.tokenizer_training.perceptual_weight = 0.0
    # The authors' adversarial term, started once reconstructions have converged (the
    # discriminator costs 3x the generator per step on CPU, so it runs for the last 400).
    c.tokenizer_training.gan_weight = 0.1
    c.tokenizer_training.gan_start_step = 1600
    # A small StyleGAN discriminator for 64x64 crops (4 down blocks to 4x4).
    c.discriminator.filters = 32
    c.discriminator.channel_multipliers = (1, 2, 2, 2)

    # Checkpoint every 500 steps, keeping the last two.
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 2
    # Training metrics every 100 steps.
    c.logging.log_every_steps = 100
    # Test-split reconstructions (PSNR, grid) every 500 steps.
    c.logging.eval_every_steps = 500
    # Batches per evaluation (0 = the whole test split).
    c.logging.eval_batches = 0
    # The reconstruction grid shows 4 * samples_per_class = 32 test crops.
    c.logging.samples_per_class = 8
    return c
