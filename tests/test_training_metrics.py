"""FID / Inception Score during the transformer stage and rFID during the tokenizer stage.

The Inception network is the synthetic full-architecture graph of `tests/inception_graph.py`
(random weights in the real GraphDef format). At 299x299 it costs about 6 GFLOP per image
on the CPU, so every call here sees one batch of 8 images (one per fake device, one compiled
shape for the whole module). The training stages' hooks are tested by running
`train_and_evaluate` up to the loop and calling the evaluation hook it built; the gathers
across processes by two JAX processes on loopback.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from maskgit_jax import config_lib
from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.evaluation import in_training, metrics, reference_sets, samples
from maskgit_jax.training import loop as train_loop
from maskgit_jax.training import tokenizer as train_tokenizer
from maskgit_jax.training import transformer as train_transformer
from tests.inception_graph import write_graph
from tests.training_support import tiny_config

pytest_plugins = ["tests.training_support"]

# Images per Inception call in this module (8 fake devices: one image each).
BATCH = 8


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    pytest.importorskip("tensorflow")
    return write_graph(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def inception_fn(inception_path):
    config = config_lib.base_config()
    config.evaluation.inception_path = inception_path
    return in_training.load_inception(config)


def _metrics_config(data_dir, inception_path, **overrides):
    """The tiny digits config with the metrics on: 8 samples, an 8-example reference."""
    return tiny_config(
        data_dir,
        **{
            "evaluation.inception_path": inception_path,
            "evaluation.num_samples": BATCH,
            "evaluation.batch_size": BATCH,
            "evaluation.reference_examples": BATCH,
            "evaluation.inception_score_splits": 2,
            **overrides,
        },
    )


def _random_variables(config):
    """Random tokenizer variables and transformer parameters (host arrays, no compilation).

    Normal(0, 0.05) weights from the abstract shapes (norm scales 1): sampling and decoding
    give finite images, which is all the metrics need; a real init compiles for seconds.
    """
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if getattr(path[-1], "key", None) == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0.0, 0.05, leaf.shape).astype(leaf.dtype)

    tokenizer = jax.tree_util.tree_map_with_path(
        fill, official_checkpoint.abstract_tokenizer_params(config)
    )
    transformer = jax.tree_util.tree_map_with_path(
        fill, official_checkpoint.abstract_transformer_params(config)
    )
    return tokenizer, transformer["params"]


# ------------------------------------------------------------------------- tokenizer: rFID


def test_reconstruction_fid_is_zero_for_identical_images(inception_fn):
    images = np.random.default_rng(1).uniform(0, 1, (BATCH, 16, 16, 3)).astype(np.float32)
    assert in_training.reconstruction_fid(
        inception_fn, images, images.copy(), BATCH
    ) == pytest.approx(0.0, abs=0.05)
    blurred = 0.5 * images + 0.5 * images.mean(axis=(1, 2), keepdims=True)
    rfid = in_training.reconstruction_fid(inception_fn, images, blurred, BATCH)
    assert np.isfinite(rfid) and rfid > 1.0


def test_tokenizer_evaluation_reports_rfid(inception_fn):
    config = tiny_config("unused", stage="tokenizer")
    trainer = train_tokenizer.TokenizerTrainer(config)
    params = _random_variables(config)[0]["params"]
    images = np.random.default_rng(2).uniform(0, 1, (BATCH, 16, 16, 3)).astype(np.float32)
    mask = np.arange(BATCH) < BATCH - 2  # two padding rows
    batches = [{"image": images, "mask": mask}]
    plain, _, _ = train_tokenizer.evaluate_reconstruction(trainer, params, batches, 0)
    assert "eval_rfid" not in plain
    scored, inputs, _ = train_tokenizer.evaluate_reconstruction(
        trainer, params, batches, 0, inception_fn=inception_fn
    )
    assert len(inputs) == BATCH - 2
    assert np.isfinite(scored["eval_rfid"]) and scored["eval_rfid"] > 1.0
    assert scored["eval_psnr"] == pytest.approx(plain["eval_psnr"])


def test_tokenizer_evaluation_rfid_is_zero_for_perfect_reconstructions(inception_fn):
    images = np.random.default_rng(2).uniform(0, 1, (BATCH, 16, 16, 3)).astype(np.float32)
    batches = [{"image": images, "mask": np.arange(BATCH) < BATCH - 2}]

    class Identity:
        """A perfect tokenizer: reconstructions equal the inputs."""

        config = config_lib.base_config()

        def reconstruct(self, params, images):
            return images, np.zeros((len(images), 4, 4), np.int32)

    perfect, _, _ = train_tokenizer.evaluate_reconstruction(
        Identity(), None, batches, 0, inception_fn=inception_fn
    )
    assert perfect["eval_rfid"] == pytest.approx(0.0, abs=0.05)


# --------------------------------------------------------------------- transformer: FID/IS


def test_sample_quality_scores_samples_and_caches_the_reference(
    data_dir, inception_fn, tmp_path, monkeypatch
):
    config = _metrics_config(data_dir, "<loaded>", **{"evaluation.keep_reference_features": True})
    tokenizer_variables, transformer_params = _random_variables(config)
    quality = in_training.SampleQuality(config, tmp_path, inception_fn)
    result = quality(tokenizer_variables, transformer_params)
    for key in ("fid", "inception_score", "inception_score_std", "precision", "recall"):
        assert np.isfinite(result[key]), (key, result)
    assert result["fid"] > 0.0 and 1.0 <= result["inception_score"] <= BATCH / 2
    cached = metrics.load_statistics(tmp_path / in_training.REFERENCE_FILE)
    assert cached["features"].shape == (BATCH, 2048) and int(cached["num_examples"]) == BATCH

    # The samples are the one sampler's, with the config's options at the training dtype.
    pipe = quality.pipeline
    assert quality.options == pipe.options() and quality.options.dtype == "float32"
    images = pipe.generate(samples.all_labels(BATCH, config.num_classes), quality.rng)
    want = metrics.fid_to_reference(inception_fn(images)["pool_3"], cached["mu"], cached["sigma"])
    assert result["fid"] == pytest.approx(want, rel=1e-4)

    # New weights reach the same pipeline; the old ones give the old value back.
    shifted = jax.tree.map(lambda x: x * 1.5, transformer_params)
    assert quality(tokenizer_variables, shifted)["fid"] != pytest.approx(result["fid"], rel=1e-3)
    assert quality.pipeline is pipe
    assert quality(tokenizer_variables, transformer_params)["fid"] == pytest.approx(
        result["fid"], rel=1e-4
    )

    # A restart reads the cached reference instead of recomputing it; the fixed seed gives
    # the same samples, hence the same values.
    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached reference should have been used")

    monkeypatch.setattr(reference_sets, "eval_split_features", no_recompute)
    again = in_training.SampleQuality(config, tmp_path, inception_fn)
    assert again(tokenizer_variables, transformer_params)["fid"] == pytest.approx(
        result["fid"], rel=1e-4
    )


def test_sample_quality_reads_an_adm_reference_batch(inception_fn, tmp_path):
    """A given ADM batch: FID from its mu/sigma, precision/recall from its images' features."""
    config = _metrics_config("unused", "<loaded>", **{"evaluation.keep_reference_features": True})
    config.training.compute_dtype = "bfloat16"
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (BATCH, 16, 16, 3), dtype=np.uint8)
    features = inception_fn(images.astype(np.float32) / 255.0)["pool_3"]
    mu, sigma = metrics.compute_statistics(features)
    path = tmp_path / "VIRTUAL_digits16_labeled.npz"
    np.savez(path, images, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    config.evaluation.reference_statistics = str(path)
    quality = in_training.SampleQuality(config, tmp_path, inception_fn)
    assert quality.options.dtype == "bfloat16"
    tokenizer_variables, transformer_params = _random_variables(config)
    result = quality(tokenizer_variables, transformer_params)
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    np.testing.assert_allclose(quality.reference()["features"], features, rtol=1e-5, atol=1e-5)
    assert (
        "images" not in quality.reference() and not (tmp_path / in_training.REFERENCE_FILE).exists()
    )


class _Writer:
    """Collects what an evaluation hook writes."""

    def __init__(self):
        self.scalars: dict[int, dict[str, float]] = {}

    def write_scalars(self, step, scalars):
        self.scalars.setdefault(step, {}).update(scalars)

    def write_images(self, step, images):
        pass


def _captured_stage(monkeypatch, inception_fn, train_and_evaluate, config, workdir):
    """Runs `train_and_evaluate` up to the loop and returns the stage it hands the loop.

    The loop itself (compiling and running train steps, export) is replaced: the hooks are
    then called directly with a given state. The Inception network is the module's (one
    compiled batch shape); `load_inception` must still be called once, before the loop.
    """
    captured, loads = {}, []

    def load(config, mesh=None):
        loads.append(config.evaluation.inception_path)
        return inception_fn

    def run(config, workdir, stage, setup=None):
        assert loads, "the Inception network must be loaded before the loop starts"
        captured["stage"] = stage

    monkeypatch.setattr(in_training, "load_inception", load)
    monkeypatch.setattr(train_loop, "run", run)
    train_and_evaluate(config, str(workdir))
    assert len(loads) == 1
    return captured["stage"]


def test_transformer_stage_evaluation_writes_fid_and_inception_score(
    data_dir, inception_fn, tmp_path, monkeypatch
):
    config = _metrics_config(
        data_dir,
        "<module network>",
        **{"logging.eval_every_steps": 2, "evaluation.every_steps": 4},
    )
    tokenizer_variables, transformer_params = _random_variables(config)
    pretrained.save_pretrained(tmp_path / "tokenizer", config, tokenizer_variables)
    config.training.tokenizer_checkpoint = str(tmp_path / "tokenizer")
    workdir = tmp_path / "run"
    stage = _captured_stage(
        monkeypatch, inception_fn, train_transformer.train_and_evaluate, config, workdir
    )
    state = train_transformer.TrainState(np.int32(4), transformer_params, None, None)
    writer = _Writer()
    stage.on_eval(state, 2, writer)  # held-out loss only: evaluation.every_steps=4
    stage.on_eval(state, 4, writer)
    assert set(writer.scalars[2]) == {"eval_loss", "eval_masked_accuracy"}
    scores = writer.scalars[4]
    assert {"eval_loss", "fid", "inception_score", "inception_score_std"} <= set(scores)
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0.0
    assert np.isfinite(scores["inception_score"]) and "precision" not in scores
    stats = metrics.load_statistics(workdir / in_training.REFERENCE_FILE)
    assert int(stats["num_examples"]) == BATCH and "features" not in stats


def test_tokenizer_stage_evaluation_writes_rfid(data_dir, inception_fn, tmp_path, monkeypatch):
    config = _metrics_config(
        data_dir,
        "<module network>",
        stage="tokenizer",
        **{"tokenizer_training.batch_size": BATCH, "tokenizer_training.ema_decay": 0.0},
    )
    stage = _captured_stage(
        monkeypatch, inception_fn, train_tokenizer.train_and_evaluate, config, tmp_path
    )
    params = _random_variables(config)[0]["params"]
    state = train_tokenizer.TokenizerState(
        np.int32(2), params, None, None, {}, {}, np.zeros(2), np.zeros(32)
    )
    writer = _Writer()
    stage.on_eval(state, 2, writer)
    assert np.isfinite(writer.scalars[2]["eval_rfid"]) and writer.scalars[2]["eval_rfid"] > 0.0
    assert "eval_psnr" in writer.scalars[2]


# --------------------------------------------------------------------- several processes

_GATHER_SCRIPT = """
import json, sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

port, index, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(
    f"127.0.0.1:{port}", num_processes=2, process_id=index, initialization_timeout=120
)
from maskgit_jax import multihost
from maskgit_jax.evaluation import samples

rows = np.full((3 - index, 2), float(index))  # uneven shares: 3 rows and 2 rows
mesh = Mesh(np.array(jax.devices()), ("data",))
value = np.arange(16.0).reshape(8, 2)
sharded = jax.make_array_from_callback(
    value.shape, NamedSharding(mesh, PartitionSpec("data")), lambda i: value[i]
)
result = {
    "gathered": multihost.gather_rows(rows).tolist(),
    "labels": samples.process_share(5, 10).labels.tolist(),
    "row_offset": samples.process_share(5, 10).row_offset,
    "copy": multihost.host_copy({"w": sharded})["w"].tolist(),
}
with open(out, "w") as f:
    json.dump(result, f)
jax.distributed.shutdown()
"""


def test_gather_of_uneven_shares_and_sharded_parameters_across_processes(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        env.pop(name, None)
    outs = [tmp_path / f"out_{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GATHER_SCRIPT, str(port), str(i), str(outs[i])],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        logs = [proc.communicate(timeout=180)[0].decode(errors="replace") for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    results = [json.loads(out.read_text()) for out in outs]
    for result in results:
        assert result["gathered"] == [[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2
        assert result["copy"] == np.arange(16.0).reshape(8, 2).tolist()
    assert results[0]["labels"] + results[1]["labels"] == [0, 1, 2, 3, 4]
    assert [result["row_offset"] for result in results] == [0, 3]


# ---------------------------------------------------------------------- errors and config


def test_missing_inception_file_stops_training_before_it_starts(data_dir, tmp_path):
    missing = str(tmp_path / "classify_image_graph_def.pb")
    config = _metrics_config(data_dir, missing)
    config.training.tokenizer_checkpoint = str(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="evaluation.inception_path=.*inception-2015"):
        train_transformer.train_and_evaluate(config, str(tmp_path / "transformer"))
    config.stage = "tokenizer"
    with pytest.raises(FileNotFoundError, match="evaluation.inception_path"):
        train_tokenizer.train_and_evaluate(config, str(tmp_path / "tokenizer"))
    assert not (tmp_path / "transformer").exists() and not (tmp_path / "tokenizer").exists()


def test_missing_reference_statistics_is_reported_before_sampling(inception_fn, tmp_path):
    config = config_lib.base_config()
    config.evaluation.inception_path = "<loaded>"
    config.evaluation.reference_statistics = str(tmp_path / "stats.npz")
    with pytest.raises(FileNotFoundError, match="--mode=reference"):
        in_training.SampleQuality(config, tmp_path, inception_fn)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="64-d features .* are 2048-d"):
        in_training.SampleQuality(config, tmp_path, inception_fn)
    config.evaluation.reference_statistics = ""
    config.sampling.num_steps = 0
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        in_training.SampleQuality(config, tmp_path, inception_fn)
    config.sampling.num_steps = 8
    config.evaluation.batch_size = 12
    with pytest.raises(ValueError, match="multiple of this process's 8 devices"):
        in_training.SampleQuality(config, tmp_path, inception_fn)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_samples", 1, "at least 2 samples"),
        ("batch_size", 0, "batch_size=0"),
        ("inception_score_splits", 0, "inception_score_splits"),
        ("every_steps", 15_000, "multiple of logging.eval_every_steps=10000"),
        ("reference_examples", 1, "reference_examples"),
    ],
)
def test_validate_checks_the_evaluation_section(field, value, message):
    config = config_lib.base_config()
    config.training.pretokenized_dir = "tokens"
    config.evaluation[field] = value
    config_lib.validate(config)  # metrics off: nothing to check
    config.evaluation.inception_path = "inception.pb"
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_validate_needs_evaluations_when_metrics_are_on():
    config = config_lib.base_config()
    config.training.pretokenized_dir = "tokens"
    config.evaluation.inception_path = "inception.pb"
    config.evaluation.every_steps = 20_000
    config_lib.validate(config)
    config.logging.eval_every_steps = 0
    with pytest.raises(ValueError, match="eval_every_steps=0"):
        config_lib.validate(config)


def test_configs_saved_without_an_evaluation_section_still_work():
    saved = json.loads(config_lib.base_config().to_json())
    del saved["evaluation"]
    config = ml_collections.ConfigDict(saved)  # as pretrained.load_config reads config.json
    config.training.pretokenized_dir = "tokens"
    config_lib.validate(config)
    assert not in_training.enabled(config) and in_training.due(config, 7)
    settings = config_lib.evaluation_settings(config)
    assert settings.num_samples == 10_000 and settings.inception_path == ""
