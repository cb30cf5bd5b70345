r"""Ahead-of-time compilation of a training step for a Cloud TPU or GPU topology, from a CPU.

Answers "does this config fit, and how many FLOPs is a step" before any TPU or GPU is rented:

  pip install --target /opt/libtpu "libtpu==0.0.42.*"   # matches jax 0.10.2; not in the
                                                        # test install, only needed here
  PYTHONPATH=/opt/libtpu:. python -m maskgit_jax.aot_compile --config=configs/imagenet256.py \
      --topology=v5e:16x16 --config.mesh.shape="(16,16,1)" --pretokenized

  pip install "jax[cuda12]==0.10.2"   # the CUDA compiler; no GPU or driver needed
  python -m maskgit_jax.aot_compile --config=configs/imagenet256.py --topology=h100:8 \
      --config.mesh.shape="(1,8,1)" --pretokenized

GPU topologies are `<gpu>:<GPUs>` or `<gpu>:<hosts>x<GPUs per host>` for the GPUs of
`gpu_targets.GPUS` (h100, h200), compiled through XLA's CUDA compiler from a description of the
device (`gpu_targets`). Without a GPU, XLA cannot autotune Triton's matmul tilings (the
imagenet256 step fails to compile with them), so cuBLAS takes every matmul; on the GPU the
autotuner may pick Triton instead, which changes speed, not the memory a step needs much.
XLA gives GPU compile-only programs no cost analysis: the report's FLOPs are the model's.

The step compiled is the real one: the `Stage` of the stage's `build_stage` (the one
training runs, its attention chosen for the topology's platform, not this machine's), jitted
by `train_loop.jit_train_step` on `train_loop.create_sharded_setup`, so the state shardings
(logical rules with FSDP fallback), the batch sharding and the donation of the state are
those of training. The mesh is `sharding.create_mesh(config.mesh, devices=)` over the
topology's devices, so `--config.mesh.shape` applies unchanged. Inputs are ShapeDtypeStructs
carrying their shardings; nothing is allocated.

Batch forms of the transformer stage:
  * default: {"image", "label"} images, tokenized inside the step by the frozen tokenizer,
    whose variables are a constant input of the step (ShapeDtypeStructs with the FSDP
    fallback shardings the loop gives them). Compiles the tokenizer's encoder too.
  * `--pretokenized`: {"tokens" int16 [B, h, w], "label"} as `pretokenized.train_batches`
    yields them; only the transformer is compiled (what `training.pretokenized_dir` runs).

`--topology=cpu:8` compiles for 8 (fake) CPU devices instead: no libtpu needed. The budget
there is the host memory divided by the devices, or `--hbm_gib`.

Per-chip memory is `compiled.memory_analysis()` of the SPMD program (one device's share):
total = arguments + outputs - alias + temporaries (outputs aliased to donated arguments are
counted once). FLOPs are `compiled.cost_analysis()["flops"]`, also per device. The command
exits with status 1 and a "does not fit" message when the total exceeds the chip's HBM (on a
GPU, the share of it JAX's client takes: XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default).
"""

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from maskgit_jax import config_lib, gpu_targets, sharding
from maskgit_jax.training import flops
from maskgit_jax.training import loop as train_loop

