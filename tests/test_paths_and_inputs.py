"""What a user types works: relative paths, None-default config fields on the command line,
pretokenized_dir alone, and clear errors for broken pretrained directories (issue 9, item 5).
"""

import contextlib
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from etils import epath
from ml_collections import config_flags

from maskgit_jax import paths
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.data import pretokenized
from maskgit_jax.training import transformer as train_transformer
from tests.conftest import REPO_ROOT
from tests.helpers import load_config_file
from tests.test_official_checkpoint import TINY_CONFIG_SOURCE, tiny_config
from tests.training_support import tiny_config as tiny_training_config

pytest_plugins = ["tests.training_support"]

CONFIG_FILES = sorted(p.name for p in (REPO_ROOT / "configs").glob("*.py"))


# ---------------------------------------------------------------------------------------------
# paths.absolute


def test_absolute_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.absolute("runs/x") == epath.Path(tmp_path / "runs" / "x")
    assert paths.absolute("./runs/../y") == epath.Path(tmp_path / "y")
    assert paths.absolute("~/ckpt") == epath.Path(tmp_path / "home" / "ckpt")
    assert paths.absolute(tmp_path / "z") == epath.Path(tmp_path / "z")
    assert str(paths.absolute("gs://bucket/runs/x")) == "gs://bucket/runs/x"
    assert str(paths.absolute(epath.Path("gs://bucket/a"))) == "gs://bucket/a"
    assert paths.is_url("s3://b/k") and not paths.is_url("C:/x") and not paths.is_url("a/b")
    with pytest.raises(ValueError, match="empty"):
        paths.absolute("")


# ---------------------------------------------------------------------------------------------
# Every config field can be set on the command line (the real ml_collections parser).


