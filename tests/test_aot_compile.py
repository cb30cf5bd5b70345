"""Ahead-of-time compilation of the real train steps on the 8 fake CPU devices (no libtpu)."""

import importlib.util
import types

import ml_collections
import pytest

from maskgit_jax import aot_compile, config_lib


def tiny_config(mesh_shape=(2, 4, 1)) -> ml_collections.ConfigDict:
    """A few-kilobyte tokenizer and transformer over 1 + 16 tokens of 8x8 images."""
    c = config_lib.base_config()
    c.image_size = 8
    c.num_classes = 10
    c.tokenizer.update(
        filters=8,
        channel_multipliers=(1, 2),
        num_res_blocks=1,
        embedding_dim=8,
        codebook_size=16,
        norm_groups=4,
    )
    c.transformer.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.training.batch_size = 16
    c.tokenizer_training.batch_size = 16
    c.mesh.shape = mesh_shape
    return c


def _check_positive(report: aot_compile.AotReport) -> None:
    assert report.num_devices == 8
    assert report.argument_bytes > 0 and report.output_bytes > 0
    assert report.temp_bytes > 0 and report.total_bytes > 0
    assert report.flops_per_device > 0
    assert report.fits


def test_transformer_pretokenized_on_fake_cpu_mesh(capsys):
    report = aot_compile.run(tiny_config(), "cpu:8", pretokenized=True)
    _check_positive(report)
    assert report.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report.batch_form == "tokens"
    # The state is donated: its outputs alias its arguments.
    assert report.alias_bytes > 0
    # XLA's count includes the model's matmuls (plus softmax, norms, optimizer).
    assert report.flops_per_device * report.num_devices > 0.8 * report.model_flops
    printed = capsys.readouterr().out
    assert "total" in printed and "FLOPs per step" in printed


def test_transformer_with_tokenizer_constants():
    report = aot_compile.run(tiny_config(mesh_shape=(-1, 1, 1)), "cpu:8")
    _check_positive(report)
    assert report.batch_form == "images"
    assert report.mesh_shape["data"] == 8


def test_tokenizer_stage():
    report = aot_compile.run(tiny_config(), "cpu:8", stage="tokenizer")
    _check_positive(report)
    assert report.model_flops is None


def test_tiny_budget_does_not_fit(monkeypatch, capsys):
    """Through `main` (the command line's flags stubbed): message on stderr, status 1."""
    values = {
        "config": tiny_config(),
        "topology": "cpu:8",
        "stage": "transformer",
        "pretokenized": True,
        "hbm_gib": 0.0001,
    }
    flags = {name: types.SimpleNamespace(value=value) for name, value in values.items()}
    monkeypatch.setattr(aot_compile, "_FLAGS", flags)
    with pytest.raises(SystemExit) as exit_info:
        aot_compile.main(["aot_compile"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "does not fit: needs" in error and "GiB per chip" in error
    assert "the budget is 0.0001 GiB (--hbm_gib)" in error
    assert "--config.training.remat=True" in error


def test_bad_topologies():
    with pytest.raises(ValueError, match="needs 64 CPU devices"):
        aot_compile.topology_devices("cpu:64")
    with pytest.raises(ValueError, match="unknown chip"):
        aot_compile.topology_devices("v9z:2x2")


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed here"
)
def test_tpu_topology_without_libtpu_says_how_to_install():
    with pytest.raises(aot_compile.LibtpuMissingError, match="pip install .*libtpu==0.0.42"):
        aot_compile.topology_devices("v5e:2x2")
