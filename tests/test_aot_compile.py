"""Ahead-of-time compilation of the real train steps on the 8 fake CPU devices (no libtpu), and
for compile-only GPUs where JAX's CUDA plugin is installed (no GPU needed)."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import types

import ml_collections
import pytest

from maskgit_jax import aot_compile, config_lib, gpu_targets
from maskgit_jax.models import attention

REPO = pathlib.Path(__file__).resolve().parents[1]
CUDA_PLUGIN = gpu_targets.cuda_plugin_installed()


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


def test_stage_is_built_for_the_topologys_platform():
    """A TPU or GPU step compiled from this CPU machine takes that platform's attention."""
    models = {
        platform: aot_compile._built_stage(tiny_config(), "transformer", True, platform)[
            0
        ].trainer.model
        for platform in ("cpu", "tpu", "gpu")
    }
    assert models["cpu"].attention_implementation == attention.EINSUM
    assert models["cpu"].attention_block_bytes == attention.CPU_BLOCK_BYTES
    assert models["tpu"].attention_implementation == attention.XLA
    assert models["gpu"].attention_implementation == attention.CUDNN
    assert models["tpu"].attention_block_bytes is None is models["gpu"].attention_block_bytes
    assert [aot_compile.platform_of(t) for t in ("cpu:8", "v5e:4x4", "h100:8", "H200:2x8")] == [
        "cpu",
        "tpu",
        "gpu",
        "gpu",
    ]


def test_gpu_topology_shapes():
    assert gpu_targets.parse_count("h100") == (1, 1)
    assert gpu_targets.parse_count("h100:8") == (1, 8)
    assert gpu_targets.parse_count("h200:4x8") == (4, 8)
    for bad in ("h100:0", "h100:2x", "h100:eight", "h100:1x2x4"):
        with pytest.raises(ValueError, match="a GPU topology is <gpu>:<GPUs>"):
            gpu_targets.parse_count(bad)


def test_gpu_budget_is_the_share_of_memory_jax_takes(monkeypatch):
    monkeypatch.delenv(gpu_targets.MEM_FRACTION_VARIABLE, raising=False)
    budget, source, peak = aot_compile._memory_budget("h100:8", 8, None)
    assert budget == pytest.approx(81559 / 1024 * 0.75)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in source and peak == 989
    monkeypatch.setenv(gpu_targets.MEM_FRACTION_VARIABLE, "0.9")
    assert aot_compile._memory_budget("h200:1", 1, None)[0] == pytest.approx(143771 / 1024 * 0.9)
    assert aot_compile._memory_budget("h200:1", 1, 10.0)[:2] == (10.0, "--hbm_gib")


@pytest.mark.skipif(CUDA_PLUGIN, reason="JAX's CUDA plugin is installed here")
def test_gpu_topology_without_the_cuda_plugin_says_how_to_install():
    with pytest.raises(gpu_targets.CudaPluginMissingError, match=r'pip install "jax\[cuda12\]=='):
        aot_compile.topology_devices("h100:8")


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax[cuda12]), no GPU")
def test_gpu_topology_compiles_through_the_command_line():
    """`python -m maskgit_jax.aot_compile --topology=h100:2` as a user types it, without a GPU."""
    command = [
        sys.executable,
        "-m",
        "maskgit_jax.aot_compile",
        "--config=configs/digits.py",
        "--config.mesh.shape=(1,2,1)",
    ]
    env = {**os.environ, gpu_targets.MEM_FRACTION_VARIABLE: "0.5"}

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )

    done = run("--topology=h100:2", "--pretokenized")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "topology h100:2: 2 devices, mesh data=1 x fsdp=2 x tensor=1" in done.stdout
    assert "h100 memory x 0.5" in done.stdout and "no XLA cost analysis" in done.stdout
    tight = run("--topology=h200:1x2", "--hbm_gib=0.0001")
    assert tight.returncode == 1, tight.stderr[-3000:]
    assert "does not fit: needs" in tight.stderr


def test_report_without_cost_analysis_bounds_the_step_by_model_flops():
    """GPU compile-only programs have no cost analysis: the lower bound uses the model's FLOPs."""
    report = aot_compile.AotReport(
        topology="h100:8",
        stage="transformer",
        batch_form="tokens",
        mesh_shape={"data": 1, "fsdp": 8, "tensor": 1},
        num_devices=8,
        global_batch=256,
        compute_dtype="bfloat16",
        remat=False,
        argument_bytes=2**30,
        output_bytes=2**30,
        alias_bytes=2**30,
        temp_bytes=3 * 2**30,
        generated_code_bytes=0,
        peak_bytes=None,
        flops_per_device=None,
        model_flops=8 * 989e12 * 0.01,
        budget_gib=59.7,
        budget_source="h100 memory x 0.75",
        peak_bf16_tflops=989,
    )
    text = report.format()
    assert "no XLA cost analysis" in text and "XLA / model" not in text
    assert "989 TFLOP/s bf16 peak: 10.0 ms (a lower bound)" in text
    assert report.total_bytes == 4 * 2**30 and report.fits