GIB = 2**30
LIBTPU_REQUIREMENT = "libtpu==0.0.42.*"


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip HBM and dense bf16 peak of a TPU generation (public Cloud TPU figures)."""

    hbm_gib: float
    peak_bf16_tflops: float


# Topology prefix (before ':') -> chip. v5e and v6e have one TensorCore per chip; v4 and v5p
# are megacore, one JAX device per chip.
CHIPS = {
    "v4": ChipSpec(hbm_gib=32, peak_bf16_tflops=275),
    "v5e": ChipSpec(hbm_gib=16, peak_bf16_tflops=197),
    "v5p": ChipSpec(hbm_gib=95, peak_bf16_tflops=459),
    "v6e": ChipSpec(hbm_gib=32, peak_bf16_tflops=918),
}

STAGES = ("transformer", "tokenizer")
# Deviceless GPU compiles cannot autotune Triton's matmul tilings; cuBLAS takes every dot.
_GPU_COMPILE_ONLY_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


class LibtpuMissingError(RuntimeError):
    """A TPU topology was asked for but libtpu (the TPU compiler) is not importable."""


class DoesNotFitError(RuntimeError):
    """The compiled step needs more memory per chip than the chip has."""


@dataclasses.dataclass
class AotReport:
    """What one ahead-of-time compilation measured (memory per device, FLOPs per device)."""

    topology: str
    stage: str
    batch_form: str
    mesh_shape: dict[str, int]
    num_devices: int
    global_batch: int
    compute_dtype: str
    remat: bool
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    peak_bytes: int | None
    flops_per_device: float | None
    model_flops: float | None
    budget_gib: float | None
    budget_source: str
    peak_bf16_tflops: float | None

    @property
    def total_bytes(self) -> int:
        """Per-device need: arguments + outputs - alias + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        """True when no budget applies or the total is within it."""
        return self.budget_gib is None or self.total_bytes <= self.budget_gib * GIB

    def format(self) -> str:
        """A human-readable table of the measurements."""
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        rows = [
            f"topology {self.topology}: {self.num_devices} devices, mesh {mesh}",
            f"stage {self.stage} ({self.batch_form}), global batch {self.global_batch}, "
            f"compute {self.compute_dtype}, remat {self.remat}",
            "per-device memory (GiB):",
            f"  arguments    {self.argument_bytes / GIB:9.3f}",
            f"  outputs      {self.output_bytes / GIB:9.3f}",
            f"  alias        {self.alias_bytes / GIB:9.3f}  (outputs reusing donated arguments)",
            f"  temporaries  {self.temp_bytes / GIB:9.3f}",
            f"  total        {self.total_bytes / GIB:9.3f}  (arguments + outputs - alias + temp)",
            f"  code         {self.generated_code_bytes / GIB:9.3f}",
        ]
        if self.peak_bytes:
            rows.append(f"  peak (XLA)   {self.peak_bytes / GIB:9.3f}")
        if self.budget_gib is not None:
            rows.append(
                f"  budget       {self.budget_gib:9.3f}  ({self.budget_source}): "
                f"{100 * self.total_bytes / (self.budget_gib * GIB):.0f}% used"
            )
        if self.flops_per_device is None:
            rows.append("FLOPs per step: no XLA cost analysis for this platform's programs")
        else:
            rows.append(
                f"FLOPs per step: {self.flops_per_device:.4g} per device, "
                f"{self.flops_per_device * self.num_devices:.4g} in all (XLA cost analysis)"
            )
        if self.model_flops:
            ratio = ""
            if self.flops_per_device is not None:
                xla_over_model = self.flops_per_device * self.num_devices / self.model_flops
                ratio = f" (XLA / model = {xla_over_model:.2f})"
            rows.append(
                f"model FLOPs per step (3 x forward matmuls): {self.model_flops:.4g}{ratio}"
            )
        # XLA's count where there is one, else the model's share per device.
        step_flops = self.flops_per_device
        if step_flops is None and self.model_flops:
            step_flops = self.model_flops / self.num_devices
        if self.peak_bf16_tflops and step_flops:
            ideal = step_flops / (self.peak_bf16_tflops * 1e12)
            rows.append(
                f"step time at 100% of the {self.peak_bf16_tflops:g} TFLOP/s bf16 peak: "
                f"{1e3 * ideal:.1f} ms (a lower bound)"
            )
        return "\n".join(rows)


def chip_generation(topology: str) -> str:
    """'v5e:16x16' -> 'v5e'; 'h100:8' -> 'h100'; 'cpu:8' -> 'cpu'."""
    return topology.split(":", 1)[0].strip().lower()


