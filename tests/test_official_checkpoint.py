import functools
import os
import re
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from maskgit_jax.checkpoints import manager as checkpoints
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.checkpoints.official import CheckpointMismatchError
from maskgit_jax.models import build_tokenizer, build_transformer
from tests.conftest import REPO_ROOT

# The tiny config, as the source of a config file: the subprocess test writes it to disk for
# `convert_official --config=...`, the in-process tests exec it, so both use the same config.
TINY_CONFIG_SOURCE = '''
from maskgit_jax import config_lib


def get_config():
    """8x8 images, 4x4 tokens, 16 codes, 4 classes, a one-layer transformer."""
    c = config_lib.base_config()
    c.image_size = 8
    c.num_classes = 4
    c.tokenizer.update(
        filters=8,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        embedding_dim=4,
        codebook_size=16,
        norm_groups=4,
    )
    c.transformer.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    return c
'''


def tiny_config():
    namespace = {}
    exec(TINY_CONFIG_SOURCE, namespace)
    return namespace["get_config"]()


def random_variables(model, *inputs, seed=0, scale=0.5):
    """Random weights N(0, scale^2) in the shapes of `model.init`, without running init.

    Filling `eval_shape`'s leaves keeps the transformer's logical-axis boxes, as init does,
    and costs no compilation.
    """
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: scale * rng.standard_normal(a.shape, np.float32), abstract)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Randomly initialized tiny models, written in the released format."""
    config = tiny_config()
    tokenizer, transformer = build_tokenizer(config), build_transformer(config)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    ids = rng.integers(0, 21, (2, 17)).astype(np.int32)
    tokenizer_vars = random_variables(tokenizer, images, seed=1)
    transformer_vars = random_variables(transformer, ids, seed=2)
    directory = tmp_path_factory.mktemp("official")
    tokenizer_path, transformer_path = directory / "tokenizer", directory / "transformer"
    official_checkpoint.save_official_format(tokenizer_path, tokenizer_vars)
    official_checkpoint.save_official_format(transformer_path, transformer_vars)
    return dict(
        config=config,
        tokenizer=tokenizer,
        transformer=transformer,
        images=images,
        ids=ids,
        tokenizer_vars=tokenizer_vars,
        transformer_vars=transformer_vars,
        tokenizer_path=tokenizer_path,
        transformer_path=transformer_path,
    )


def _plain(variables):
    return jax.tree.map(np.asarray, nn.unbox(variables))


def _assert_trees_equal(expected, found):
    expected_flat = checkpoints.flatten_with_names(_plain(expected))
    found_flat = checkpoints.flatten_with_names(found)
    assert sorted(expected_flat) == sorted(found_flat)
    for path, value in expected_flat.items():
        np.testing.assert_array_equal(np.asarray(found_flat[path]), value, err_msg=path)


# ---------------------------------------------------------------------------------------------
# Round trip in the released format.


def test_written_bytes_are_plain_flax_msgpack_of_params(models):
    boxed = jax.tree.leaves(
        models["transformer_vars"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)  # Saving must unbox.
    for part in ("tokenizer", "transformer"):
        data = models[f"{part}_path"].read_bytes()
        variables = models[f"{part}_vars"]
        assert data == flax.serialization.to_bytes({"params": _plain(variables)["params"]})
        restored = flax.serialization.msgpack_restore(data)
        assert list(restored) == ["params"]
        leaves = jax.tree.leaves(restored)
        assert leaves and all(isinstance(x, np.ndarray) for x in leaves)  # No logical boxes.
        _assert_trees_equal(variables, restored)


def test_loaded_models_compute_the_same_outputs(models):
    config, tokenizer, transformer = models["config"], models["tokenizer"], models["transformer"]
    tokenizer_vars = official_checkpoint.load_official_tokenizer(models["tokenizer_path"], config)
    transformer_vars = official_checkpoint.load_official_transformer(
        models["transformer_path"], config
    )
    for loaded in (tokenizer_vars, transformer_vars):
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
    _assert_trees_equal(models["tokenizer_vars"], tokenizer_vars)
    _assert_trees_equal(models["transformer_vars"], transformer_vars)

    # One compiled program per function, run on both weight sets (eager apply is slow).
    encode = jax.jit(functools.partial(tokenizer.apply, method="encode"))
    decode = jax.jit(functools.partial(tokenizer.apply, method="decode"))
    logits = jax.jit(transformer.apply)
    images, ids = models["images"], models["ids"]
    original_ids = encode(models["tokenizer_vars"], images)
    np.testing.assert_array_equal(encode(tokenizer_vars, images), original_ids)
    original_images = decode(models["tokenizer_vars"], original_ids)
    np.testing.assert_array_equal(decode(tokenizer_vars, original_ids), original_images)
    original_logits = logits(nn.unbox(models["transformer_vars"]), ids)
    assert original_logits.shape == (2, 17, 21)
    np.testing.assert_array_equal(logits(transformer_vars, ids), original_logits)


# ---------------------------------------------------------------------------------------------
# Files that do not fit the config.


def _edited(models, part, tmp_path, edit):
    """Writes the part's checkpoint after `edit(params)` changed its plain params in place."""
    variables = flax.serialization.msgpack_restore(models[f"{part}_path"].read_bytes())
    edit(variables["params"])
    path = tmp_path / f"edited_{part}"
    path.write_bytes(flax.serialization.to_bytes(variables))
    return path


