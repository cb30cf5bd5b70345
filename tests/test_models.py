import json
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo
from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)

from maskgit_jax import config_lib
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.models import MaskedTransformer, VQGANTokenizer, attention, build_transformer
from tests import helpers


def _fixture_config(fixtures_dir):
    return helpers.config_from_fixture(
        json.loads((fixtures_dir / "official_small/config.json").read_text())
    )


def test_released_small_model_reproduces_authors_outputs(fixtures_dir):
    config = _fixture_config(fixtures_dir)
    io = np.load(fixtures_dir / "official_small/io.npz")
    tokenizer_vars = official_checkpoint.load_official_tokenizer(
        fixtures_dir / "official_small/tokenizer_checkpoint", config
    )
    transformer_vars = official_checkpoint.load_official_transformer(
        fixtures_dir / "official_small/transformer_checkpoint", config
    )
    tokenizer = helpers.build_tokenizer(config)
    ids = tokenizer.apply(tokenizer_vars, io["images"], method="encode")
    np.testing.assert_array_equal(np.asarray(ids), io["ids"])
    recon = tokenizer.apply(tokenizer_vars, io["ids"], method="decode")
    np.testing.assert_allclose(np.asarray(recon), io["recon"], atol=1e-5, rtol=1e-5)

    transformer = build_transformer(config)
    # The authors write the mask as -1; ours is the last vocabulary row, the same embedding.
    seq = np.where(io["seq"] < 0, config_lib.mask_token_id(config), io["seq"])
    logits = transformer.apply(transformer_vars, seq)
    np.testing.assert_allclose(np.asarray(logits), io["logits"], atol=1e-5, rtol=1e-5)
    logits_released_mask = transformer.apply(transformer_vars, io["seq"])
    np.testing.assert_allclose(np.asarray(logits_released_mask), io["logits"], atol=1e-5)


def _listing(path):
    entries = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        entries[name] = (tuple(int(d) for d in re.findall(r"\d+", shape)), dtype)
    return entries


def _flat_shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(k.key) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in flat
    }


@pytest.mark.parametrize("resolution", [256, 512])
def test_every_released_parameter_name_and_shape(reference_dir, resolution):
    config = helpers.load_config_file(f"configs/imagenet{resolution}.py")
    tokenizer = _flat_shapes(official_checkpoint.abstract_tokenizer_params(config))
    transformer = _flat_shapes(official_checkpoint.abstract_transformer_params(config))
    assert tokenizer == _listing(reference_dir / f"official_tokenizer_{resolution}.txt")
    assert transformer == _listing(reference_dir / f"official_transformer_{resolution}.txt")
    count = lambda shapes: sum(int(np.prod(s)) for s, _ in shapes.values())  # noqa: E731
    assert count(tokenizer) == 54_515_587
    assert count(transformer) == {256: 172_457_193, 512: 173_047_017}[resolution]


def test_tokenizer_shapes_losses_and_statistics():
    model = VQGANTokenizer(
        filters=32, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=8, codebook_size=16
    )
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    ids = model.apply(variables, images, method="encode")
    assert ids.shape == (2, 8, 8) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < 16
    decoded = model.apply(variables, ids, method="decode")
    assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == jnp.float32
    recon, result = model.apply(variables, images)
    assert recon.shape == images.shape
    for name in ("commitment_loss", "codebook_loss", "entropy_loss", "quantizer_loss"):
        assert result[name].shape == () and np.isfinite(float(result[name])), name
    np.testing.assert_allclose(float(result["code_counts"].sum()), 2 * 8 * 8)
    assert 0 < float(result["codebook_usage"]) <= 1
    assert 1 <= float(result["perplexity"]) <= 16
    # Straight-through: the decoder input equals the looked-up codes in the forward pass.
    np.testing.assert_allclose(np.asarray(recon), np.asarray(decoded), atol=1e-5)


def test_tokenizer_gradients_reach_encoder_through_straight_through():
    model = VQGANTokenizer(
        filters=32, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=8, codebook_size=16
    )
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), images)

    def loss(params):
        recon, result = model.apply({"params": params}, images)
        return jnp.mean((recon - images) ** 2) + result["quantizer_loss"]

    grads = jax.grad(loss)(variables["params"])
    encoder_norm = optax_global_norm(grads["encoder"])
    codebook_norm = optax_global_norm(grads["quantizer"])
    assert encoder_norm > 0 and codebook_norm > 0


def optax_global_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


