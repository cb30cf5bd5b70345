"""Checkpointing: a thin layer over Orbax's `CheckpointManager` plus preemption handling.

Each step directory holds two Orbax items: `state` (the train state, `StandardSave`) and
`meta` (JSON: the step, caller metadata such as the config, and the data iterator position).
Restoring checks the saved tree against the expected one first, so a config/model mismatch
fails with the offending parameter path instead of an Orbax structure error, and falls back
past unreadable (partly written or corrupt) steps to the newest one that restores.
"""

import json
import logging
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from maskgit_jax import multihost, paths

logger = logging.getLogger(__name__)

# Orbax item names inside each step directory.
STATE_ITEM = "state"
META_ITEM = "meta"
# Keys of the `meta` item that `save` fills in itself.
RESERVED_META_KEYS = ("step", "data_state")


def create_checkpoint_manager(
    directory: str | epath.PathLike,
    *,
    save_every_steps: int,
    max_to_keep: int | None,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """Returns an Orbax manager saving every `save_every_steps` steps and keeping the last few.

    `directory` may be local or a `gs://` path; it is created if missing. Leftover temporary
    directories of interrupted saves are removed.
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every_steps,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    # Register the items' handlers up front: a fresh manager otherwise cannot read the item
    # metadata of existing steps (needed by `restore_latest` before any save or restore).
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, arg_types in (
        (STATE_ITEM, (ocp.args.StandardSave, ocp.args.StandardRestore)),
        (META_ITEM, (ocp.args.JsonSave, ocp.args.JsonRestore)),
    ):
        for arg_type in arg_types:
            registry.add(item, arg_type)
    return ocp.CheckpointManager(
        paths.absolute(directory), options=options, handler_registry=registry
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    metadata: Mapping[str, Any],
    data_state: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Saves `state` and JSON metadata at `step` if the save interval (or `force`) says so.

    Returns whether a save was started; with async saving it completes in the background
    (call `manager.wait_until_finished()` before exiting).
    """
    clashes = sorted(set(metadata) & set(RESERVED_META_KEYS))
    if clashes:
        raise ValueError(f"metadata keys {clashes} are reserved; `save` fills them in itself.")
    meta = {**metadata, "step": int(step), "data_state": data_state}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"checkpoint metadata must be JSON serialisable: {e}") from e
    args = ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
    )
    return manager.save(int(step), args=args, force=force)


def _key_name(key: Any) -> str:
    """Returns a readable name for one pytree key (dict key, attribute or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten_with_names(tree: Any) -> dict[str, Any]:
    """Flattens a pytree into {"a/b/0/c": leaf}; dataclass fields and dict keys look alike.

    Orbax stores dataclasses and namedtuples as dicts or lists, so naming every kind of key
    the same way lets a saved tree be compared with the live tree it came from.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def compare_trees(expected: Any, found: Any, check_dtypes: bool = False) -> list[str]:
    """Returns human-readable differences between two trees of arrays, sorted by path.

    Leaves may be anything with a `.shape` (arrays, ShapeDtypeStructs, Orbax ArrayMetadata)
    or Python scalars. Reports paths missing from `found`, unexpected paths in `found`, shape
    mismatches and, with `check_dtypes`, dtype mismatches. An empty list means they match.
    """
    want = flatten_with_names(expected)
    got = flatten_with_names(found)
    diffs = []
    for path in sorted(set(want) | set(got)):
        if path not in got:
            diffs.append(f"missing: {path} (expected shape {np.shape(want[path])})")
        elif path not in want:
            diffs.append(f"unexpected: {path} (shape {np.shape(got[path])})")
        else:
            want_shape, got_shape = tuple(np.shape(want[path])), tuple(np.shape(got[path]))
            if want_shape != got_shape:
                diffs.append(f"shape mismatch: {path}: expected {want_shape}, found {got_shape}")
            elif check_dtypes:
                want_dtype = np.dtype(getattr(want[path], "dtype", np.result_type(want[path])))
                got_dtype = np.dtype(getattr(got[path], "dtype", np.result_type(got[path])))
                if want_dtype != got_dtype:
                    diffs.append(
                        f"dtype mismatch: {path}: expected {want_dtype}, found {got_dtype}"
                    )
    return diffs


def _saved_state_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    """Reads the saved state's tree of ArrayMetadata (shapes, dtypes) without its arrays."""
    metadata = manager.item_metadata(step)[STATE_ITEM]
    if metadata is None:
        raise ValueError(f"no '{STATE_ITEM}' item metadata")
    return getattr(metadata, "tree", metadata)


class _ConfigMismatchError(ValueError):
    """The saved tree differs from the model the config builds: a config error, not a bad file."""


def _raise_mismatch(manager: ocp.CheckpointManager, step: int, diffs: list[str]) -> None:
    """Raises a ValueError listing the first differences between a checkpoint and the model."""
    shown = "\n  ".join(diffs[:10])
    more = f"\n  ... and {len(diffs) - 10} more" if len(diffs) > 10 else ""
    raise _ConfigMismatchError(
        f"checkpoint step {step} in {manager.directory} does not match the model built from "
        f"the config ({len(diffs)} differences); first: {diffs[0]}\n  {shown}{more}"
    )