def _load(part, path, config):
    if part == "tokenizer":
        return official_checkpoint.load_official_tokenizer(path, config)
    return official_checkpoint.load_official_transformer(path, config)


@pytest.mark.parametrize(
    "part, module, name, shape",
    [
        ("tokenizer", "quantizer", "codebook", (16, 4)),
        ("tokenizer", "encoder/ResBlock_1/Conv_2", "kernel", (1, 1, 16, 16)),
        ("transformer", "TransformerLayer_0/Mlp_0/layer_output", "bias", (16,)),
    ],
)
def test_removed_parameter_is_named_missing(models, tmp_path, part, module, name, shape):
    def edit(params):
        node = params
        for key in module.split("/"):
            node = node[key]
        del node[name]

    path = _edited(models, part, tmp_path, edit)
    expected = (
        f"{part} checkpoint {path} does not match the model built from the config: "
        f"missing: params/{module}/{name} (expected shape {shape})."
    )
    with pytest.raises(CheckpointMismatchError, match=f"^{re.escape(expected)}$"):
        _load(part, path, models["config"])


def test_extra_parameter_is_named_unexpected(models, tmp_path):
    def edit(params):
        params["encoder"]["Extra_0"] = {"kernel": np.zeros((3, 2), np.float32)}

    path = _edited(models, "tokenizer", tmp_path, edit)
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape("unexpected: params/encoder/Extra_0/kernel (shape (3, 2))"),
    ):
        _load("tokenizer", path, models["config"])


def test_misshaped_parameter_names_both_shapes(models, tmp_path):
    def edit(params):
        params["Embed_0"]["position_embeddings"]["embedding"] = np.zeros((9, 16), np.float32)

    path = _edited(models, "transformer", tmp_path, edit)
    expected = (
        "shape mismatch: params/Embed_0/position_embeddings/embedding: "
        "expected (17, 16), found (9, 16)"
    )
    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)):
        _load("transformer", path, models["config"])


def test_several_differences_name_the_first_and_count_the_rest(models, tmp_path):
    def edit(params):
        del params["quantizer"]["codebook"]
        params["decoder"]["Conv_0"]["bias"] = np.zeros((5,), np.float32)
        params["zz_extra"] = {"scale": np.ones((2,), np.float32)}

    path = _edited(models, "tokenizer", tmp_path, edit)
    # Sorted by path: decoder/Conv_0 (shape), quantizer/codebook (missing), zz_extra (extra).
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch: params/decoder/Conv_0/bias: expected \(\d+,\), found \(5,\) "
        r"\(and 2 more differences\)\.$",
    ):
        _load("tokenizer", path, models["config"])


