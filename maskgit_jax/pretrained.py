"""Our format for a trained model pair: a config plus Orbax-saved parameters.

Layout of a pretrained directory (local or gs://):
  config.json      the ml_collections config the models are built from
  tokenizer/       Orbax StandardCheckpointer tree `{"params": ...}`
  transformer/     Orbax StandardCheckpointer tree `{"params": ...}`
`convert_official` writes it from the released files; training exports it; sampling loads it.
"""

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from maskgit_jax import official_checkpoint

CONFIG_FILE = "config.json"
PARTS = ("tokenizer", "transformer")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A config with the tokenizer's and transformer's variables (`{"params": ...}` each)."""

    config: ml_collections.ConfigDict
    tokenizer_variables: dict[str, Any] | None
    transformer_variables: dict[str, Any] | None


def _abstract(config: ml_collections.ConfigDict, part: str) -> dict[str, Any]:
    if part == "tokenizer":
        return official_checkpoint.abstract_tokenizer_params(config)
    return official_checkpoint.abstract_transformer_params(config)


def save_pretrained(
    directory: str | epath.PathLike,
    config: ml_collections.ConfigDict,
    tokenizer_variables: dict[str, Any] | None = None,
    transformer_variables: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Checks the given trees against `config`, then writes config.json and Orbax trees.

    Either part may be omitted (a tokenizer-stage export has no transformer). Refuses to
    write into a non-empty directory unless `overwrite`, so nothing saved is lost. Every
    process must call it (Orbax coordinates multi-host writes); process 0 writes the config.
    """
    directory = epath.Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; choose a new output directory.")
    parts = {
        part: variables
        for part, variables in zip(PARTS, (tokenizer_variables, transformer_variables), strict=True)
        if variables is not None
    }
    for part, variables in parts.items():
        official_checkpoint.check_tree_matches(_abstract(config, part), variables, part)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    for part, variables in parts.items():
        checkpointer.save(directory / part, variables, force=overwrite)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / CONFIG_FILE).write_text(config.to_json(indent=2))
    return directory


def load_config(directory: str | epath.PathLike) -> ml_collections.ConfigDict:
    """Reads the config saved beside a pretrained model."""
    path = epath.Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a pretrained directory.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_pretrained(
    directory: str | epath.PathLike,
    config: ml_collections.ConfigDict | None = None,
    parts: tuple[str, ...] = PARTS,
    sharding: jax.sharding.Sharding | None = None,
) -> Pretrained:
    """Loads the requested parts, checking names and shapes before reading any array.

    `config` defaults to the one saved there; passing another checks that it fits. Arrays
    land with `sharding` (default: the first local device).
    """
    directory = epath.Path(directory)
    config = config or load_config(directory)
    sharding = sharding or _local_sharding()
    checkpointer = ocp.StandardCheckpointer()
    restored = {}
    for part in parts:
        if not (directory / part).exists():
            raise FileNotFoundError(f"{directory} has no {part} (expected {directory / part}).")
        abstract = _abstract(config, part)
        found = checkpointer.metadata(directory / part).item_metadata.tree
        official_checkpoint.check_tree_matches(abstract, found, f"{part} at {directory / part}")
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract
        )
        restored[part] = checkpointer.restore(directory / part, target)
    return Pretrained(config, restored.get("tokenizer"), restored.get("transformer"))


def _local_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