def platform_of(topology: str) -> str:
    """The JAX platform a topology's devices are: 'cpu', 'gpu' or 'tpu' (the default)."""
    generation = chip_generation(topology)
    if generation == "cpu":
        return "cpu"
    return "gpu" if generation in gpu_targets.GPUS else "tpu"


def topology_devices(topology: str) -> list[Any]:
    """The devices of `topology`: TPU topologies via libtpu, GPUs via `gpu_targets`, or CPUs.

    'cpu' uses every CPU device; 'cpu:N' the first N (set XLA_FLAGS or JAX_NUM_CPU_DEVICES
    for more than one, before JAX starts; `main` does it for you).
    """
    generation = chip_generation(topology)
    if generation == "cpu":
        devices = jax.devices("cpu")
        _, _, count = topology.partition(":")
        if not count:
            return list(devices)
        count = int(count)
        if count > len(devices):
            raise ValueError(
                f"--topology={topology} needs {count} CPU devices but JAX has {len(devices)}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={count} (or "
                f"JAX_NUM_CPU_DEVICES={count}) before JAX starts."
            )
        return list(devices[:count])
    if generation in gpu_targets.GPUS:
        return gpu_targets.compile_only_devices(gpu_targets.GPUS[generation], topology)
    if generation not in CHIPS:
        raise ValueError(
            f"--topology={topology}: unknown chip {generation!r}; use one of "
            f"{sorted(CHIPS)} (e.g. v5e:4x4, v5p:2x2x2), a GPU of {sorted(gpu_targets.GPUS)} "
            "(e.g. h100:8) or cpu:N."
        )
    from jax.experimental import topologies

    # libtpu warns loudly when it cannot find TPU workers; none are needed to compile.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except RuntimeError as error:
        if "not installed" not in str(error):
            raise
        raise LibtpuMissingError(
            f"--topology={topology} needs the TPU compiler, libtpu, which is not part of the "
            f"test install. Install it outside the repository and put it on PYTHONPATH:\n"
            f'  pip install --target /opt/libtpu "{LIBTPU_REQUIREMENT}"   '
            f"# the version jax {jax.__version__} pins\n"
            f"  PYTHONPATH=/opt/libtpu:. python -m maskgit_jax.aot_compile ...\n"
            f"(or use --topology=cpu:8 for fake CPU devices). Original error: {error}"
        ) from error
    return list(description.devices)


def _memory_budget(topology: str, num_devices: int, hbm_gib: float | None) -> tuple:
    """(GiB per device or None, where the figure comes from, bf16 peak TFLOP/s or None)."""
    generation = chip_generation(topology)
    chip = CHIPS.get(generation) or gpu_targets.GPUS.get(generation)
    peak = chip.peak_bf16_tflops if chip else None
    if hbm_gib is not None:
        return hbm_gib, "--hbm_gib", peak
    if generation in gpu_targets.GPUS:
        fraction = gpu_targets.mem_fraction()
        source = (
            f"{generation} memory x {fraction:g}, the share JAX takes "
            f"({gpu_targets.MEM_FRACTION_VARIABLE})"
        )
        return chip.memory_gib * fraction, source, peak
    if chip:
        return float(chip.hbm_gib), f"{generation} HBM", peak
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None, "no budget", peak
    return host / GIB / num_devices, f"host memory / {num_devices} devices", peak


def _batch_abstract(config, stage: str, pretokenized: bool, global_batch: int) -> dict:
    """Shapes and dtypes of one global batch as the loop feeds it."""
    label = jax.ShapeDtypeStruct((global_batch,), jnp.int32)
    if stage == "transformer" and pretokenized:
        side = config_lib.tokens_per_side(config)
        dtype = jnp.int16 if config.tokenizer.codebook_size <= 2**15 else jnp.int32
        return {"tokens": jax.ShapeDtypeStruct((global_batch, side, side), dtype), "label": label}
    size = config.image_size
    image = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32)
    return {"image": image, "label": label}


