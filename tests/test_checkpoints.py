"""Tests of Orbax checkpointing: round trip, retention, resharding, corruption, preemption."""

import os

# Must happen before jax initialises its backends; tests/conftest.py is shared, so set it here.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import struct  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from maskgit_jax import sharding  # noqa: E402
from maskgit_jax.checkpoints import manager as checkpoints

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS was set before jax started)"
)

REPO = Path(__file__).resolve().parents[1]
RULES = sharding.default_mesh_config().logical_axis_rules


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


class _Model(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        x = nn.Dense(self.width, kernel_init=init, name="dense")(x)
        return nn.Conv(16, (3, 3), name="conv")(x[:, None, None, :])


@functools.cache
def _abstract_state(width=64):
    model, tx = _Model(width), optax.adam(1e-3)

    def init(key):
        params = model.init(key, jnp.ones((2, 32)))["params"]
        return _State(jnp.zeros((), jnp.int32), params, tx.init(params))

    return jax.eval_shape(init, jax.random.key(0))


def _mesh(shape, devices=None):
    config = sharding.default_mesh_config()
    config.shape = shape
    return sharding.create_mesh(config, devices)


def _make_state(mesh, seed=0, width=64):
    """Returns (state, restore target) sharded on `mesh`; values depend on `seed`.

    Values are random numpy arrays placed with `device_put` (no jit compile, to keep tests fast).
    """
    abstract = _abstract_state(width)
    shardings = sharding.state_shardings(abstract, mesh, RULES, min_size=1000)
    target = sharding.with_shardings(abstract, shardings)
    rng = np.random.default_rng(seed)

    def value(t):
        return jax.device_put(rng.standard_normal(t.shape).astype(t.dtype), t.sharding)

    return jax.tree.map(value, target), target


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _manager(tmp_path, **kwargs):
    kwargs = {"save_every_steps": 1, "max_to_keep": 3, **kwargs}
    return checkpoints.create_checkpoint_manager(tmp_path / "ckpt", **kwargs)


def test_round_trip_async_and_keep_last(tmp_path):
    mesh = _mesh((2, 2, 2))
    manager = _manager(tmp_path, max_to_keep=2, save_every_steps=2)
    states = {}
    for step in range(1, 7):
        states[step], target = _make_state(mesh, seed=step)
        saved = checkpoints.save(
            manager, step, states[step], {"config": '{"a": 1}'}, data_state={"position": step}
        )
        # Step 1 is the initial save; afterwards only multiples of save_every_steps.
        assert saved == (step == 1 or step % 2 == 0)
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 6]

    state, meta, step = checkpoints.restore_latest(manager, target)
    assert step == 6
    assert meta == {"config": '{"a": 1}', "step": 6, "data_state": {"position": 6}}
    _assert_bitwise_equal(state, states[6])
    kernel = state.params["dense"]["kernel"]
    assert isinstance(kernel, nn.LogicallyPartitioned)
    assert kernel.value.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert state.params["conv"]["kernel"].sharding.spec == PartitionSpec(None, None, "fsdp")

    # force saves off the interval.
    assert checkpoints.save(manager, 7, states[6], {}, force=True)
    manager.wait_until_finished()
    assert manager.latest_step() == 7
    manager.close()


def test_restore_onto_one_device(tmp_path):
    mesh8 = _mesh((2, 2, 2))
    state, _ = _make_state(mesh8, seed=3)
    manager = _manager(tmp_path)
    checkpoints.save(manager, 3, state, {})
    manager.wait_until_finished()

    mesh1 = _mesh((1, 1, 1), devices=jax.devices()[:1])
    _, target1 = _make_state(mesh1)
    restored, _, step = checkpoints.restore_latest(manager, target1)
    assert step == 3
    _assert_bitwise_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    manager.close()


