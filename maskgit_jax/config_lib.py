"""Shared configuration: every field a stage reads, with the paper's values as defaults.

The files in `configs/` start from `base_config()` and override sizes and data; modules are
built from the sub-dicts (`config.tokenizer`, `config.transformer`), never from the whole
config.
"""

from collections.abc import Sequence

import ml_collections

# Spatial downsampling factor of the released tokenizer (4 average pools of stride 2).
TOKENIZER_DOWNSAMPLE = 16


def base_config() -> ml_collections.ConfigDict:
    """Returns the ImageNet 256x256 configuration of the paper and released models."""
    # Imported here, so that importing this module (config files do) loads no JAX or flax.
    from maskgit_jax import sharding

    c = ml_collections.ConfigDict()
    # Which stage `main` trains: "tokenizer" (VQGAN) or "transformer" (MaskGIT MVTM).
    c.stage = "transformer"
    # Seed of parameter init, masking, dropout and the data order.
    c.seed = 0
    # Square image side in pixels; tokens per side = image_size / 2**(levels-1).
    c.image_size = 256
    # Number of class labels; the class token of label y is codebook_size + y.
    c.num_classes = 1000

    # VQGAN tokenizer (no attention layers); field names are VQGANTokenizer's.
    c.tokenizer = ml_collections.ConfigDict()
    # Channels of the first convolution; level i has filters * channel_multipliers[i].
    c.tokenizer.filters = 128
    # Width multiplier per resolution level; an average pool follows every level but the last.
    c.tokenizer.channel_multipliers = (1, 1, 2, 2, 4)
    # Residual blocks per resolution level.
    c.tokenizer.num_res_blocks = 2
    # Dimension of the latent vectors and codebook entries.
    c.tokenizer.embedding_dim = 256
    # Number of codebook entries (image-token vocabulary).
    c.tokenizer.codebook_size = 1024
    # Groups of every GroupNorm.
    c.tokenizer.norm_groups = 32

    # Tokenizer training losses (authors' configuration values).
    c.tokenizer_loss = ml_collections.ConfigDict()
    # Weight of the commitment loss |z_e - sg(z_q)|^2.
    c.tokenizer_loss.commitment_cost = 0.25
    # Weight of the codebook entropy loss (0 disables it).
    c.tokenizer_loss.entropy_loss_ratio = 0.1
    # Softmax temperature over negative distances in the entropy loss.
    c.tokenizer_loss.entropy_temperature = 0.01

    # Bidirectional transformer; field names are MaskedTransformer's.
    c.transformer = ml_collections.ConfigDict()
    # Width of the residual stream.
    c.transformer.hidden_size = 768
    # Number of post-LayerNorm transformer layers.
    c.transformer.num_layers = 24
    # Attention heads (head dim = hidden_size / num_heads).
    c.transformer.num_heads = 16
    # Hidden width of each MLP.
    c.transformer.mlp_dim = 3072
    # Dropout on embeddings and hidden states.
    c.transformer.dropout_rate = 0.1
    # Dropout on attention probabilities.
    c.transformer.attention_dropout_rate = 0.1

    # Tokenizer (VQGAN) training; Adam with beta1 0 and beta2 0.99 as the authors configured.
    c.tokenizer_training = ml_collections.ConfigDict()
    # Global batch size of the tokenizer stage.
    c.tokenizer_training.batch_size = 256
    # Optimizer updates of the tokenizer stage.
    c.tokenizer_training.num_train_steps = 1_000_000
    # Peak learning rate of the generator (encoder, quantizer, decoder).
    c.tokenizer_training.learning_rate = 1e-4
    # Linear warm-up steps.
    c.tokenizer_training.warmup_steps = 0
    # After warm-up: "constant" or "cosine".
    c.tokenizer_training.lr_schedule = "constant"
    # Adam first-moment decay.
    c.tokenizer_training.beta1 = 0.0
    # Adam second-moment decay.
    c.tokenizer_training.beta2 = 0.99
    # Decoupled weight decay (0 = plain Adam).
    c.tokenizer_training.weight_decay = 0.0
    # Clip gradients to this global norm (0 disables clipping).
    c.tokenizer_training.grad_clip_norm = 0.0
    # Decay of the generator parameter EMA used for evaluation and export (0 disables).
    c.tokenizer_training.ema_decay = 0.999
    # Compute dtype of the tokenizer's convolutions.
    c.tokenizer_training.compute_dtype = "float32"
    # Weight of the reconstruction loss.
    c.tokenizer_training.reconstruction_weight = 1.0
    # Reconstruction loss: "l2" (authors) or "l1".
    c.tokenizer_training.reconstruction_loss = "l2"
    # Weight of the perceptual (VGG16 feature) loss; 0 trains without a perceptual network.
    c.tokenizer_training.perceptual_weight = 0.1
    # Directory of VGG16 weights converted by `python -m maskgit_jax.convert_perceptual`.
    c.tokenizer_training.perceptual_checkpoint = ""
    # Weight of the generator's adversarial loss (0 disables the discriminator).
    c.tokenizer_training.gan_weight = 0.1
    # GAN loss: "non_saturating" (authors) or "hinge".
    c.tokenizer_training.gan_loss = "non_saturating"
    # Step at which the adversarial loss and discriminator updates start.
    c.tokenizer_training.gan_start_step = 0
    # Discriminator updates per generator update.
    c.tokenizer_training.disc_steps = 1
    # Discriminator learning rate (Adam with the same betas as the generator).
    c.tokenizer_training.disc_learning_rate = 1e-4
    # Cost of the R1 gradient penalty on real images (cost * mean |grad D|^2).
    c.tokenizer_training.r1_cost = 10.0
    # Weight of LeCam regularisation of the discriminator (0 disables it).
    c.tokenizer_training.lecam_weight = 0.0
    # Decay of the running per-code usage (metrics and dead-code restarts).
    c.tokenizer_training.code_usage_decay = 0.99
    # Re-seed codes whose running usage falls below threshold/K from encoder outputs.
    c.tokenizer_training.dead_code_restart = False
    # Usage threshold of a dead code, as a fraction of uniform usage 1/K.
    c.tokenizer_training.dead_code_threshold = 0.03

    # StyleGAN discriminator; field names are StyleGANDiscriminator's.
    c.discriminator = ml_collections.ConfigDict()
    # Channels of the from-RGB layer.
    c.discriminator.filters = 64
    # Width multiplier per down block (the last repeats down to 4x4).
    c.discriminator.channel_multipliers = (1, 2, 4, 4, 4, 4)
    # Binomial blur-pool filter used when downsampling.
    c.discriminator.blur_kernel = (1, 3, 3, 1)
    # Group size of the minibatch-stddev layer (0 disables it).
    c.discriminator.mbstd_group_size = 4

    # Transformer (MVTM) training; the authors' configuration values.
    c.training = ml_collections.ConfigDict()
    # Global batch size (split over processes and the data-parallel mesh axes).
    c.training.batch_size = 256
    # Optimizer updates to run.
    c.training.num_train_steps = 2_000_000
    # Peak learning rate of AdamW.
    c.training.learning_rate = 1e-4
    # Linear warm-up steps from 0 to the peak learning rate.
    c.training.warmup_steps = 5000
    # After warm-up: "constant" (authors) or "cosine" decay to 0 at num_train_steps.
    c.training.lr_schedule = "constant"
    # AdamW first-moment decay.
    c.training.beta1 = 0.9
    # AdamW second-moment decay.
    c.training.beta2 = 0.96
    # Decoupled weight decay (applied to kernels and embeddings, not biases or norms).
    c.training.weight_decay = 0.045
    # Label smoothing of the masked-token cross-entropy.
    c.training.label_smoothing = 0.1
    # Mask schedule gamma used to draw each example's mask ratio.
    c.training.mask_schedule = "cosine"
    # Probability of replacing the class token by the mask token (classifier-free guidance).
    c.training.label_dropout = 0.0
    # Clip gradients to this global norm (0 disables clipping).
    c.training.grad_clip_norm = 0.0
    # Decay of the parameter EMA used for samples and export (0 disables EMA).
    c.training.ema_decay = 0.0
    # Compute dtype: "float32", or "bfloat16" (fp32 params, accumulation and softmax).
    c.training.compute_dtype = "float32"
    # Micro-batches per optimizer step (gradient accumulation inside one jitted step).
    c.training.grad_accum_steps = 1
    # Recompute each layer's activations in the backward pass to save memory.
    c.training.remat = False
    # Pretrained directory (or tokenizer-stage workdir) of the frozen tokenizer; may stay ""
    # with pretokenized_dir, which holds a copy of the tokenizer its tokens were made with.
    c.training.tokenizer_checkpoint = ""
    # Directory of pre-tokenized data written by maskgit_jax.pretokenize ("" = tokenize live).
    c.training.pretokenized_dir = ""
    # Fraction of tokens masked in the evaluation loss.
    c.training.eval_mask_ratio = 0.5

    # Checkpointing (Orbax).
    c.checkpoint = ml_collections.ConfigDict()
    # Save every this many steps (and on SIGTERM and at the end).
    c.checkpoint.every_steps = 5000
    # Keep this many most recent checkpoints.
    c.checkpoint.max_to_keep = 3
    # Write checkpoints in the background while training continues.
    c.checkpoint.async_save = True
    # Refuse to save (and stop) when any parameter's magnitude exceeds this: an exploded run
    # (say, a learning rate far too high) is finite but useless. 0 checks finiteness only.
    c.checkpoint.max_abs_param = 1e6

    # Metrics, evaluation and samples.
    c.logging = ml_collections.ConfigDict()
    # Write training metrics every this many steps.
    c.logging.log_every_steps = 100
    # Evaluate on the eval split every this many steps (0 disables).
    c.logging.eval_every_steps = 10_000
    # Batches of the eval split per evaluation (0 = the whole split).
    c.logging.eval_batches = 10
    # Write a class-conditional sample grid every this many steps (0 disables).
    c.logging.sample_every_steps = 10_000
    # Samples per class in the grid (classes: the first min(num_classes, 10)).
    c.logging.samples_per_class = 4

    # Input pipeline (see dataset_config for every field).
    c.dataset = dataset_config()
    # Device mesh and logical-axis rules (see sharding.default_mesh_config).
    c.mesh = sharding.default_mesh_config()

    # Parallel decoding defaults used for samples and evaluation.
    c.sampling = ml_collections.ConfigDict()
    # Decoding steps T.
    c.sampling.num_steps = 16
    # Initial Gumbel temperature of the re-masking choice, annealed linearly to 0.
    c.sampling.choice_temperature = 4.5
    # Mask schedule gamma: cosine, linear, square, cubic, log, exp or arccos.
    c.sampling.schedule = "cosine"
    # Softmax temperature of token sampling.
    c.sampling.temperature = 1.0

    # Sample-quality metrics during training, with the FID Inception network (evaluation/).
    c.evaluation = evaluation_config()
    return c


