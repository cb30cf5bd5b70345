"""Our format for a trained model pair: a config plus Orbax-saved parameters.

Layout of a pretrained directory (local or gs://):
  config.json      the ml_collections config the models are built from
  tokenizer/       Orbax StandardCheckpointer tree `{"params": ...}`
  transformer/     Orbax StandardCheckpointer tree `{"params": ...}`
`convert_official` writes it from the released files; training exports it; sampling loads it.

A directory `D` is written as its sibling `D.partial` and renamed into place once complete
(an existing `D` being replaced waits as `D.replaced` until then), so an interrupted save or
conversion never leaves a half-written `D`; the next save cleans up what it left.
"""

import contextlib
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from maskgit_jax import multihost, paths
from maskgit_jax.checkpoints import official as official_checkpoint

CONFIG_FILE = "config.json"
PARTS = ("tokenizer", "transformer")
# Where a training workdir keeps its exported pretrained directory.
WORKDIR_EXPORT = "pretrained"
# Fields of config.json that building either model needs.
REQUIRED_CONFIG_FIELDS = ("image_size", "num_classes", "tokenizer", "transformer")
# Sibling suffixes: the new contents being written, and the old ones while they are replaced.
PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"
# Orbax's in-progress directories (`<item>.orbax-checkpoint-tmp-<timestamp>`).
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
# How long a failed read waits for Orbax's abandoned reads to report (and be silenced).
_FAILED_READS_GRACE_S = 0.25


class PretrainedError(ValueError):
    """A pretrained directory, or its config.json, cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A config with the tokenizer's and transformer's variables (`{"params": ...}` each)."""

    config: ml_collections.ConfigDict
    tokenizer_variables: dict[str, Any] | None
    transformer_variables: dict[str, Any] | None


def _abstract(config: ml_collections.ConfigDict, part: str, source: str) -> dict[str, Any]:
    """The part's variable shapes for `config`; a config that cannot build it names `source`."""
    try:
        if part == "tokenizer":
            return official_checkpoint.abstract_tokenizer_params(config)
        return official_checkpoint.abstract_transformer_params(config)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise PretrainedError(
            f"{source} cannot build the {part}: {type(error).__name__}: {error}"
        ) from None


def _sibling(directory: epath.Path, suffix: str) -> epath.Path:
    return directory.parent / (directory.name + suffix)


def _is_primary() -> bool:
    return jax.process_index() == 0


def _recover(directory: epath.Path) -> None:
    """Undoes what an interrupted save of `directory` left: restores or drops `D.replaced`.

    `D.replaced` with no `D` (or an empty one) means the save stopped between its two
    renames: the old model goes back. With a complete `D` (its config.json is written last),
    the new model was in place and `D.replaced` is the one that save was asked to overwrite.
    A stale `D.partial` is never a complete model.
    """
    replaced = _sibling(directory, REPLACED_SUFFIX)
    if replaced.exists():
        if not directory.exists() or not _leftover_entries(directory):
            if directory.exists():
                directory.rmtree()
            replaced.rename(directory)
        elif (directory / CONFIG_FILE).exists():
            replaced.rmtree()
    partial = _sibling(directory, PARTIAL_SUFFIX)
    if partial.exists():
        partial.rmtree()


def _leftover_entries(directory: epath.Path) -> list[epath.Path]:
    """Entries of `directory` other than Orbax temporaries of an interrupted save."""
    return [p for p in directory.iterdir() if ORBAX_TMP_MARKER not in p.name]


def _check_writable(directory: epath.Path, overwrite: bool) -> None:
    """Refuses to replace a non-empty directory unless `overwrite` (Orbax debris is empty)."""
    if not directory.exists() or overwrite:
        return
    if not directory.is_dir() or _leftover_entries(directory):
        raise FileExistsError(f"{directory} is not empty; choose a new output directory.")