def test_restore_8_devices_in_a_1_device_process(tmp_path):
    mesh8 = _mesh((2, 2, 2))
    state, _ = _make_state(mesh8, seed=5)
    manager = _manager(tmp_path)
    checkpoints.save(manager, 5, state, {"note": "8 devices"})
    manager.close()
    np.save(tmp_path / "expected.npy", np.asarray(state.params["dense"]["kernel"].value))

    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from tests.test_checkpoints import _make_state, _mesh
        from maskgit_jax.checkpoints import manager as checkpoints
        assert jax.device_count() == 1
        _, target = _make_state(_mesh((1, 1, 1)))
        manager = checkpoints.create_checkpoint_manager(
            {str(tmp_path / "ckpt")!r}, save_every_steps=1, max_to_keep=3)
        state, meta, step = checkpoints.restore_latest(manager, target)
        expected = np.load({str(tmp_path / "expected.npy")!r})
        np.testing.assert_array_equal(np.asarray(state.params["dense"]["kernel"].value), expected)
        print("OK", step, meta["note"])
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 5 8 devices" in result.stdout


def _delete_manifest(step_dir: Path) -> None:
    (step_dir / "state" / "manifest.ocdbt").unlink()


def _truncate_data(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[:10])


def _delete_tree_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


# A missing manifest makes tensorstore report "Event loop is closed" from a finaliser (noise).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_delete_manifest, _truncate_data, _delete_tree_metadata])
def test_corrupt_latest_falls_back(tmp_path, caplog, corrupt):
    mesh = _mesh((2, 2, 2))
    manager = _manager(tmp_path)
    states = {}
    for step in (1, 2):
        states[step], target = _make_state(mesh, seed=step)
        checkpoints.save(manager, step, states[step], {}, data_state={"position": step})
    manager.wait_until_finished()
    corrupt(tmp_path / "ckpt" / "2")

    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        state, meta, step = checkpoints.restore_latest(manager, target)
    assert step == 1 and meta["data_state"] == {"position": 1}
    _assert_bitwise_equal(state, states[1])
    assert any("step 2" in r.getMessage() for r in caplog.records)
    # The unreadable step is kept, moved aside, so the resumed run can save step 2 again.
    assert manager.all_steps() == [1]
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if "unreadable" in p.name)
    assert len(kept) == 1 and kept[0].startswith("2.unreadable-")
    assert (tmp_path / "ckpt" / kept[0] / "state").is_dir()
    assert checkpoints.save(manager, 2, states[2], {})
    manager.wait_until_finished()
    assert checkpoints.restore_latest(manager, target)[2] == 2
    # The moved-aside copy survives the next save and restore too.
    assert (tmp_path / "ckpt" / kept[0] / "state").is_dir()
    manager.close()


def test_failed_array_read_falls_back_and_keeps_the_step(tmp_path, monkeypatch, caplog):
    # Metadata reads fine but reading the arrays fails (Orbax raises a bare Exception).
    mesh = _mesh((2, 2, 2))
    manager = _manager(tmp_path)
    states = {}
    for step in (1, 2):
        states[step], target = _make_state(mesh, seed=step)
        checkpoints.save(manager, step, states[step], {})
    manager.wait_until_finished()
    real_restore = manager.restore
    attempts = []

    def failing_restore(step, *args, **kwargs):
        if step == 2:
            attempts.append(step)
            raise Exception("Encountered error while reading array index 0")  # noqa: TRY002
        return real_restore(step, *args, **kwargs)

    monkeypatch.setattr(manager, "restore", failing_restore)
    monkeypatch.setattr(checkpoints.time, "sleep", lambda seconds: None)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        state, _, step = checkpoints.restore_latest(manager, target, attempts=3)
    assert step == 1 and attempts == [2, 2, 2]
    _assert_bitwise_equal(state, states[1])
    assert any(
        "step 2" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    # Never deleted: the step's files are all still there, under the moved-aside name.
    [kept] = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("2.unreadable-")]
    monkeypatch.undo()
    kept.rename(tmp_path / "ckpt" / "2")
    manager.reload()
    restored, _, step = checkpoints.restore_latest(manager, target)
    assert step == 2
    _assert_bitwise_equal(restored, states[2])
    manager.close()


