"""Reads the authors' released MaskGIT checkpoints (msgpack) and checks them against a config.

The four released files are `flax.serialization.to_bytes({"params": ...})`. Our module trees
use the authors' names, so loading is a pure read plus a name-and-shape check; nothing is
renamed. Paths may be local or `gs://` (read through `etils.epath`).
"""

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from maskgit_jax import config_lib, sharding
from maskgit_jax.checkpoints import manager as checkpoints
from maskgit_jax.models import build_tokenizer, build_transformer


class CheckpointMismatchError(ValueError):
    """A checkpoint's parameter tree does not match the model built from the config."""


def check_tree_matches(expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> None:
    """Raises CheckpointMismatchError naming the first difference, and how many there are."""
    problems = checkpoints.compare_trees(expected, found)
    if problems:
        more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"{what} does not match the model built from the config: {problems[0]}{more}."
        )


def read_msgpack(path: str | epath.PathLike) -> dict[str, Any]:
    """Reads a `flax.serialization.to_bytes` file (local or gs://) into a nested dict."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        restored = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as error:
        raise ValueError(f"{path} is not a flax msgpack checkpoint: {error}") from error
    if not isinstance(restored, Mapping):
        raise ValueError(
            f"{path} holds a {type(restored).__name__}, not a variables dict {{'params': ...}}."
        )
    return restored


def abstract_tokenizer_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Shapes of the tokenizer variables `{"params": ...}` for `config`, without allocating."""
    model = build_tokenizer(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)


def abstract_transformer_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Shapes of the transformer variables `{"params": ...}` for `config` (unboxed)."""
    model = build_transformer(config)
    ids = jax.ShapeDtypeStruct((1, config_lib.sequence_length(config)), jnp.int32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), ids)
    return sharding.strip_boxes(abstract)


def _load(path, expected, what: str) -> dict[str, Any]:
    variables = read_msgpack(path)
    check_tree_matches(expected, variables, f"{what} {path}")
    return jax.tree.map(lambda x: np.asarray(x, np.float32), variables)


def load_official_tokenizer(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Loads a released tokenizer file as `{"params": ...}`, checked against `config`."""
    return _load(path, abstract_tokenizer_params(config), "tokenizer checkpoint")


def load_official_transformer(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Loads a released transformer file as `{"params": ...}`, checked against `config`."""
    return _load(path, abstract_transformer_params(config), "transformer checkpoint")


def save_official_format(path: str | epath.PathLike, variables: Mapping[str, Any]) -> None:
    """Writes variables exactly as the authors did (`flax.serialization.to_bytes`)."""
    plain = jax.tree.map(np.asarray, sharding.strip_boxes(dict(variables)))
    epath.Path(path).write_bytes(flax.serialization.to_bytes(plain))