def check_checkpoint_matches(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> None:
    """Raises a ValueError naming the first differing path if step's state != abstract_state."""
    diffs = compare_trees(abstract_state, _saved_state_tree(manager, step))
    if diffs:
        _raise_mismatch(manager, step, diffs)


def _restore_target(abstract_state: Any) -> Any:
    """Returns ShapeDtypeStructs with shardings; Orbax needs them to restore across topologies."""

    def to_target(path: Any, x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            name = "/".join(_key_name(k) for k in path)
            raise ValueError(
                f"restore target leaf {name} has no sharding; build the target with "
                "maskgit_jax.sharding.with_shardings (Orbax cannot restore onto a different "
                "device count without one)."
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(to_target, abstract_state)


# Unreadable steps are moved to `<checkpoints>/<step>.unreadable-<time>`: Orbax does not take
# that name for a step, so the resumed run's saves proceed, and nothing is deleted.
UNREADABLE_SUFFIX = ".unreadable"


def _try_restore(manager: ocp.CheckpointManager, step: int, target: Any, attempts: int) -> Any:
    """Restores `step` (state and meta), retrying transient read errors; raises the last one."""
    args = ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(target), META_ITEM: ocp.args.JsonRestore()}
    )
    for attempt in range(attempts):
        try:
            found = _saved_state_tree(manager, step)
            diffs = compare_trees(target, found)
            if diffs:
                _raise_mismatch(manager, step, diffs)
            return manager.restore(step, args=args)
        except _ConfigMismatchError:
            raise
        except Exception as e:  # Orbax raises ValueError, OSError or a bare Exception.
            if attempt + 1 == attempts:
                raise
            logger.warning("Reading checkpoint step %d failed (%r); retrying.", step, e)
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[epath.Path]:
    """Renames unreadable step directories out of Orbax's way (process 0), keeping them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for step in steps:
        source = epath.Path(manager.directory) / str(step)
        destination = source.parent / f"{step}{UNREADABLE_SUFFIX}-{stamp}"
        if jax.process_index() == 0 and source.exists():
            source.rename(destination)
        moved.append(destination)
    multihost.sync(f"checkpoints_moved_aside_{stamp}_{'_'.join(map(str, steps))}")
    manager.reload()
    return moved


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, attempts: int = 2
) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest readable step as (state, meta, step); None when none restores.

    `abstract_state` holds ShapeDtypeStructs (or arrays) with the target shardings, so a
    checkpoint saved on any device count restores onto the current mesh. Each step's saved
    tree is checked against it first: a mismatch raises a ValueError (a config error, not
    corruption). A step that fails to read `attempts` times on any process is skipped for
    the previous one, on every process alike. Once an older step restores, the unreadable
    newer ones are renamed to `<step>.unreadable-<time>` beside it: never deleted (a read
    error may be transient; rename one back to retry it), and no longer blocking the resumed
    run's saves (Orbax skips saves at steps <= the newest step directory it sees).
    """
    manager.wait_until_finished()
    manager.reload()
    target = _restore_target(abstract_state)
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored, error = _try_restore(manager, step, target, attempts), None
        except _ConfigMismatchError:
            raise
        except Exception as e:  # Any read failure makes this step unusable here.
            restored, error = None, e
        # Every process must restore the same step (a read error may hit one host only).
        if not multihost.all_processes(error is None):
            logger.warning(
                "Checkpoint step %d in %s is unreadable (%r); trying the previous step.",
                step,
                manager.directory,
                error or "failed on another process",
            )
            unreadable.append(step)
            continue
        if unreadable:
            moved = _move_aside(manager, unreadable)
            logger.warning(
                "Restored step %d. The unreadable newer steps %s were kept, renamed to %s, so "
                "that this run's saves proceed; rename one back to retry it.",
                step,
                unreadable,
                [str(path) for path in moved],
            )
        return restored[STATE_ITEM], dict(restored[META_ITEM]), step
    if unreadable:
        logger.error(
            "No checkpoint in %s restores (unreadable steps %s). They are kept as they are; "
            "this run cannot save at steps <= %d until they are moved away.",
            manager.directory,
            unreadable,
            max(unreadable),
        )
    return None


class PreemptionHandler:
    """Turns a preemption notice (SIGTERM) into a flag the training loop polls once a step.

    Single process: a Python signal handler sets the flag and `should_stop(step)` returns it.
    Multi-process with JAX's preemption service (enabled by default in `jax.distributed`):
    no Python handler is installed, since it would replace the service's own SIGTERM handler;
    `should_stop` returns `multihost_utils.reached_preemption_sync_point(step)`, which is True
    on every host at the same step. Multi-process without the service: hosts OR their local
    flags with a `process_allgather` in each `should_stop` call. When it returns True, the loop
    should save (`force=True`), `wait_until_finished()` and exit.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        self._signals = tuple(signals)
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self._use_sync_point = False

    def install(self) -> "PreemptionHandler":
        """Starts listening; must be called from the main thread."""
        if jax.process_count() > 1 and jax.config.jax_enable_preemption_service:
            self._use_sync_point = True
            logger.info("Preemption: using JAX's preemption sync point across processes.")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restores the signal handlers that were in place before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set the flag: logging or saving inside a signal handler can deadlock.
        del signum, frame
        self._flag.set()

    @property
    def preempted(self) -> bool:
        """Whether this process received a preemption signal."""
        return self._flag.is_set()

    def should_stop(self, step: int) -> bool:
        """Returns True when the loop should save at `step` and exit (same step on all hosts)."""
        if self._use_sync_point:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.asarray(self.preempted))
            return bool(np.any(flags))
        return self.preempted