def _put_in_place(new: epath.Path, directory: epath.Path) -> None:
    """Renames the complete `new` to `directory`, replacing what is there (old one moved first).

    On an object store (gs://) renames copy objects and are not atomic, but the order still
    keeps either the old or the new model readable under a name `_recover` understands.
    """
    if directory.exists():
        replaced = _sibling(directory, REPLACED_SUFFIX)
        if replaced.exists():
            raise FileExistsError(
                f"{replaced} exists beside {directory}, which is not a complete pretrained "
                "directory: move one of them away (an earlier save was interrupted)."
            )
        directory.rename(replaced)
        new.rename(directory)
        replaced.rmtree()
    else:
        new.rename(directory)


def save_pretrained(
    directory: str | epath.PathLike,
    config: ml_collections.ConfigDict,
    tokenizer_variables: dict[str, Any] | None = None,
    transformer_variables: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Checks the given trees against `config`, then writes config.json and Orbax trees.

    Either part may be omitted (a tokenizer-stage export has no transformer). Refuses to
    write into a non-empty directory unless `overwrite`, so nothing saved is lost. Writes
    into `D.partial` and renames it to `D` at the end (see the module docstring). Every
    process must call it (Orbax coordinates multi-host writes); process 0 moves files and
    writes the config. Returns the absolute directory.
    """
    directory = paths.absolute(directory)
    parts = {
        part: variables
        for part, variables in zip(PARTS, (tokenizer_variables, transformer_variables), strict=True)
        if variables is not None
    }
    for part, variables in parts.items():
        expected = _abstract(config, part, "the config")
        official_checkpoint.check_tree_matches(expected, variables, part)
    if _is_primary():
        _recover(directory)
    multihost.sync(f"pretrained recovered {directory}")
    _check_writable(directory, overwrite)
    partial = _sibling(directory, PARTIAL_SUFFIX)
    partial.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    for part, variables in parts.items():
        checkpointer.save(partial / part, variables)
    checkpointer.wait_until_finished()
    multihost.sync(f"pretrained written {directory}")
    if _is_primary():
        (partial / CONFIG_FILE).write_text(config.to_json(indent=2))
        _put_in_place(partial, directory)
    multihost.sync(f"pretrained committed {directory}")
    return directory


def copy_pretrained(
    source: str | epath.PathLike,
    destination: str | epath.PathLike,
    parts: tuple[str, ...] = PARTS,
    overwrite: bool = False,
) -> epath.Path:
    """Copies config.json and `parts` of a pretrained directory file by file (one process).

    The copy goes through `destination.partial` like `save_pretrained`, so a half copy is
    never taken for a model. Returns the absolute destination.
    """
    source, destination = paths.absolute(source), paths.absolute(destination)
    names = (CONFIG_FILE, *parts)
    for name in names:
        if not (source / name).exists():
            raise FileNotFoundError(f"{source} has no {name} (expected {source / name}).")
    _recover(destination)
    _check_writable(destination, overwrite)
    partial = _sibling(destination, PARTIAL_SUFFIX)
    for name in names:
        _copy_tree(source / name, partial / name)
    _put_in_place(partial, destination)
    return destination


def _copy_tree(source: epath.Path, destination: epath.Path) -> None:
    """Copies a file, or a directory recursively (works across local and gs:// paths)."""
    if source.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _copy_tree(child, destination / child.name)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.copy(destination, overwrite=True)


def find_pretrained(path: str | epath.PathLike, part: str, setting: str = "path") -> epath.Path:
    """The absolute pretrained directory holding `part` at `path` or in its `pretrained/`.

    `path` is a pretrained directory or a training workdir (which exports to `pretrained/`);
    a FileNotFoundError names `setting` (the flag or config field `path` came from).
    """
    absolute = paths.absolute(path)
    for candidate in (absolute / WORKDIR_EXPORT, absolute):
        if (candidate / part).exists():
            return candidate
    raise FileNotFoundError(
        f"{setting}={path}: no {part} found (expected {absolute / part} or a workdir holding "
        f"{WORKDIR_EXPORT}/{part})."
    )


def load_config(directory: str | epath.PathLike) -> ml_collections.ConfigDict:
    """Reads the config saved beside a pretrained model; a broken file raises PretrainedError."""
    path = paths.absolute(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a pretrained directory.")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise PretrainedError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(saved, dict):
        raise PretrainedError(
            f"{path} holds a JSON {type(saved).__name__}, not a config (a JSON object)."
        )
    missing = [name for name in REQUIRED_CONFIG_FIELDS if name not in saved]
    if missing:
        raise PretrainedError(
            f"{path} lacks the config fields {', '.join(missing)}: it is not a config written "
            "by save_pretrained."
        )
    for section in ("tokenizer", "transformer"):
        if not isinstance(saved[section], dict):
            raise PretrainedError(f"{path}: '{section}' is not a section (a JSON object).")
    return ml_collections.ConfigDict(saved)


def _read_saved_tree(checkpointer: ocp.StandardCheckpointer, path: epath.Path, part: str) -> Any:
    """The saved tree's shapes and dtypes; unreadable Orbax metadata raises PretrainedError."""
    try:
        metadata = checkpointer.metadata(path)
        tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    except Exception as error:  # Orbax raises many kinds for damaged files.
        raise _corrupt(path, part, error) from None
    if tree is None:
        raise _corrupt(path, part, "no readable tree metadata (_METADATA missing or damaged)")
    return tree


def _corrupt(path: epath.Path, part: str, cause: Any) -> PretrainedError:
    """The error for a damaged Orbax tree: the path and the first line of Orbax's reason."""
    if isinstance(cause, BaseException):
        first_line = (str(cause).splitlines() or [""])[0].split(" See full TensorStore")[0]
        cause = f"{type(cause).__name__}: {first_line[:300]}"
    return PretrainedError(
        f"{path} is not a readable Orbax checkpoint of the {part} ({cause}); the pretrained "
        "directory is damaged or incomplete: export or convert it again."
    )


def load_pretrained(
    directory: str | epath.PathLike,
    config: ml_collections.ConfigDict | None = None,
    parts: tuple[str, ...] = PARTS,
    sharding: jax.sharding.Sharding | None = None,
) -> Pretrained:
    """Loads the requested parts, checking names and shapes before reading any array.

    `config` defaults to the one saved there; passing another checks that it fits. Arrays
    land with `sharding` (default: the first local device). A broken config.json or damaged
    Orbax files raise PretrainedError naming the file.
    """
    directory = paths.absolute(directory)
    source = "the given config" if config is not None else str(directory / CONFIG_FILE)
    config = load_config(directory) if config is None else config
    sharding = sharding or _local_sharding()
    checkpointer = ocp.StandardCheckpointer()
    restored = {}
    for part in parts:
        path = directory / part
        if not path.exists():
            raise FileNotFoundError(f"{directory} has no {part} (expected {path}).")
        abstract = _abstract(config, part, source)
        with _quiet_failed_reads():
            found = _read_saved_tree(checkpointer, path, part)
        _check_saved_tree(abstract, found, part, path, from_file=source != "the given config")
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract
        )
        with _quiet_failed_reads():
            try:
                restored[part] = checkpointer.restore(path, target)
            except Exception as error:  # Missing or truncated array files.
                raise _corrupt(path, part, error) from None
    return Pretrained(config, restored.get("tokenizer"), restored.get("transformer"))


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Drops the "Exception ignored in" reports of Orbax's abandoned reads of damaged files.

    When one array of a damaged tree fails, Orbax abandons the other reads, and each one
    prints a traceback when collected (or "Event loop is closed" when its callback runs);
    the PretrainedError already says what is wrong.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        from_orbax = code is not None and "orbax" in code.co_filename
        loop_closed = "Event loop is closed" in str(unraisable.exc_value)
        if not (from_orbax or loop_closed):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        # The abandoned reads finish on TensorStore threads a few milliseconds later.
        time.sleep(_FAILED_READS_GRACE_S)
        raise
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _check_saved_tree(
    abstract: Any, found: Any, part: str, path: epath.Path, from_file: bool
) -> None:
    """Raises CheckpointMismatchError naming the first difference (and config.json if read)."""
    try:
        official_checkpoint.check_tree_matches(abstract, found, f"{part} at {path}")
    except official_checkpoint.CheckpointMismatchError as error:
        if not from_file:
            raise
        config_file = path.parent / CONFIG_FILE
        raise official_checkpoint.CheckpointMismatchError(
            f"{error} The config was read from {config_file}: a field missing from its "
            f"'{part}' section takes the model's default, so check that file."
        ) from None


def _local_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
