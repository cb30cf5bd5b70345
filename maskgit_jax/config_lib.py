"""Shared configuration: every field a stage reads, with the paper's values as defaults.

The files in `configs/` start from `base_config()` and override sizes and data; modules are
built from the sub-dicts (`config.tokenizer`, `config.transformer`), never from the whole
config.
"""

import ml_collections

# Spatial downsampling factor of the released tokenizer (4 average pools of stride 2).
TOKENIZER_DOWNSAMPLE = 16


def base_config() -> ml_collections.ConfigDict:
    """Returns the ImageNet 256x256 configuration of the paper and released models."""
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
    return c


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