def dataset_config() -> ml_collections.ConfigDict:
    """The `dataset` section: the paper's ImageNet settings (see `data.input_pipeline`).

    Defined here, not next to the TensorFlow pipeline, so that building a config imports no TF.
    """
    c = ml_collections.ConfigDict()
    # Source: "imagenet2012", "digits" (bundled), "folder" (ImageFolder), or any tfds name.
    c.name = "imagenet2012"
    # The optional fields below default to None as typed placeholders, so that the command
    # line can set them (`--config.dataset.folder=ROOT`); a plain None cannot be overridden.
    # TFDS data directory; None = $TFDS_DATA_DIR or ~/tensorflow_datasets.
    c.data_dir = ml_collections.config_dict.placeholder(str)
    # Directory with the imagenet2012 tars; None = <data_dir>/downloads/manual.
    c.manual_dir = ml_collections.config_dict.placeholder(str)
    # Root of the "folder" source, laid out as root/<split>/<class>/*.png|jpg.
    c.folder = ml_collections.config_dict.placeholder(str)
    # Split to train on (a plain split name, no slicing).
    c.train_split = "train"
    # Split to evaluate on; None = the first of validation, test, val that exists.
    c.eval_split = ml_collections.config_dict.placeholder(str)
    # Examples (undecoded) per randomly permuted block, per process (global if global_order).
    c.shuffle_buffer = 10_000
    # Train crops a random square of side min(h, w) (False: the center square).
    c.random_crop = True
    # Train flips horizontally with probability 1/2.
    c.random_flip = True
    # Batches prefetched by tf.data.
    c.prefetch = 2
    # Keep the process's undecoded train records in memory after the first epoch.
    c.cache = False
    # Global batches independent of the process count (every process reads the whole split).
    c.global_order = False
    return c


