"""VGG16 feature extractor and the perceptual loss used when training the VQGAN tokenizer.

The network mirrors `keras.applications.VGG16(include_top=False)`: 13 3x3 convolutions with
ReLU in 5 blocks, a 2x2 max-pool between blocks, NHWC. Parameter names are the Keras layer
names (`block1_conv1/kernel`, `.../bias`) so converting a Keras weight file is a pure mapping
(see `maskgit_jax.convert_perceptual`). Images in [0, 1] RGB are turned into the network's
"caffe" input inside the module: BGR order, 0..255 scale, ImageNet mean subtracted.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The 5 blocks of VGG16: (output channels, names of the block's convolutions).
VGG16_BLOCKS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (64, ("block1_conv1", "block1_conv2")),
    (128, ("block2_conv1", "block2_conv2")),
    (256, ("block3_conv1", "block3_conv2", "block3_conv3")),
    (512, ("block4_conv1", "block4_conv2", "block4_conv3")),
    (512, ("block5_conv1", "block5_conv2", "block5_conv3")),
)
VGG16_LAYERS: tuple[str, ...] = tuple(name for _, names in VGG16_BLOCKS for name in names)
# The last convolution of each block, the usual choice for perceptual losses.
DEFAULT_FEATURE_LAYERS: tuple[str, ...] = (
    "block1_conv2",
    "block2_conv2",
    "block3_conv3",
    "block4_conv3",
    "block5_conv3",
)
# Per-channel ImageNet mean in BGR order on the 0..255 scale (Keras "caffe" preprocessing).
IMAGENET_BGR_MEAN: tuple[float, float, float] = (103.939, 116.779, 123.68)

FeaturesFn = Callable[[Any, jax.Array], Mapping[str, jax.Array]]


def preprocess_images(images: jax.Array) -> jax.Array:
    """Maps RGB images in [0, 1] to VGG16's input: BGR, 0..255, ImageNet mean removed."""
    bgr = images[..., ::-1] * 255.0
    return bgr - jnp.asarray(IMAGENET_BGR_MEAN, dtype=bgr.dtype)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk returning `{layer name: activation}` for `feature_layers`.

    Activations are taken after the ReLU (as Keras reports its conv layers' outputs). Layers
    past the deepest requested one are not run, so they need not be in the parameters.
    """

    feature_layers: Sequence[str] = DEFAULT_FEATURE_LAYERS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """`images`: [batch, height, width, 3] RGB in [0, 1]."""
        unknown = [name for name in self.feature_layers if name not in VGG16_LAYERS]
        if unknown or not self.feature_layers:
            raise ValueError(
                f"feature_layers must be non-empty names among {VGG16_LAYERS}; got unknown "
                f"{unknown}."
            )
        last = max(VGG16_LAYERS.index(name) for name in self.feature_layers)
        x = preprocess_images(images.astype(jnp.float32)).astype(self.dtype)
        features = {}
        for block, (channels, names) in enumerate(VGG16_BLOCKS):
            if block > 0:
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
            for name in names:
                conv = nn.Conv(
                    channels,
                    kernel_size=(3, 3),
                    padding="SAME",
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    name=name,
                )
                x = nn.relu(conv(x))
                if name in self.feature_layers:
                    features[name] = x
                if VGG16_LAYERS.index(name) == last:
                    return {name: features[name] for name in self.feature_layers}
        raise AssertionError("unreachable: the deepest requested layer is always reached")


def abstract_vgg16_params() -> dict[str, Any]:
    """Shapes of the full VGG16 parameter tree (every conv layer), without allocating."""
    model = VGG16Features(feature_layers=(VGG16_LAYERS[-1],))
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]


def vgg16_features_fn(
    feature_layers: Sequence[str] = DEFAULT_FEATURE_LAYERS, dtype: Any = jnp.float32
) -> FeaturesFn:
    """A `(params, images) -> {layer: activation}` function for `perceptual_loss`."""
    model = VGG16Features(feature_layers=tuple(feature_layers), dtype=dtype)
    return lambda params, images: model.apply({"params": params}, images)


def _normalize_channels(features: jax.Array, eps: float = 1e-10) -> jax.Array:
    # Unit L2 norm over channels; eps inside the root keeps the gradient finite where a whole
    # feature vector is zero (common after ReLU).
    features = features.astype(jnp.float32)
    return features * jax.lax.rsqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True) + eps)


def perceptual_loss(
    features_fn: FeaturesFn, params: Any, images_a: jax.Array, images_b: jax.Array
) -> jax.Array:
    """LPIPS-style distance without LPIPS's learned per-channel weights; a float32 scalar.

    For each layer the features of both images are normalized to unit L2 norm over channels;
    the squared difference is summed over channels (LPIPS with all linear weights equal to 1)
    and averaged over batch and positions; layers are summed. Each layer's term lies in
    [0, 4]; identical images give 0 (up to float32 rounding). Images are [batch, height,
    width, 3] in [0, 1].
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {images_a.shape} vs {images_b.shape}.")
    # One pass over both batches (one larger convolution per layer instead of two).
    features = features_fn(params, jnp.concatenate([images_a, images_b], axis=0))
    total = jnp.zeros((), jnp.float32)
    for feature in features.values():
        feature_a, feature_b = jnp.split(feature, 2, axis=0)
        difference = _normalize_channels(feature_a) - _normalize_channels(feature_b)
        total = total + jnp.mean(jnp.sum(jnp.square(difference), axis=-1))
    return total
