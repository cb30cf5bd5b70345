"""MaskGIT on ImageNet 256x256: the paper's models (16x16 tokens) and training settings."""

from maskgit_jax import config_lib


def get_config():
    """The released imagenet256 architecture and the authors' training hyper-parameters."""
    return config_lib.base_config()