def test_config_with_another_codebook_size_is_rejected(models):
    config = tiny_config()
    config.tokenizer.codebook_size = 32
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape("params/quantizer/codebook: expected (32, 4), found (16, 4)"),
    ):
        official_checkpoint.load_official_tokenizer(models["tokenizer_path"], config)
    # The transformer's vocabulary (codes + classes + mask) grows with the codebook too.
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(
            "params/Embed_0/word_embeddings/embedding: expected (37, 16), found (21, 16) "
            "(and 1 more differences)"
        ),
    ):
        official_checkpoint.load_official_transformer(models["transformer_path"], config)


@pytest.mark.parametrize("part", ["tokenizer", "transformer"])
def test_missing_file_names_the_path(models, tmp_path, part):
    path = tmp_path / "no_such_dir" / "checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint file not found: {path}")):
        _load(part, path, models["config"])


@pytest.mark.parametrize("content", [b"not a checkpoint", b"", "truncated"])
def test_file_that_is_not_msgpack_raises_value_error(models, tmp_path, content):
    if content == "truncated":
        content = models["tokenizer_path"].read_bytes()[:-10]
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a flax msgpack checkpoint")):
        official_checkpoint.load_official_tokenizer(path, models["config"])


@pytest.mark.parametrize("content", [b"\x01", b"\x91\x01"])  # The integer 1, the list [1].
def test_msgpack_that_is_not_a_mapping_raises_value_error(models, tmp_path, content):
    path = tmp_path / "scalar"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        official_checkpoint.load_official_tokenizer(path, models["config"])


# ---------------------------------------------------------------------------------------------
# convert_official end to end, and loading the pretrained directory it writes.


def _run_convert(models, tmp_path, output):
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(TINY_CONFIG_SOURCE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    command = [
        sys.executable,
        "-m",
        "maskgit_jax.convert_official",
        f"--config={config_file}",
        f"--tokenizer={models['tokenizer_path']}",
        f"--transformer={models['transformer_path']}",
        f"--output={output}",
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("convert")
    output = tmp_path / "pretrained"
    result = _run_convert(models, tmp_path, output)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(tmp_path=tmp_path, output=output)


def _assert_loaded_equals_originals(models, loaded):
    _assert_trees_equal(models["tokenizer_vars"], loaded.tokenizer_variables)
    _assert_trees_equal(models["transformer_vars"], loaded.transformer_variables)


def test_convert_official_writes_a_loadable_pretrained_directory(models, converted):
    output = converted["output"]
    assert {"config.json", "tokenizer", "transformer"} <= {p.name for p in output.iterdir()}
    loaded = pretrained.load_pretrained(output)
    for field in ("image_size", "num_classes"):
        assert loaded.config[field] == models["config"][field]
    assert loaded.config.tokenizer.to_dict() == {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in models["config"].tokenizer.to_dict().items()
    }
    assert loaded.config.transformer.to_dict() == models["config"].transformer.to_dict()
    _assert_loaded_equals_originals(models, loaded)


def test_convert_official_refuses_a_non_empty_output(models, converted):
    output = converted["output"]
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    result = _run_convert(models, converted["tmp_path"], output)
    assert result.returncode != 0
    assert f"{output} is not empty; choose a new output directory." in result.stderr
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before
    _assert_loaded_equals_originals(models, pretrained.load_pretrained(output))


def test_load_pretrained_with_another_config_names_the_first_difference(models, converted):
    output = converted["output"]
    config = tiny_config()
    config.tokenizer.codebook_size = 32
    expected = (
        f"tokenizer at {output / 'tokenizer'} does not match the model built from the config: "
        "shape mismatch: params/quantizer/codebook: expected (32, 4), found (16, 4)."
    )
    with pytest.raises(CheckpointMismatchError, match=f"^{re.escape(expected)}$"):
        pretrained.load_pretrained(output, config)

    # Only the transformer differs (one class more): the tokenizer passes, the transformer not.
    config = tiny_config()
    config.num_classes = 5
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(
            f"transformer at {output / 'transformer'} does not match the model built from the "
            "config: shape mismatch: params/Embed_0/word_embeddings/embedding: "
            "expected (22, 16), found (21, 16) (and 1 more differences)."
        ),
    ):
        pretrained.load_pretrained(output, config)
