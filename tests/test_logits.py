"""Codebook logits in chunked transformer calls are the logits of one call over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskgit_jax.decoding.logits import CodebookLogits, rows_per_transformer_call
from maskgit_jax.models import MaskedTransformer

CODEBOOK, CLASSES, LENGTH = 16, 4, 17
MASK_ID = CODEBOOK + CLASSES


def _transformer():
    return MaskedTransformer(
        vocab_size=MASK_ID + 1,
        max_length=LENGTH,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
    )


def _variables_and_ids(batch):
    ids = jax.random.randint(jax.random.PRNGKey(0), (batch, LENGTH), 0, CODEBOOK)
    ids = ids.at[:, 0].set(CODEBOOK + jnp.arange(batch) % CLASSES)
    variables = nn.unbox(_transformer().init(jax.random.PRNGKey(1), ids))
    return variables, ids


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("rows_per_device", [1, 2, 3])
def test_chunked_calls_give_the_one_call_logits(guided, rows_per_device):
    variables, ids = _variables_and_ids(12)
    params = (variables, jnp.float32(0.5))
    whole = CodebookLogits(_transformer(), CODEBOOK, MASK_ID, guided=guided)
    chunked = CodebookLogits(
        _transformer(), CODEBOOK, MASK_ID, guided=guided, rows_per_device=rows_per_device
    )
    expected = jax.jit(whole)(params, ids)
    got = jax.jit(chunked)(params, ids)
    assert got.shape == (12, LENGTH, CODEBOOK)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_chunked_calls_keep_a_sharded_batch_on_its_devices():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = Mesh(np.asarray(devices), ("batch",))
    variables, ids = _variables_and_ids(16)
    sharded = jax.device_put(ids, NamedSharding(mesh, PartitionSpec("batch")))
    params = (variables, jnp.float32(0.0))
    chunked = CodebookLogits(_transformer(), CODEBOOK, MASK_ID, rows_per_device=2, num_devices=4)
    got = jax.jit(chunked)(params, sharded)
    expected = jax.jit(CodebookLogits(_transformer(), CODEBOOK, MASK_ID))(params, ids)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.sharding.is_equivalent_to(sharded.sharding, 3)


def test_rows_per_call_fit_the_cpu_budget_and_accelerators_take_the_batch():
    assert rows_per_transformer_call(257, 3072, "cpu") == 8  # imagenet256
    assert rows_per_transformer_call(65, 512, "cpu") > 64  # the digits default: one call
    assert rows_per_transformer_call(10**6, 3072, "cpu") == 1
    assert rows_per_transformer_call(257, 3072, "gpu") is None
    assert rows_per_transformer_call(257, 3072, "tpu") is None
