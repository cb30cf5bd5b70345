"""Device mesh, logical-axis rules and shardings for parameters, optimizer state and batches.

The mesh has three axes, ("data", "fsdp", "tensor"). Transformer parameters carry t5x-style
logical axis names (`nn.with_logical_partitioning`) mapped to mesh axes by the config's rules;
unannotated leaves (the tokenizer's convolutions) fall back to FSDP: their largest divisible
dimension is sharded over "fsdp". Batches are split over ("data", "fsdp").

All sharding trees returned here mirror their input tree exactly, `nn.Partitioned` boxes
included (a box's value is replaced by its `NamedSharding`), so they can be passed as jit
`in_shardings`/`out_shardings` and mapped leaf by leaf against the abstract state.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axis names, outermost first.
MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch dimension.
BATCH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def default_mesh_config() -> ml_collections.ConfigDict:
    """Returns the mesh settings: pure data parallelism over all devices of one slice."""
    c = ml_collections.ConfigDict()
    # ICI (within-slice) sizes of the axes ("data", "fsdp", "tensor"); exactly one entry may be
    # -1 and is inferred from the device count.
    c.shape = (-1, 1, 1)
    # DCN (across-slice) sizes of the same axes; any entry > 1 builds a multi-slice hybrid mesh.
    c.dcn_shape = (1, 1, 1)
    # Logical axis name -> mesh axis, tuple of mesh axes, or None (replicated); t5x vocabulary.
    c.logical_axis_rules = (
        ("batch", BATCH_AXES),
        ("length", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", None),
        ("vocab", "tensor"),
        ("conv_height", None),
        ("conv_width", None),
        ("conv_in", None),
        ("conv_out", None),
    )
    return c


def _resolve_shape(shape: Sequence[int], num_devices: int, what: str) -> tuple[int, ...]:
    """Replaces a single -1 in `shape` so that the product equals `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"{what} {shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}."
        )
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what} {shape} may only hold positive sizes and at most one -1.")
    if shape.count(-1) > 1:
        raise ValueError(f"{what} {shape} has {shape.count(-1)} entries of -1; at most one.")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"{what} {shape} cannot be inferred for {num_devices} devices: {num_devices} is "
                f"not divisible by {known}, the product of the other axes."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    elif known != num_devices:
        raise ValueError(f"{what} {shape} needs {known} devices, but {num_devices} are available.")
    return shape


def create_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None
) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh with Auto axis types from the mesh config.

    Auto matters: `jax.make_mesh` defaults to Explicit axes in jax 0.10, under which flax's
    Dense layers fail with sharding-type errors.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_shape = tuple(int(s) for s in mesh_config.dcn_shape)
    if len(dcn_shape) != len(MESH_AXES) or any(s < 1 for s in dcn_shape):
        raise ValueError(
            f"dcn_shape {dcn_shape} must hold {len(MESH_AXES)} positive sizes, one per axis "
            f"{MESH_AXES}."
        )
    num_slices = int(np.prod(dcn_shape))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if num_slices == 1:
        shape = _resolve_shape(mesh_config.shape, len(devices), "mesh shape")
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if len(devices) % num_slices:
        raise ValueError(
            f"{len(devices)} devices cannot form {num_slices} slices (dcn_shape {dcn_shape})."
        )
    ici_shape = _resolve_shape(mesh_config.shape, len(devices) // num_slices, "mesh shape")
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
    """Returns how many ways the batch is split: the product of the "data" and "fsdp" sizes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of a batch: leading dimension over ("data", "fsdp"), rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raises a ValueError when `global_batch` cannot be split evenly over the batch axes."""
    size = data_parallel_size(mesh)
    if global_batch % size:
        factors = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {size} data-parallel devices "
            f"({factors})."
        )


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _unbox_leaf(x: Any) -> Any:
    return x.value if _is_box(x) else x


def strip_boxes(tree: Any) -> Any:
    """Replaces flax Partitioned boxes by their values (arrays, shapes or shardings).

    Unlike `nn.unbox` it applies no sharding constraint, so it is safe eagerly inside a mesh
    context and on trees of shardings.
    """
    return jax.tree.map(_unbox_leaf, tree, is_leaf=_is_box)


def fsdp_leaf_spec(shape: Sequence[int], axis_size: int, axis: str, min_size: int) -> PartitionSpec:
    """Returns a spec sharding the largest dimension divisible by `axis_size` over `axis`.

    Leaves smaller than `min_size` elements, or with no divisible dimension, are replicated.
    Ties between equal dimensions go to the later one (usually the output features).
    """
    if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    best = None
    for i, dim in enumerate(shape):
        if dim % axis_size == 0 and (best is None or dim >= shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*([None] * best + [axis]))


def fsdp_sharding(abstract_tree: Any, mesh: Mesh, axis: str = "fsdp", min_size: int = 2**18) -> Any:
    """Returns FSDP shardings for every leaf (boxes included) of arrays or ShapeDtypeStructs."""
    axis_size = mesh.shape[axis]

    def leaf_sharding(x: Any) -> Any:
        spec = fsdp_leaf_spec(np.shape(_unbox_leaf(x)), axis_size, axis, min_size)
        sharding = NamedSharding(mesh, spec)
        return x.replace_boxed(sharding) if _is_box(x) else sharding

    return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=_is_box)


def _logical_sharding(box: nn.Partitioned, mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Maps the logical names of one `nn.LogicallyPartitioned` box to a NamedSharding.

    A dimension that its mesh axes do not divide evenly (the vocabulary, codebook + classes +
    1, is odd) is replicated instead of failing at initialisation.
    """
    spec = box.get_partition_spec()
    if isinstance(box, nn.LogicallyPartitioned):
        spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    shape = np.shape(box.value)
    divisible = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = int(np.prod([mesh.shape[name] for name in names])) if names else 1
        divisible.append(axes if size % ways == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*divisible))


def logical_to_mesh_sharding(abstract_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """Returns shardings from the logical names of boxed leaves; unboxed leaves are replicated.

    Equivalent to flax's `nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), ...)`, but
    the result keeps the boxes so that it has the same tree structure as `abstract_tree`.
    """

    def leaf_sharding(x: Any) -> Any:
        if _is_box(x):
            return x.replace_boxed(_logical_sharding(x, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=_is_box)


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: LogicalRules,
    fsdp_axis: str = "fsdp",
    min_size: int = 2**18,
) -> Any:
    """Returns shardings for a train state: logical names where boxed, FSDP fallback elsewhere.

    Works on any pytree (flax.struct dataclasses, optax states, dicts) of arrays or
    ShapeDtypeStructs; optax moments mirror the parameters' boxes and so share their layout.
    """
    axis_size = mesh.shape[fsdp_axis]

    def leaf_sharding(x: Any) -> Any:
        if _is_box(x):
            return x.replace_boxed(_logical_sharding(x, mesh, rules))
        spec = fsdp_leaf_spec(np.shape(x), axis_size, fsdp_axis, min_size)
        return NamedSharding(mesh, spec)

    return jax.tree.map(leaf_sharding, abstract_state, is_leaf=_is_box)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Returns ShapeDtypeStructs carrying `shardings`, e.g. as restore or AOT-compile targets.

    `shardings` must have the structure of `abstract_tree` (as the functions above return).
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
        abstract_tree,
        shardings,
    )