def test_transient_read_error_is_retried(tmp_path, monkeypatch):
    mesh = _mesh((2, 2, 2))
    manager = _manager(tmp_path)
    state, target = _make_state(mesh, seed=3)
    checkpoints.save(manager, 3, state, {})
    manager.wait_until_finished()
    real_restore = manager.restore
    failures = [Exception("transient gs:// read error")]

    def flaky_restore(step, *args, **kwargs):
        if failures:
            raise failures.pop()
        return real_restore(step, *args, **kwargs)

    monkeypatch.setattr(manager, "restore", flaky_restore)
    monkeypatch.setattr(checkpoints.time, "sleep", lambda seconds: None)
    restored, _, step = checkpoints.restore_latest(manager, target)
    assert step == 3
    _assert_bitwise_equal(restored, state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["3"]
    manager.close()


def test_no_checkpoint_returns_none(tmp_path):
    _, target = _make_state(_mesh((8, 1, 1)))
    manager = _manager(tmp_path)
    assert checkpoints.restore_latest(manager, target) is None


def test_mismatched_tree_fails_before_restore(tmp_path, monkeypatch):
    mesh = _mesh((2, 2, 2))
    state, _ = _make_state(mesh, width=64)
    manager = _manager(tmp_path)
    checkpoints.save(manager, 1, state, {})
    manager.wait_until_finished()

    def no_restore(*args, **kwargs):
        raise AssertionError("restore must not be reached")

    monkeypatch.setattr(manager, "restore", no_restore)
    _, other = _make_state(mesh, width=128)
    with pytest.raises(ValueError, match=r"first: shape mismatch: opt_state/0/mu/conv/kernel: "):
        checkpoints.restore_latest(manager, other)
    with pytest.raises(ValueError, match="params/dense/kernel/value: expected"):
        checkpoints.check_checkpoint_matches(manager, 1, other)


def test_target_without_sharding_is_rejected(tmp_path):
    manager = _manager(tmp_path)
    with pytest.raises(ValueError, match="has no sharding"):
        checkpoints.restore_latest(manager, _abstract_state())


def test_compare_trees():
    expected = {
        "a": {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": np.zeros(4)},
        "c": jax.ShapeDtypeStruct((2,), jnp.int32),
        "layers": [np.zeros(1), np.zeros(2)],
    }
    found = {
        "a": {"w": np.zeros((4, 3)), "b": np.zeros(4, np.float16)},
        "d": np.zeros(5),
        "layers": [np.zeros(1), np.zeros(2)],
    }
    assert checkpoints.compare_trees(expected, found) == [
        "shape mismatch: a/w: expected (3, 4), found (4, 3)",
        "missing: c (expected shape (2,))",
        "unexpected: d (shape (5,))",
    ]
    assert "dtype mismatch: a/b: expected float64, found float16" in checkpoints.compare_trees(
        expected, found, check_dtypes=True
    )
    assert checkpoints.compare_trees(expected, expected) == []


def test_reserved_and_non_json_metadata(tmp_path):
    manager = _manager(tmp_path)
    state = {"x": jnp.ones(3)}
    with pytest.raises(ValueError, match="reserved"):
        checkpoints.save(manager, 1, state, {"step": 1})
    with pytest.raises(ValueError, match="JSON"):
        checkpoints.save(manager, 1, state, {"obj": object()})


def test_sigterm_sets_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with checkpoints.PreemptionHandler() as handler:
        assert not handler.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.preempted
        assert handler.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_sharded_array_tree_is_a_valid_target(tmp_path):
    mesh = _mesh((4, 2, 1))
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, PartitionSpec("data")))
    manager = _manager(tmp_path)
    checkpoints.save(manager, 1, {"x": x}, {})
    restored, _, _ = checkpoints.restore_latest(manager, {"x": x})
    _assert_bitwise_equal(restored, {"x": x})
    assert restored["x"].sharding == x.sharding