def _tiny_transformer(dtype=jnp.float32):
    return MaskedTransformer(
        vocab_size=16 + 4 + 1,
        max_length=17,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        dtype=dtype,
    )


def test_transformer_shapes_logical_names_and_tied_head():
    model = _tiny_transformer()
    ids = jax.random.randint(jax.random.PRNGKey(0), (3, 17), 0, 21)
    variables = model.init(jax.random.PRNGKey(1), ids)
    allowed = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab"}
    boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    assert all(set(b.names) <= allowed and len(b.names) == b.value.ndim for b in boxes)
    logits = model.apply(variables, ids)
    assert logits.shape == (3, 17, 21) and logits.dtype == jnp.float32
    codes_only = model.apply(variables, ids, num_logits=16)
    np.testing.assert_allclose(np.asarray(codes_only), np.asarray(logits[..., :16]), atol=1e-5)
    # Tied head: changing one embedding row changes that column of the logits.
    params = nn.unbox(variables)["params"]
    table = params["Embed_0"]["word_embeddings"]["embedding"]
    bumped = jax.tree.map(lambda x: x, params)
    bumped["Embed_0"]["word_embeddings"]["embedding"] = table.at[20].add(
        jax.random.normal(jax.random.PRNGKey(3), table.shape[1:])
    )
    changed = model.apply({"params": bumped}, ids[:, :1].repeat(17, 1) * 0 + 3)
    base = model.apply({"params": params}, ids[:, :1].repeat(17, 1) * 0 + 3)
    diff = np.abs(np.asarray(changed - base)).max(axis=(0, 1))
    assert diff[20] > 1e-3 and diff[:20].max() < 1e-5


def test_transformer_dropout_only_in_training():
    model = _tiny_transformer()
    ids = jnp.zeros((2, 17), jnp.int32)
    variables = model.init(jax.random.PRNGKey(1), ids)
    a = model.apply(variables, ids)
    b = model.apply(variables, ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = model.apply(variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(c - a)).max() > 1e-4


def test_bf16_compute_keeps_fp32_params_and_close_logits():
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 17), 0, 21)
    variables = _tiny_transformer().init(jax.random.PRNGKey(1), ids)
    fp32 = _tiny_transformer().apply(variables, ids)
    bf16 = _tiny_transformer(jnp.bfloat16).apply(variables, ids)
    assert bf16.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(fp32), atol=0.1)
    agreement = np.mean(np.argmax(bf16, -1) == np.argmax(fp32, -1))
    assert agreement > 0.9