def _leaves(config, prefix=""):
    """(dotted name, value) of every non-section field."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _get(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def _parse(config_file, overrides):
    """Parses `--config=configs/<file> overrides...` as main/pretokenize/convert_official do."""
    argv = ["prog", f"--config={REPO_ROOT / 'configs' / config_file}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def _other_value(value):
    """A different value of the same type, and how it is typed on the command line."""
    if value is None:
        return "/typed/on/the/command/line", "/typed/on/the/command/line"
    if isinstance(value, bool):
        return (not value), str(not value)
    if isinstance(value, int):
        return value + 1, str(value + 1)
    if isinstance(value, float):
        return value + 0.5, repr(value + 0.5)
    if isinstance(value, str):
        return value + "_x", value + "_x"
    if isinstance(value, tuple):
        return value, repr(value)
    raise AssertionError(f"unexpected config value type {type(value)}")


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_none_default_can_be_set_on_the_command_line(config_file):
    config = load_config_file(f"configs/{config_file}")
    none_fields = [name for name, value in _leaves(config) if value is None]
    assert {"dataset.folder", "dataset.data_dir", "dataset.manual_dir"} <= set(none_fields)
    if config_file != "photos.py":  # photos evaluates on "test"
        assert "dataset.eval_split" in none_fields
    parsed = _parse(config_file, [f"--config.{name}=/set/{name}" for name in none_fields])
    for name in none_fields:
        assert _get(parsed, name) == f"/set/{name}", name
    # Without overrides they stay None, which the readers take as "not set".
    defaults = _parse(config_file, [])
    assert all(_get(defaults, name) is None for name in none_fields)


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_field_can_be_set_on_the_command_line(config_file):
    config = load_config_file(f"configs/{config_file}")
    expected, overrides = {}, []
    for name, value in _leaves(config):
        expected[name], typed = _other_value(value)
        overrides.append(f"--config.{name}={typed}")
    parsed = _parse(config_file, overrides)
    for name, value in expected.items():
        assert _get(parsed, name) == value, name


def test_the_readme_example_sets_the_folder_source():
    parsed = _parse(
        "digits.py", ["--config.dataset.name=folder", "--config.dataset.folder=/data/root"]
    )
    assert parsed.dataset.name == "folder" and parsed.dataset.folder == "/data/root"


def test_saved_configs_with_null_fields_still_load(tmp_path):
    """config.json and checkpoint metadata hold `null` for unset placeholders."""
    config = load_config_file("configs/digits.py")
    saved = json.loads(config.to_json())
    assert saved["dataset"]["folder"] is None and saved["dataset"]["eval_split"] is None
    config.dataset.folder = "/data/root"
    assert json.loads(config.to_json())["dataset"]["folder"] == "/data/root"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = pretrained.load_config(tmp_path)
    assert loaded.dataset.folder is None and loaded.dataset.eval_split is None
    loaded.dataset.folder = "/elsewhere"  # A plain (not placeholder) field: still assignable.
    assert loaded.dataset.folder == "/elsewhere"


# ---------------------------------------------------------------------------------------------
# Pretrained directories: relative paths, interrupted saves, broken files.


@pytest.fixture(scope="module")
def model():
    """The tiny config and random variables of both parts (host numpy)."""
    config = tiny_config()

    def fill(seed):
        rng = np.random.default_rng(seed)
        return lambda a: rng.standard_normal(a.shape).astype(np.float32)

    tokenizer = jax.tree.map(fill(1), official_checkpoint.abstract_tokenizer_params(config))
    transformer = jax.tree.map(fill(2), official_checkpoint.abstract_transformer_params(config))
    return config, tokenizer, transformer


def _scaled(variables, factor):
    return jax.tree.map(lambda x: x * factor, variables)


def _assert_same_leaves(want, got):
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(b), a)


def _assert_loads(directory, tokenizer, transformer):
    loaded = pretrained.load_pretrained(directory)
    _assert_same_leaves(tokenizer, loaded.tokenizer_variables)
    _assert_same_leaves(transformer, loaded.transformer_variables)


def _siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_relative_paths_save_and_load(model, tmp_path, monkeypatch):
    config, tokenizer, transformer = model
    monkeypatch.chdir(tmp_path)
    written = pretrained.save_pretrained("ckpt", config, tokenizer, transformer)
    assert written == epath.Path(tmp_path / "ckpt")
    assert _siblings(tmp_path) == ["ckpt"]  # No temporaries left beside it.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "tokenizer",
        "transformer",
    ]
    _assert_loads("ckpt", tokenizer, transformer)
    assert pretrained.load_config("ckpt").image_size == config.image_size
    assert pretrained.find_pretrained("ckpt", "tokenizer") == epath.Path(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="training.tokenizer_checkpoint=.: no tokenizer"):
        pretrained.find_pretrained(".", "tokenizer", "training.tokenizer_checkpoint")


def test_interrupted_save_leaves_nothing_that_blocks_the_rerun(model, tmp_path, monkeypatch):
    config, tokenizer, transformer = model
    directory = tmp_path / "ckpt"
    original = ocp.StandardCheckpointer.save
    calls = []

    def save_then_fail(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # The tokenizer is written, then the process "dies".
            self.wait_until_finished()
            raise KeyboardInterrupt("interrupted")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pretrained.save_pretrained(directory, config, tokenizer, transformer)
    assert not directory.exists()  # Never a half-written directory under the real name.
    assert _siblings(tmp_path) == ["ckpt.partial"]
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", original)
    pretrained.save_pretrained(directory, config, tokenizer, transformer)
    assert _siblings(tmp_path) == ["ckpt"]
    _assert_loads(directory, tokenizer, transformer)


def test_orbax_debris_of_an_older_interrupted_save_does_not_block(model, tmp_path):
    config, tokenizer, transformer = model
    directory = tmp_path / "ckpt"
    (directory / "tokenizer.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    pretrained.save_pretrained(directory, config, tokenizer, transformer)
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json",
        "tokenizer",
        "transformer",
    ]
    _assert_loads(directory, tokenizer, transformer)


def test_a_saved_model_is_replaced_only_with_overwrite(model, tmp_path):
    config, tokenizer, transformer = model
    directory = tmp_path / "ckpt"
    pretrained.save_pretrained(directory, config, tokenizer, transformer)
    (directory / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        pretrained.save_pretrained(directory, config, _scaled(tokenizer, 2), transformer)
    _assert_loads(directory, tokenizer, transformer)
    assert (directory / "notes.txt").read_text() == "mine"
    pretrained.save_pretrained(
        directory, config, _scaled(tokenizer, 2), _scaled(transformer, 3), overwrite=True
    )
    assert _siblings(tmp_path) == ["ckpt"] and not (directory / "notes.txt").exists()
    _assert_loads(directory, _scaled(tokenizer, 2), _scaled(transformer, 3))


def test_a_save_interrupted_while_replacing_keeps_a_model(model, tmp_path):
    config, tokenizer, transformer = model
    directory = tmp_path / "ckpt"
    replaced = tmp_path / "ckpt.replaced"
    pretrained.save_pretrained(directory, config, tokenizer, transformer)
    # Stopped between "move the old model aside" and "move the new one in": the old one comes
    # back, and without overwrite it is kept.
    directory.rename(replaced)
    with pytest.raises(FileExistsError, match="is not empty"):
        pretrained.save_pretrained(directory, config, _scaled(tokenizer, 2), transformer)
    assert _siblings(tmp_path) == ["ckpt"]
    _assert_loads(directory, tokenizer, transformer)
    # The same, and the user created an empty directory under the name since.
    directory.rename(replaced)
    directory.mkdir()
    with pytest.raises(FileExistsError, match="is not empty"):
        pretrained.save_pretrained(directory, config, _scaled(tokenizer, 2), transformer)
    assert _siblings(tmp_path) == ["ckpt"]
    _assert_loads(directory, tokenizer, transformer)
    # Stopped after the new model was in place: the old one is what overwrite replaced.
    shutil.copytree(directory, replaced)
    pretrained.save_pretrained(
        directory, config, _scaled(tokenizer, 2), transformer, overwrite=True
    )
    assert _siblings(tmp_path) == ["ckpt"]
    _assert_loads(directory, _scaled(tokenizer, 2), transformer)


def test_copy_pretrained_copies_the_requested_parts(model, tmp_path):
    config, tokenizer, transformer = model
    source = pretrained.save_pretrained(tmp_path / "src", config, tokenizer, transformer)
    copy = pretrained.copy_pretrained(source, tmp_path / "copy", parts=("tokenizer",))
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "tokenizer"]
    loaded = pretrained.load_pretrained(copy, parts=("tokenizer",))
    _assert_same_leaves(tokenizer, loaded.tokenizer_variables)
    assert not (tmp_path / "copy.partial").exists()


@pytest.fixture
def saved(model, tmp_path):
    config, tokenizer, transformer = model
    return pretrained.save_pretrained(tmp_path / "ckpt", config, tokenizer, transformer)


def _expect_one_clear_error(call, path, match):
    with pytest.raises(pretrained.PretrainedError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and match in message, message
    # One traceback: no chained Orbax or json exception printed above it.
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not a config"),
        ("{}", "lacks the config fields image_size, num_classes, tokenizer, transformer"),
        ('{"image_size": 8, "num_classes": 4, "transformer": {}}', "lacks the config fields"),
        (
            '{"image_size": 8, "num_classes": 4, "tokenizer": 3, "transformer": {}}',
            "'tokenizer' is not a section",
        ),
    ],
)
def test_a_broken_config_json_names_the_file(saved, content, match):
    path = saved / "config.json"
    path.write_text(content)
    _expect_one_clear_error(lambda: pretrained.load_pretrained(saved), path, match)


def test_a_config_json_missing_a_model_field_names_the_file(saved):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    del config["tokenizer"]["filters"]  # The model's default (128) then differs from the saved.
    path.write_text(json.dumps(config))
    with pytest.raises(official_checkpoint.CheckpointMismatchError) as caught:
        pretrained.load_pretrained(saved)
    message = str(caught.value)
    assert f"tokenizer at {saved / 'tokenizer'} does not match" in message
    assert f"The config was read from {path}" in message


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["metadata", "manifest", "data"])
def test_corrupt_orbax_files_give_one_clear_error(saved, damage, capfd):
    part = saved / "transformer"
    if damage == "metadata":
        (part / "_METADATA").unlink()
    elif damage == "manifest":
        (part / "manifest.ocdbt").unlink()
    else:
        data = [p for p in pathlib.Path(part).rglob("*") if p.is_file() and p.parent.name == "d"]
        assert data
        for path in data:
            path.write_bytes(b"x")
    capfd.readouterr()
    _expect_one_clear_error(
        lambda: pretrained.load_pretrained(saved), part, "is not a readable Orbax checkpoint"
    )
    gc.collect()  # Abandoned Orbax reads would report now, failing the test (filterwarnings).
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Event loop is closed" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Entry points with relative paths, as a user types them.


def _run(module, *args, cwd, **variables):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu", **variables)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_convert_official_then_sample_with_relative_paths(model, tmp_path):
    config, tokenizer, transformer = model
    (tmp_path / "tiny_config.py").write_text(TINY_CONFIG_SOURCE)
    official_checkpoint.save_official_format(tmp_path / "tok.msgpack", tokenizer)
    official_checkpoint.save_official_format(tmp_path / "mvtm.msgpack", transformer)
    # What an interrupted earlier conversion may have left: neither blocks the rerun.
    (tmp_path / "out.partial" / "tokenizer").mkdir(parents=True)
    (tmp_path / "out" / "tokenizer.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    done = _run(
        "maskgit_jax.convert_official",
        "--config=tiny_config.py",
        "--tokenizer=tok.msgpack",
        "--transformer=mvtm.msgpack",
        "--output=out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "tokenizer",
        "transformer",
    ]
    _assert_loads(tmp_path / "out", tokenizer, transformer)

    done = _run(
        "maskgit_jax.sample",
        "--checkpoint=out",
        "--labels=0,3",
        "--num_steps=2",
        "--batch_size=2",
        "--output=samples",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["00000_class0.png", "00001_class3.png", "grid.png"]

    # MASKGIT_JAX_ATTENTION picks the attention implementation; a wrong name stops the run
    # before it writes anything.
    sample = ("--checkpoint=out", "--labels=0", "--num_steps=2", "--batch_size=1")
    done = _run(
        "maskgit_jax.sample", *sample, "--output=xla", cwd=tmp_path, MASKGIT_JAX_ATTENTION="xla"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "xla" / "grid.png").exists()
    done = _run(
        "maskgit_jax.sample", *sample, "--output=bad", cwd=tmp_path, MASKGIT_JAX_ATTENTION="flash"
    )
    assert done.returncode != 0
    assert "MASKGIT_JAX_ATTENTION='flash' names no attention implementation" in done.stderr
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# pretokenized_dir alone is enough to train the transformer.


@pytest.fixture(scope="module")
def pretokenized_run(data_dir, tmp_path_factory):
    """A random tiny tokenizer, and the digits pre-tokenized with it, both given relative."""
    base = tmp_path_factory.mktemp("pretokenized")
    config = tiny_training_config(data_dir)
    abstract = official_checkpoint.abstract_tokenizer_params(config)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
    with contextlib.chdir(base):
        source = pretrained.save_pretrained("tokenizer_run/pretrained", config, variables)
        config.training.tokenizer_checkpoint = "tokenizer_run"  # A workdir.
        count = pretokenized.write(config, "tokens")
    config.training.tokenizer_checkpoint = ""
    config.training.pretokenized_dir = "tokens"
    return base, config, variables, source, count


def test_pretokenize_keeps_a_copy_of_its_tokenizer(pretokenized_run, monkeypatch):
    base, config, variables, source, count = pretokenized_run
    monkeypatch.chdir(base)
    tokens, labels, info = pretokenized.load("tokens")
    assert count == len(tokens) == len(labels) > 0
    assert info["tokenizer"] == "pretrained"
    assert info["tokenizer_source"] == str(base / "tokenizer_run" / "pretrained") == str(source)
    copy = base / "tokens" / "pretrained"
    assert sorted(p.name for p in copy.iterdir()) == ["config.json", "tokenizer"]
    assert not (base / "tokens" / "pretrained.partial").exists()
    assert train_transformer._tokenizer_source(config) == epath.Path(copy)
    _assert_same_leaves(variables, train_transformer._load_tokenizer(config))


def test_pretokenized_dir_without_its_copy_falls_back_to_the_source(
    pretokenized_run, tmp_path, monkeypatch
):
    base, config, variables, source, _ = pretokenized_run
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base / "tokens", tmp_path / "tokens", ignore=shutil.ignore_patterns("pre*"))
    assert train_transformer._tokenizer_source(config) == source
    _assert_same_leaves(variables, train_transformer._load_tokenizer(config))
    info_path = tmp_path / "tokens" / "info.json"
    info = json.loads(info_path.read_text())
    info["tokenizer_source"] = str(tmp_path / "moved_away")
    info_path.write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="Set training.tokenizer_checkpoint"):
        train_transformer._load_tokenizer(config)


def test_train_with_only_pretokenized_dir(pretokenized_run, tmp_path, monkeypatch):
    base, config, variables, _, _ = pretokenized_run
    monkeypatch.chdir(base)
    config = config.copy_and_resolve_references()
    assert not config.training.tokenizer_checkpoint and config.training.pretokenized_dir
    config.training.num_train_steps = 1
    config.checkpoint.every_steps = 1
    config.logging.eval_every_steps = 0
    config.logging.sample_every_steps = 1
    workdir = tmp_path / "transformer_run"
    train_transformer.train_and_evaluate(config, str(workdir))
    # The sample grid and the export both need the tokenizer found through the tokens.
    assert (workdir / "samples" / "step_00000001.png").is_file()
    exported = pretrained.load_pretrained(workdir / "pretrained")
    _assert_same_leaves(variables, exported.tokenizer_variables)
