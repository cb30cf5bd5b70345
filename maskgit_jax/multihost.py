"""Moving data between processes of a multi-host job, and this process's own devices.

Training arrays span every process's devices, so `np.asarray` of them fails outside process 0's
shards. These helpers bring them to each host (`host_copy`, `gather_rows`), let processes
agree (`all_processes`), and lay out host-side work on the local devices (`local_mesh`,
`local_context`). Every function that gathers is a collective: call it on every process.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh


def host_copy(tree: Any) -> Any:
    """Numpy copies of a pytree's arrays, gathering arrays sharded over several processes.

    Replicated arrays are read from a local shard (no communication); arrays split over
    other processes' devices are all-gathered, so every process gets the whole value.
    """

    def leaf(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows (in process order); row counts may differ.

    Shares of uneven size (a sample count the processes do not divide) are padded for the
    gather and trimmed after.
    """
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    counts = np.asarray(multihost_utils.process_allgather(np.array([len(x)]), tiled=True))
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([rows[:n] for rows, n in zip(everything, counts, strict=True)])


def all_processes(flag: bool) -> bool:
    """True when `flag` is True on every process (so all of them take the same branch)."""
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(bool(flag)))
    return bool(np.all(flags))


def sync(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def local_mesh() -> Mesh:
    """A 1-D ("data",) mesh over this process's devices."""
    return Mesh(np.array(jax.local_devices()), ("data",), axis_types=(AxisType.Auto,))


@contextlib.contextmanager
def local_context(mesh: Mesh | None = None) -> Iterator[Mesh]:
    """`mesh` (default: `local_mesh()`) as the current mesh, without logical-axis rules.

    The training loop calls its hooks under the global training mesh and its rules; host-side
    work (sample grids, metrics) runs on the process's own devices instead: the models'
    logical constraints are no-ops without rules, so nothing is laid out across processes.
    """
    mesh = mesh if mesh is not None else local_mesh()
    with jax.set_mesh(mesh), nn.logical_axis_rules(()):
        yield mesh