def evaluation_config() -> ml_collections.ConfigDict:
    """The `evaluation` section: FID/IS of samples and rFID of reconstructions in training.

    Configs saved before the section existed have no `evaluation`; readers use
    `evaluation_settings(config)`, which falls back to these defaults (metrics off).
    """
    e = ml_collections.ConfigDict()
    # TF's 2015-12-05 classify_image_graph_def.pb (or its .tgz); "" disables the metrics.
    e.inception_path = ""
    # Reference .npz from `evaluate --mode=reference`; "" = eval split, cached in the workdir.
    e.reference_statistics = ""
    # Eval-split examples in a reference computed during training (0 = the whole split).
    e.reference_examples = 0
    # Keep raw features in a computed reference (or compute those of a given ADM batch's
    # arr_0 images), so that precision/recall are reported too.
    e.keep_reference_features = False
    # Images sampled per FID evaluation of the transformer (labels 0..num_classes-1 repeated).
    e.num_samples = 10_000
    # Metrics every this many steps, a multiple of logging.eval_every_steps (0 = every eval).
    e.every_steps = 0
    # Images per sampling and Inception batch, per process (a multiple of its device count).
    e.batch_size = 64
    # Splits of the Inception Score (its mean and standard deviation are over them).
    e.inception_score_splits = 10
    return e


