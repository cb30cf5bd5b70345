"""Tests of the mesh, logical and FSDP shardings on 8 fake CPU devices."""

import os

# Must happen before jax initialises its backends; tests/conftest.py is shared, so set it here.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AxisType, PartitionSpec  # noqa: E402

from maskgit_jax import sharding  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS was set before jax started)"
)


def _mesh(shape):
    config = sharding.default_mesh_config()
    config.shape = shape
    return sharding.create_mesh(config)


def test_default_config_fields():
    config = sharding.default_mesh_config()
    assert tuple(config.shape) == (-1, 1, 1)
    assert tuple(config.dcn_shape) == (1, 1, 1)
    rules = dict(config.logical_axis_rules)
    assert rules["batch"] == ("data", "fsdp")
    assert rules["embed"] == "fsdp"
    assert rules["mlp"] == rules["heads"] == rules["vocab"] == "tensor"
    assert rules["length"] is None and rules["kv"] is None


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 1, -1), (1, 1, 8)),
        ((2, 4, 1), (2, 4, 1)),
    ],
)
def test_mesh_infers_minus_one(shape, expected):
    mesh = _mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_mesh_on_given_devices():
    mesh = sharding.create_mesh(sharding.default_mesh_config(), devices=jax.devices()[:1])
    assert tuple(mesh.shape.values()) == (1, 1, 1)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 2, 1), "needs 4 devices, but 8 are available"),
        ((-1, -1, 1), "at most one"),
        ((-1, 3, 1), "8 is not divisible by 3"),
        ((2, 0, 4), "positive"),
        ((8, 1), "3 entries"),
    ],
)
def test_mesh_bad_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        _mesh(shape)


def test_hybrid_mesh_validates_slices():
    config = sharding.default_mesh_config()
    config.dcn_shape = (3, 1, 1)
    with pytest.raises(ValueError, match="8 devices cannot form 3 slices"):
        sharding.create_mesh(config)


class _Block(nn.Module):
    """A Dense layer with logical names followed by an unannotated convolution."""

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(64, kernel_init=init, name="dense")(x)
        return nn.Conv(128, (3, 3), name="conv")(x[:, None, None, :]).sum()


def _abstract_state():
    model, tx = _Block(), optax.adamw(1e-3)

    def init(key):
        params = model.init(key, jnp.ones((8, 32)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init, jax.eval_shape(init, jax.random.key(0))


def test_logical_sharding_on_2x2x2_mesh():
    mesh = _mesh((2, 2, 2))
    rules = sharding.default_mesh_config().logical_axis_rules
    init, abstract = _abstract_state()
    shardings = sharding.logical_to_mesh_sharding(abstract, mesh, rules)
    kernel = shardings["params"]["dense"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned)
    assert kernel.value.spec == PartitionSpec("fsdp", "tensor")
    # Unboxed leaves are replicated by the pure logical mapping.
    assert shardings["params"]["conv"]["kernel"].spec == PartitionSpec()

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    dense = state["params"]["dense"]["kernel"].value
    assert dense.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert dense.addressable_shards[0].data.shape == (16, 32)
    # Adam moments mirror the boxes, so they take the parameters' layout.
    mu = state["opt_state"][0].mu["dense"]["kernel"].value
    assert mu.sharding.spec == PartitionSpec("fsdp", "tensor")


def test_state_shardings_combines_logical_and_fsdp():
    mesh = _mesh((2, 2, 2))
    rules = sharding.default_mesh_config().logical_axis_rules
    init, abstract = _abstract_state()
    shardings = sharding.state_shardings(abstract, mesh, rules, min_size=1000)
    assert shardings["params"]["dense"]["kernel"].value.spec == PartitionSpec("fsdp", "tensor")
    # Conv kernel (3, 3, 64, 128): 128 is the largest dimension divisible by fsdp=2.
    assert shardings["params"]["conv"]["kernel"].spec == PartitionSpec(None, None, None, "fsdp")
    assert shardings["params"]["conv"]["bias"].spec == PartitionSpec()  # below min_size
    assert shardings["step"].spec == PartitionSpec()

    targets = sharding.with_shardings(abstract, shardings)
    conv = targets["params"]["conv"]["kernel"]
    assert conv.shape == (3, 3, 64, 128) and conv.sharding.spec[3] == "fsdp"
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    assert state["params"]["conv"]["kernel"].addressable_shards[0].data.shape == (3, 3, 64, 64)


@pytest.mark.parametrize(
    "shape, min_size, expected",
    [
        ((6, 10, 4), 1, PartitionSpec(None, None, "fsdp")),  # only 4 divides by fsdp=4
        ((5, 12, 8), 1, PartitionSpec(None, "fsdp")),  # 12 beats 8
        ((16, 16), 1, PartitionSpec(None, "fsdp")),  # ties go to the later dimension
        ((8, 3), 1, PartitionSpec("fsdp")),
        ((3, 5), 1, PartitionSpec()),  # nothing divisible
        ((1024, 1024), 2**21, PartitionSpec()),  # below min_size
        ((), 0, PartitionSpec()),
    ],
)
def test_fsdp_picks_largest_divisible_dim(shape, min_size, expected):
    mesh = _mesh((1, 4, 2))
    tree = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    assert sharding.fsdp_sharding(tree, mesh, min_size=min_size)["w"].spec == expected


def test_fsdp_on_concrete_arrays_and_single_axis():
    mesh = _mesh((8, 1, 1))
    tree = {"w": np.zeros((1024, 512), np.float32)}
    # fsdp has size 1: everything is replicated.
    assert sharding.fsdp_sharding(tree, mesh, min_size=1)["w"].spec == PartitionSpec()
    assert sharding.fsdp_sharding(tree, mesh, axis="data", min_size=1)["w"].spec == PartitionSpec(
        "data"
    )


def test_batch_sharding_and_divisibility():
    mesh = _mesh((4, 2, 1))
    assert sharding.data_parallel_size(mesh) == 8
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    sharding.check_batch_divisible(16, mesh)
    with pytest.raises(ValueError) as err:
        sharding.check_batch_divisible(12, mesh)
    assert str(err.value) == (
        "global batch 12 is not divisible by the 8 data-parallel devices (data=4 x fsdp=2)."
    )
    batch = jax.device_put(np.arange(16 * 3).reshape(16, 3), sharding.batch_sharding(mesh))
    assert batch.addressable_shards[0].data.shape == (2, 3)