def _built_stage(config: ml_collections.ConfigDict, stage: str, pretokenized: bool, backend: str):
    """The `stage`'s `build_stage` for `backend` on abstract constants, and its model FLOPs.

    The constants are ShapeDtypeStructs: the frozen tokenizer of an image-batch transformer,
    the VGG16 of the tokenizer's perceptual loss (their weights do not matter). Model FLOPs
    are 3 x the transformer's forward matmul FLOPs over the global batch (codebook logits
    only, as the step computes), or None for the tokenizer.
    """
    if stage == "transformer":
        from maskgit_jax.checkpoints import official as official_checkpoint
        from maskgit_jax.training import transformer as train_transformer

        # The step's inputs are the batches this compiles for, not a pretokenized_dir's.
        config = config.copy_and_resolve_references()
        config.training.pretokenized_dir = ""
        tokenizer = None if pretokenized else official_checkpoint.abstract_tokenizer_params(config)
        built = train_transformer.build_stage(config, tokenizer, backend=backend)
        forward = flops.transformer_forward_flops(
            config, config.training.batch_size, num_logits=config.tokenizer.codebook_size
        )
        return built, 3 * forward
    from maskgit_jax.models.perceptual import abstract_vgg16_params
    from maskgit_jax.training import tokenizer as train_tokenizer

    perceptual = None
    if config.tokenizer_training.perceptual_weight > 0:
        perceptual = abstract_vgg16_params()
    return train_tokenizer.build_stage(config, perceptual), None


def compile_train_step(
    config: ml_collections.ConfigDict,
    topology: str,
    stage: str = "transformer",
    pretokenized: bool = False,
    hbm_gib: float | None = None,
) -> tuple[Any, AotReport]:
    """Lowers and compiles the sharded train step for `topology`; returns it and a report."""
    if stage not in STAGES:
        raise ValueError(f"--stage={stage!r}; use one of {STAGES}.")
    # Once, for the stage compiled; its inputs (tokenizer, data) are shapes here.
    config_lib.validate(config, stages=(stage,), inputs=False)
    devices = topology_devices(topology)
    mesh = sharding.create_mesh(config.mesh, devices=devices)
    platform = platform_of(topology)
    stage_and_trainer, model_flops = _built_stage(config, stage, pretokenized, platform)
    built = stage_and_trainer.stage
    setup = train_loop.create_sharded_setup(config, built, mesh=mesh)
    step_fn = train_loop.jit_train_step(setup, built)
    global_batch = built.training.batch_size
    state = sharding.with_shardings(setup.abstract_state, setup.state_shardings)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
        _batch_abstract(config, stage, pretokenized, global_batch),
    )
    constants = None
    if built.constants is not None:
        constants = sharding.with_shardings(built.constants, setup.constants_shardings)
    with setup.activate():
        options = _GPU_COMPILE_ONLY_OPTIONS if platform == "gpu" else None
        compiled = step_fn.lower(state, batch, constants).compile(compiler_options=options)

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    flops_per_device = (cost or {}).get("flops")  # GPU compile-only programs have none
    budget, source, peak = _memory_budget(topology, len(devices), hbm_gib)
    report = AotReport(
        topology=topology,
        stage=stage,
        batch_form="tokens" if stage == "transformer" and pretokenized else "images",
        mesh_shape={name: int(size) for name, size in mesh.shape.items()},
        num_devices=len(devices),
        global_batch=global_batch,
        compute_dtype=str(built.training.compute_dtype),
        remat=bool(built.training.get("remat", False)),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        peak_bytes=int(getattr(memory, "peak_memory_in_bytes", 0) or 0) or None,
        flops_per_device=None if flops_per_device is None else float(flops_per_device),
        model_flops=model_flops,
        budget_gib=budget,
        budget_source=source,
        peak_bf16_tflops=peak,
    )
    return compiled, report