def evaluation_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.evaluation` with defaults for fields it lacks (older saved configs)."""
    settings = evaluation_config()
    saved = config.get("evaluation")
    if saved is not None:
        settings.update(dict(saved))
    return settings


def tokens_per_side(config: ml_collections.ConfigDict) -> int:
    """Returns the token-grid side for `config.image_size` and the tokenizer's levels."""
    factor = 2 ** (len(config.tokenizer.channel_multipliers) - 1)
    if config.image_size % factor:
        raise ValueError(
            f"image_size={config.image_size} is not divisible by the tokenizer's downsampling "
            f"factor {factor}."
        )
    return config.image_size // factor


def sequence_length(config: ml_collections.ConfigDict) -> int:
    """Returns the transformer sequence length: one class token plus the image tokens."""
    return tokens_per_side(config) ** 2 + 1


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """Returns codebook codes + class tokens + the mask token (the last row)."""
    return config.tokenizer.codebook_size + config.num_classes + 1


def mask_token_id(config: ml_collections.ConfigDict) -> int:
    """Returns the mask token id: the last embedding row, as in the released weights."""
    return vocab_size(config) - 1


STAGES = ("tokenizer", "transformer", "both")
# The training section of each stage that trains.
TRAINING_SECTIONS = {"tokenizer": "tokenizer_training", "transformer": "training"}


def stages_to_train(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages a run of `config.stage` trains, in order ("both": tokenizer, transformer)."""
    if config.stage not in STAGES:
        raise ValueError(f"stage={config.stage!r} is unknown; use one of {STAGES}.")
    return tuple(TRAINING_SECTIONS) if config.stage == "both" else (config.stage,)


def validate(
    config: ml_collections.ConfigDict,
    stages: Sequence[str] | None = None,
    *,
    inputs: bool = True,
) -> None:
    """Raises ValueError for config mistakes of `stages`, before anything is built or compiled.

    A run validates once, for every stage it will train: `stages` defaults to
    `stages_to_train(config)`. `inputs=False` skips checking that the config names the run's
    inputs (the transformer's tokenizer or tokens), for steps built from shapes (aot_compile).
    """
    if stages is None:
        stages = stages_to_train(config)
    unknown = set(stages) - set(TRAINING_SECTIONS)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; use {tuple(TRAINING_SECTIONS)}.")
    tokens_per_side(config)
    if config.num_classes < 1:
        raise ValueError(f"num_classes={config.num_classes} must be >= 1.")
    for stage in stages:
        _validate_training(config, TRAINING_SECTIONS[stage])
    if "tokenizer" in stages:
        _validate_tokenizer_stage(config)
    if "transformer" in stages:
        _validate_transformer_stage(config, tokenizer_trained_first="tokenizer" in stages)
        if inputs and "tokenizer" not in stages:
            _validate_transformer_inputs(config)
    _validate_evaluation(config)


def _validate_training(config: ml_collections.ConfigDict, section: str) -> None:
    """Checks what both stages' training sections share."""
    training = config[section]
    if training.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(
            f"{section}.compute_dtype={training.compute_dtype!r}; use float32 or bfloat16."
        )
    if training.batch_size < 1 or training.num_train_steps < 0:
        raise ValueError(f"{section}.batch_size and num_train_steps must be positive.")


def _validate_tokenizer_stage(config: ml_collections.ConfigDict) -> None:
    """Checks the tokenizer stage's GAN settings."""
    if config.tokenizer_training.disc_steps < 1:
        raise ValueError("tokenizer_training.disc_steps must be >= 1.")
    if config.tokenizer_training.gan_loss not in ("non_saturating", "hinge"):
        raise ValueError(
            f"tokenizer_training.gan_loss={config.tokenizer_training.gan_loss!r}; use "
            "'non_saturating' or 'hinge'."
        )


def _validate_transformer_stage(
    config: ml_collections.ConfigDict, tokenizer_trained_first: bool
) -> None:
    """Checks the transformer's shape and micro-batching, and its tokens in a `both` run."""
    if config.training.grad_accum_steps < 1:
        raise ValueError("training.grad_accum_steps must be >= 1.")
    if config.training.batch_size % config.training.grad_accum_steps:
        raise ValueError(
            f"training.batch_size={config.training.batch_size} is not divisible by "
            f"training.grad_accum_steps={config.training.grad_accum_steps}."
        )
    if config.transformer.hidden_size % config.transformer.num_heads:
        raise ValueError(
            f"transformer.hidden_size={config.transformer.hidden_size} is not divisible by "
            f"num_heads={config.transformer.num_heads}."
        )
    if tokenizer_trained_first and config.training.pretokenized_dir:
        raise ValueError(
            "stage='both' trains the transformer on the tokenizer it has just trained, but "
            f"training.pretokenized_dir={config.training.pretokenized_dir!r} holds tokens of "
            "another tokenizer: clear it, or train stage='transformer' on those tokens."
        )


def _validate_transformer_inputs(config: ml_collections.ConfigDict) -> None:
    """Checks that a transformer trained on its own names its tokenizer or tokens."""
    if not (config.training.tokenizer_checkpoint or config.training.pretokenized_dir):
        raise ValueError(
            "stage='transformer' needs training.tokenizer_checkpoint (a pretrained directory or "
            "a tokenizer-stage workdir) or training.pretokenized_dir."
        )


def _validate_evaluation(config: ml_collections.ConfigDict) -> None:
    """Checks the `evaluation` section; nothing is checked while the metrics are off."""
    e = evaluation_settings(config)
    if not e.inception_path:
        return
    if e.num_samples < 2:
        raise ValueError(
            f"evaluation.num_samples={e.num_samples}: FID needs at least 2 samples (a "
            "covariance); use thousands for a meaningful value."
        )
    if e.batch_size < 1:
        raise ValueError(f"evaluation.batch_size={e.batch_size} must be >= 1.")
    if not 1 <= e.inception_score_splits <= e.num_samples:
        raise ValueError(
            f"evaluation.inception_score_splits={e.inception_score_splits} must be in "
            f"[1, evaluation.num_samples={e.num_samples}]."
        )
    if e.reference_examples < 0 or e.reference_examples == 1:
        raise ValueError(
            f"evaluation.reference_examples={e.reference_examples}: use 0 (the whole eval "
            "split) or at least 2."
        )
    every, eval_every = e.every_steps, config.logging.eval_every_steps
    if not eval_every:
        raise ValueError(
            "evaluation.inception_path is set but logging.eval_every_steps=0: the metrics run "
            "with the held-out evaluation; set logging.eval_every_steps > 0 or clear "
            "evaluation.inception_path."
        )
    if every < 0 or every % eval_every:
        raise ValueError(
            f"evaluation.every_steps={every} must be 0 (every evaluation) or a multiple of "
            f"logging.eval_every_steps={eval_every}: the metrics run with the held-out "
            "evaluation."
        )
