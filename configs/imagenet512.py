"""MaskGIT on ImageNet 512x512: the same models with 32x32 tokens (sequence 1025)."""

from maskgit_jax import config_lib


def get_config():
    """The released imagenet512 architecture; only the image size differs from imagenet256."""
    config = config_lib.base_config()
    # 512 pixels -> 32x32 = 1024 image tokens + 1 class token.
    config.image_size = 512
    return config