def does_not_fit_message(report: AotReport) -> str:
    """The failure message, with concrete flags to try."""
    need = report.total_bytes / GIB
    where = f"{chip_generation(report.topology)} has {report.budget_gib:g} GiB"
    if report.budget_source != f"{chip_generation(report.topology)} HBM":
        where = f"the budget is {report.budget_gib:g} GiB ({report.budget_source})"
    hints = []
    shape = report.mesh_shape
    if shape.get("fsdp", 1) < report.num_devices and report.global_batch % report.num_devices == 0:
        hints.append(f'--config.mesh.shape="(1,{report.num_devices},1)" (shard the state fully)')
    elif shape.get("data", 1) > 1:
        hints.append("a larger fsdp axis in --config.mesh.shape")
    training = "training" if report.stage == "transformer" else "tokenizer_training"
    if report.stage == "transformer" and not report.remat:
        hints.append("--config.training.remat=True (recompute activations)")
    hints.append(f"--config.{training}.grad_accum_steps=2 (smaller micro-batches)")
    if platform_of(report.topology) == "gpu" and report.budget_source != "--hbm_gib":
        hints.append(f"{gpu_targets.MEM_FRACTION_VARIABLE}=0.9 (a larger share for JAX)")
    if report.compute_dtype == "float32":
        hints.append(f"--config.{training}.compute_dtype=bfloat16")
    return f"does not fit: needs {need:.2f} GiB per chip, {where}; try " + ", or ".join(hints) + "."


def run(
    config: ml_collections.ConfigDict,
    topology: str,
    stage: str = "transformer",
    pretokenized: bool = False,
    hbm_gib: float | None = None,
) -> AotReport:
    """Compiles, prints the report and raises DoesNotFitError when over the budget."""
    _, report = compile_train_step(config, topology, stage, pretokenized, hbm_gib)
    print(report.format(), flush=True)
    if not report.fits:
        raise DoesNotFitError(does_not_fit_message(report))
    return report


def _prepare_platforms(topology: str) -> None:
    """Before JAX starts: N fake CPU devices for 'cpu:N', or CPU as the platform for GPUs.

    With JAX_PLATFORMS=cpu the CUDA plugin starts (compile-only) without a GPU or driver.
    No-op once JAX has started.
    """
    if platform_of(topology) == "gpu":
        try:
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:
            pass  # backend already up; topology_devices() says what to set
        return
    _, _, count = topology.partition(":")
    if chip_generation(topology) != "cpu" or not count:
        return
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        pass  # backend already up; topology_devices() reports a shortfall


_FLAGS: dict[str, Any] = {}


def define_flags() -> None:
    """Defines the command-line flags (only when run as a program: main.py owns --config)."""
    from absl import flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file.", lock_config=True
    )
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology",
        "cpu:8",
        "Cloud TPU topology (v5e:4x4, v5p:2x2x2, ...), GPUs (h100:8, h200:2x8) or cpu:N.",
    )
    _FLAGS["stage"] = flags.DEFINE_enum("stage", "transformer", list(STAGES), "Which train step.")
    _FLAGS["pretokenized"] = flags.DEFINE_bool(
        "pretokenized",
        False,
        "Transformer batches of tokens (pretokenized_dir) instead of images + frozen tokenizer.",
    )
    _FLAGS["hbm_gib"] = flags.DEFINE_float(
        "hbm_gib", None, "Memory budget per device in GiB, replacing the chip's HBM."
    )
    flags.mark_flags_as_required(["config"])


def main(argv: Sequence[str]) -> None:
    """Command-line entry point (see the module docstring); exits 1 when it does not fit."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    topology = _FLAGS["topology"].value
    _prepare_platforms(topology)
    try:
        run(
            _FLAGS["config"].value,
            topology,
            stage=_FLAGS["stage"].value,
            pretokenized=_FLAGS["pretokenized"].value,
            hbm_gib=_FLAGS["hbm_gib"].value,
        )
    except (DoesNotFitError, LibtpuMissingError, gpu_targets.CudaPluginMissingError) as error:
        print(f"aot_compile: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
