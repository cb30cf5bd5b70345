"""Helpers shared by tests: configs from files and from the fixture's config.json."""

import ml_collections
from ml_collections import config_flags  # noqa: F401

from maskgit_jax import config_lib
from maskgit_jax.models import build_tokenizer  # noqa: F401  (re-exported for tests)
from tests.conftest import REPO_ROOT


def load_config_file(relative_path: str) -> ml_collections.ConfigDict:
    """Imports a config file of configs/ by path and returns its get_config()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", REPO_ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_from_fixture(fixture: dict) -> ml_collections.ConfigDict:
    """Our config for the authors' small fixture configuration (config.json)."""
    config = config_lib.base_config()
    config.image_size = fixture["image_size"]
    config.num_classes = fixture["num_class"]
    config.tokenizer.update(
        filters=fixture["filters"],
        channel_multipliers=tuple(fixture["channel_multipliers"]),
        num_res_blocks=fixture["num_res_blocks"],
        embedding_dim=fixture["embedding_dim"],
        codebook_size=fixture["codebook_size"],
    )
    config.transformer.update(
        hidden_size=fixture["hidden"],
        num_layers=fixture["layers"],
        num_heads=fixture["heads"],
        mlp_dim=fixture["intermediate"],
    )
    return config


def save_random_pretrained(directory, config: ml_collections.ConfigDict):
    """Writes a pretrained directory of `config` with random weights (seed 0); returns it."""
    import jax
    import numpy as np

    from maskgit_jax.checkpoints import pretrained
    from maskgit_jax.sampling.pipeline import MaskGITPipeline

    pipe = MaskGITPipeline.with_random_weights(config, seed=0)
    to_host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    pretrained.save_pretrained(
        directory, config, to_host(pipe.tokenizer_variables), to_host(pipe.transformer_variables)
    )
    return directory
