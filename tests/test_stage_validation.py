"""The config is validated once per run, for every stage the run trains; build_stage's contract.

`main.train_and_evaluate` runs here in-process with the loop and the data replaced (no step
is compiled and no dataset read), so a stage=both run takes a few seconds.
"""

import types

import jax
import numpy as np
import pytest

from maskgit_jax import config_lib, main, sharding
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.data import input_pipeline
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import tokenizer as train_tokenizer
from maskgit_jax.training import transformer as train_transformer
from tests.training_support import tiny_config


def _zero_tokenizer(config):
    """Tokenizer variables of the right shapes (an eager init of the network takes ~20 s)."""
    shapes = official_checkpoint.abstract_tokenizer_params(config)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture
def stubbed_run(monkeypatch):
    """Counts validations and records the stages and configs handed to the (stubbed) loop."""
    record = {"validate": [], "run": []}
    real_validate = config_lib.validate

    def counting_validate(config, stages=None, **kwargs):
        resolved = config_lib.stages_to_train(config) if stages is None else tuple(stages)
        record["validate"].append(resolved)
        return real_validate(config, stages, **kwargs)

    def run(config, workdir, stage, setup=None):
        record["run"].append((stage.name, config, stage))
        # A finished stage: a stage=both run goes on to the transformer.
        return types.SimpleNamespace(step=np.int32(stage.training.num_train_steps))

    monkeypatch.setattr(config_lib, "validate", counting_validate)
    monkeypatch.setattr(train_loop, "run", run)
    monkeypatch.setattr(input_pipeline, "create_datasets", lambda *a, **k: (None, None, None))
    monkeypatch.setattr(train_transformer, "_load_tokenizer", _zero_tokenizer)
    return record


def test_stage_both_is_validated_once_for_both_stages(stubbed_run, tmp_path):
    config = tiny_config("unused", stage="both")
    main.train_and_evaluate(config, tmp_path)
    assert stubbed_run["validate"] == [("tokenizer", "transformer")]
    assert [name for name, _, _ in stubbed_run["run"]] == ["tokenizer", "transformer"]
    # The transformer trains on the tokenizer the run has just trained.
    transformer_config = stubbed_run["run"][1][1]
    assert transformer_config.training.tokenizer_checkpoint == str(tmp_path / "tokenizer")


@pytest.mark.parametrize("stage", ["tokenizer", "transformer"])
def test_one_stage_run_is_validated_once(stubbed_run, tmp_path, stage):
    config = tiny_config("unused", stage=stage, **{"training.tokenizer_checkpoint": "given"})
    main.train_and_evaluate(config, tmp_path)
    assert stubbed_run["validate"] == [(stage,)]
    assert [name for name, _, _ in stubbed_run["run"]] == [stage]


def test_stages_called_on_their_own_validate_their_own_stage(stubbed_run, tmp_path):
    # A library call of one stage is still protected: it validates that stage.
    config = tiny_config("unused", stage="both")
    with pytest.raises(ValueError, match="needs training.tokenizer_checkpoint"):
        train_transformer.train_and_evaluate(config, str(tmp_path))
    train_tokenizer.train_and_evaluate(config, str(tmp_path))
    assert stubbed_run["validate"] == [("transformer",), ("tokenizer",)]
    # `validated=True` (what `main` passes) does not validate again.
    train_tokenizer.train_and_evaluate(config, str(tmp_path), validated=True)
    assert len(stubbed_run["validate"]) == 2


def test_train_and_evaluate_trains_the_stage_build_stage_makes(stubbed_run, tmp_path):
    config = tiny_config("unused", stage="transformer", **{"training.tokenizer_checkpoint": "x"})
    train_transformer.train_and_evaluate(config, str(tmp_path))
    ((_, _, trained),) = stubbed_run["run"]
    built = train_transformer.build_stage(config, _zero_tokenizer(config)).stage
    assert trained.training is built.training and trained.batches is None
    # The same program: equal jaxprs of the step on the same state, batch and constants.
    state = sharding.strip_boxes(jax.eval_shape(built.init_state, jax.random.PRNGKey(0)))
    size, batch = config.image_size, config.training.batch_size
    images = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32),
        "label": jax.ShapeDtypeStruct((batch,), np.int32),
    }
    programs = [
        str(jax.make_jaxpr(stage.train_step)(state, images, stage.constants))
        for stage in (trained, built)
    ]
    assert programs[0] == programs[1]
    assert trained.on_eval and trained.on_sample and trained.export
    assert built.on_eval is None and built.on_sample is None and built.export is None


# ------------------------------------------------------------------- validate's coverage


def test_validate_checks_the_stages_the_run_trains():
    config = tiny_config("unused", stage="tokenizer", **{"training.grad_accum_steps": 0})
    config_lib.validate(config)  # the transformer is not trained
    config.stage = "both"
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        config_lib.validate(config)
    config = tiny_config("unused", stage="transformer", **{"tokenizer_training.disc_steps": 0})
    config.training.pretokenized_dir = "/tokens"
    config_lib.validate(config)
    config.stage = "both"
    with pytest.raises(ValueError, match="disc_steps"):
        config_lib.validate(config)


def test_validate_inputs_of_a_transformer_run():
    config = tiny_config("unused", stage="transformer")
    with pytest.raises(ValueError, match="needs training.tokenizer_checkpoint"):
        config_lib.validate(config)
    config_lib.validate(config, stages=("transformer",), inputs=False)  # aot_compile's shapes
    config.stage = "both"
    config_lib.validate(config)  # trained on the tokenizer of the same run
    config.training.pretokenized_dir = "/tokens"
    with pytest.raises(ValueError, match="holds tokens of another tokenizer"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="unknown stages"):
        config_lib.validate(config, stages=("both",))


# ------------------------------------------------------------------- build_stage's contract


def test_transformer_build_stage_feeds_tokens_without_a_tokenizer():
    config = tiny_config("unused")
    built = train_transformer.build_stage(config)
    assert built.stage.constants is None and built.stage.batches is None
    assert isinstance(built.trainer, train_transformer.TransformerTrainer)
    config.training.pretokenized_dir = "/tokens"
    assert train_transformer.build_stage(config).stage.batches is not None
    with pytest.raises(ValueError, match="takes no tokenizer_variables"):
        train_transformer.build_stage(config, _zero_tokenizer(config))


def test_tokenizer_build_stage_needs_the_perceptual_network_exactly_when_used():
    config = tiny_config("unused", stage="tokenizer")
    assert config.tokenizer_training.perceptual_weight == 0
    assert train_tokenizer.build_stage(config).stage.constants is None
    with pytest.raises(ValueError, match="never use them"):
        train_tokenizer.build_stage(config, {"conv": np.zeros(1)})
    config.tokenizer_training.perceptual_weight = 0.1
    with pytest.raises(ValueError, match="needs the VGG16 perceptual_params"):
        train_tokenizer.build_stage(config)