@pytest.mark.parametrize("block_bytes", [4 * 17 * 17, 2 * 4 * 17 * 17, 4 * 4 * 17 * 17])
def test_attention_in_byte_sized_blocks_is_the_same_function(block_bytes):
    # 1 (example, head) pair, 2 pairs (2 heads), 4 pairs (4 heads x 1 example) per block.
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 17), 0, 21)
    variables = _tiny_transformer().init(jax.random.PRNGKey(1), ids)
    whole = _tiny_transformer().apply(variables, ids)
    blocked_model = _tiny_transformer().clone(attention_block_bytes=block_bytes)
    blocked = blocked_model.apply(variables, ids)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)
    dropped = blocked_model.apply(
        variables, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    assert np.abs(np.asarray(dropped - blocked)).max() > 1e-4


@pytest.mark.parametrize(
    ("batch", "heads", "budget", "expected"),
    [
        (8, 16, attention.CPU_BLOCK_BYTES, (2, 4)),  # imagenet256 on CPU: 8 pairs of 257x257 scores
        (64, 16, attention.CPU_BLOCK_BYTES, (2, 4)),  # the same blocks at batch 64
        (3, 16, attention.CPU_BLOCK_BYTES, (1, 4)),  # examples per block divide the batch
        (8, 6, attention.CPU_BLOCK_BYTES, (2, 3)),  # heads per block divide the heads
        (8, 16, 1, (1, 1)),  # a budget below one pair still makes progress
        (8, 16, None, (8, 16)),  # None: one block
    ],
)
def test_attention_block_shape_fits_the_budget(batch, heads, budget, expected):
    assert attention.block_shape(batch, heads, 257, 257, budget) == expected


@pytest.mark.parametrize("implementation", [attention.XLA, attention.CUDNN])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_is_the_same_function(dtype, implementation, caplog):
    # jax.nn.dot_product_attention against the einsum core; here cuDNN declines (no GPU) and
    # XLA's attention runs, saying so for the dtypes cuDNN would take.
    attention._log_fallback.cache_clear()
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 17), 0, 21)
    variables = _tiny_transformer().init(jax.random.PRNGKey(1), ids)
    einsum = _tiny_transformer(dtype).apply(variables, ids)
    fused_model = _tiny_transformer(dtype).clone(attention_implementation=implementation)
    with caplog.at_level(logging.WARNING):
        fused = fused_model.apply(variables, ids)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsum), rtol=0, atol=tolerance)
    declined = "cuDNN attention declined" in caplog.text
    assert declined == (implementation == attention.CUDNN and dtype == jnp.bfloat16)
    # Attention dropout is not in the fused kernels: training keeps the einsum core.
    rngs = {"dropout": jax.random.PRNGKey(2)}
    dropped = fused_model.apply(variables, ids, deterministic=False, rngs=rngs)
    expected = _tiny_transformer(dtype).apply(variables, ids, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(np.asarray(dropped), np.asarray(expected), rtol=0, atol=1e-6)


def _cuda_program(model, variables, ids, deterministic=True) -> str:
    """The StableHLO `model.apply` lowers to for a CUDA GPU, with cuDNN's hardware checks
    answered as a Hopper GPU with cuDNN 9.10 would answer them (this machine has neither).
    """
    checks = {
        "check_cudnn_version": lambda: 91000,
        "check_compute_capability": lambda capability: True,
        "is_cuda_compute_capability_equal": lambda capability: False,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, answer in checks.items():
            patch.setattr(fused_attention_stablehlo, name, answer)

        def apply(variables, ids, rng):
            return model.apply(variables, ids, deterministic=deterministic, rngs={"dropout": rng})

        traced = jax.jit(apply).trace(variables, ids, jax.random.PRNGKey(2))
        return traced.lower(lowering_platforms=("cuda",)).as_text()


def test_gpu_program_runs_attention_on_cudnn():
    # What a GPU compiles: one cuDNN fused attention per layer in bf16 decoding, none where
    # attention dropout applies (training) or the dtype is float32 (cuDNN takes bf16/fp16).
    ids = jnp.zeros((2, 17), jnp.int32)
    variables = _tiny_transformer().init(jax.random.PRNGKey(1), ids)
    model = _tiny_transformer(jnp.bfloat16).clone(attention_implementation=attention.CUDNN)
    cudnn_calls = _cuda_program(model, variables, ids).count("__cudnn$fmha")
    assert cudnn_calls == model.num_layers
    assert "__cudnn$fmha" not in _cuda_program(model, variables, ids, deterministic=False)
    float32 = model.clone(dtype=jnp.float32)
    assert "__cudnn$fmha" not in _cuda_program(float32, variables, ids)


def test_unknown_attention_implementation_is_named():
    q = jnp.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="'flash'.*einsum"):
        attention.multi_head_attention(q, q, q, implementation="flash")


def test_build_transformer_picks_attention_per_backend():
    config = config_lib.base_config()
    on_cpu = build_transformer(config, backend="cpu")
    assert (on_cpu.attention_block_bytes, on_cpu.attention_implementation) == (
        attention.CPU_BLOCK_BYTES,
        attention.EINSUM,
    )
    for backend, implementation in (("gpu", attention.CUDNN), ("tpu", attention.XLA)):
        model = build_transformer(config, backend=backend)
        assert (model.attention_block_bytes, model.attention_implementation) == (
            None,
            implementation,
        )
    assert (
        build_transformer(config).attention_implementation
        == (attention.default_attention()["attention_implementation"])
    )


def test_attention_override_replaces_the_backends_choice(monkeypatch):
    config = config_lib.base_config()
    monkeypatch.setenv(attention.OVERRIDE_VARIABLE, attention.XLA)
    on_cpu = build_transformer(config, backend="cpu")
    assert (on_cpu.attention_block_bytes, on_cpu.attention_implementation) == (
        attention.CPU_BLOCK_BYTES,
        attention.XLA,
    )
    monkeypatch.setenv(attention.OVERRIDE_VARIABLE, attention.EINSUM)
    assert build_transformer(config, backend="gpu").attention_implementation == attention.EINSUM
    monkeypatch.setenv(attention.OVERRIDE_VARIABLE, "flash")
    with pytest.raises(RuntimeError, match="MASKGIT_JAX_ATTENTION='flash'.*'einsum'"):
        build_transformer(config, backend="gpu")
