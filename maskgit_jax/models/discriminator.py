"""StyleGAN2-style residual discriminator with blur-pool downsampling, for tokenizer training.

Built from explicit fields so a config block maps straight onto it. The image is reduced
by residual down blocks to 4x4, then scored by a small head; the output is one float32 logit
per image. Equalized learning rate and other StyleGAN tricks beyond blur-pool, residual
scaling and minibatch standard deviation are left out.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskgit_jax.models.attention import largest_divisor_at_most

Array = jax.Array

_LEAKY_SLOPE = 0.2
_FINAL_RESOLUTION = 4


def _leaky_relu(x: Array) -> Array:
    return nn.leaky_relu(x, negative_slope=_LEAKY_SLOPE)


def blur_filter(kernel: Sequence[float]) -> Array:
    """Normalized 2-D low-pass filter: outer product of the 1-D `kernel`, summing to 1."""
    k = jnp.asarray(kernel, jnp.float32)
    if k.ndim != 1 or k.shape[0] < 1:
        raise ValueError(f"blur kernel must be a non-empty 1-D sequence, got {kernel!r}.")
    k2 = jnp.outer(k, k)
    return k2 / jnp.sum(k2)


def blur_pool(x: Array, kernel: Sequence[float] = (1, 3, 3, 1)) -> Array:
    """Anti-aliased 2x downsampling of NHWC `x`: depthwise low-pass filter, then stride 2.

    Zero padding is chosen so that an even H x W becomes H/2 x W/2 and each output sits at the
    centre of the 2x2 cell it replaces (for kernel length 4: one pixel each side). Filtering
    and subsampling are one strided depthwise convolution, in `x`'s dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"blur_pool expects NHWC input, got shape {x.shape}.")
    channels = x.shape[-1]
    taps = len(kernel)
    pad_lo = (taps - 1) // 2
    pad_hi = taps - 2 - pad_lo
    weights = blur_filter(kernel).astype(x.dtype)
    weights = jnp.tile(weights[:, :, None, None], (1, 1, 1, channels))  # HWIO, I=1 (depthwise)
    return jax.lax.conv_general_dilated(
        x,
        weights,
        window_strides=(2, 2),
        padding=((pad_lo, pad_hi), (pad_lo, pad_hi)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def num_down_blocks(image_size: int) -> int:
    """Down blocks taking `image_size` to 4x4; ValueError unless image_size = 4 * 2^k, k >= 0."""
    ratio = image_size // _FINAL_RESOLUTION
    valid = (
        image_size >= _FINAL_RESOLUTION
        and image_size % _FINAL_RESOLUTION == 0
        and ratio & (ratio - 1) == 0
    )
    if not valid:
        raise ValueError(
            f"discriminator image_size={image_size} must be 4 times a power of 2 "
            "(4, 8, 16, 32, ..., 256, 512)."
        )
    return ratio.bit_length() - 1


def block_features(
    image_size: int, filters: int, channel_multipliers: Sequence[int]
) -> tuple[int, ...]:
    """Output width of each down block, from the input resolution down to 4x4.

    Block i uses `filters * channel_multipliers[i]`; when the image needs more blocks than
    multipliers are listed, the last multiplier is repeated (as StyleGAN caps its width at low
    resolution), and unused trailing multipliers are ignored, so one config serves any size.
    """
    if not channel_multipliers:
        raise ValueError("channel_multipliers must not be empty.")
    count = num_down_blocks(image_size)
    last = len(channel_multipliers) - 1
    return tuple(filters * channel_multipliers[min(i, last)] for i in range(count))


def minibatch_stddev(x: Array, group_size: int, num_features: int = 1) -> Array:
    """Append `num_features` channels holding the within-group std of features (StyleGAN).

    Examples are split into groups of the largest divisor of the batch not above
    `group_size`; each group's per-feature standard deviation, averaged over space and the
    channels of each of the `num_features` slices, is broadcast to every pixel of its members.
    Lets the discriminator notice a generator with too little variety.
    """
    batch, height, width, channels = x.shape
    if channels % num_features:
        raise ValueError(f"{channels} channels do not split into {num_features} stddev features.")
    groups = largest_divisor_at_most(batch, group_size)
    y = x.astype(jnp.float32).reshape(
        groups, batch // groups, height, width, num_features, channels // num_features
    )
    y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [B/G, H, W, F, C/F]
    y = jnp.mean(y, axis=(1, 2, 4))  # [B/G, F]
    y = jnp.tile(y, (groups, 1))  # example g * (B/G) + m gets y[m]
    y = jnp.broadcast_to(y[:, None, None, :], (batch, height, width, num_features))
    return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DownBlock(nn.Module):
    """3x3 conv, blur-pool, 3x3 conv to `features`, plus a blur-pool 1x1 shortcut, / sqrt(2)."""

    features: int
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = _leaky_relu(nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype)(x))
        h = blur_pool(h, self.blur_kernel)
        h = _leaky_relu(nn.Conv(self.features, (3, 3), dtype=self.dtype)(h))
        skip = blur_pool(x, self.blur_kernel)
        skip = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype)(skip)
        return (h + skip) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
    """Images [B, S, S, C] -> float32 logits [B]; S must be 4 times a power of 2.

    Inputs are scored as given (the caller chooses the pixel range, e.g. [0, 1]).
    `mbstd_group_size=0` removes the minibatch-stddev layer, which makes examples independent.
    """

    image_size: int
    filters: int = 64
    channel_multipliers: Sequence[int] = (1, 2, 4, 4, 4, 4)
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    mbstd_group_size: int = 4
    mbstd_num_features: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        widths = block_features(self.image_size, self.filters, self.channel_multipliers)
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images [B, {self.image_size}, {self.image_size}, C], "
                f"got shape {images.shape}."
            )
        x = images.astype(self.dtype)
        x = _leaky_relu(nn.Conv(self.filters, (1, 1), dtype=self.dtype, name="from_rgb")(x))
        for features in widths:
            x = DownBlock(features, self.blur_kernel, self.dtype)(x)
        if self.mbstd_group_size > 0:
            x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_features)
        final_width = widths[-1] if widths else self.filters
        x = _leaky_relu(nn.Conv(final_width, (3, 3), dtype=self.dtype)(x))
        x = x.reshape(x.shape[0], -1)
        x = _leaky_relu(nn.Dense(final_width, dtype=self.dtype)(x))
        logits = nn.Dense(1, dtype=self.dtype)(x)
        return logits[:, 0].astype(jnp.float32)
