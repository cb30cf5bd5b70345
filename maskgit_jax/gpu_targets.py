"""Compile-only NVIDIA GPUs: the device descriptions XLA needs to compile for a GPU it lacks.

`aot_compile --topology=h100:8` compiles the real train step for GPUs from a CPU machine, as
it does for TPU topologies through libtpu. XLA's CUDA compiler reads the device from a
`GpuTargetConfigProto` instead of a live GPU; `target_config` writes one from the published
figures of each GPU in `GPUS`. The CUDA plugin (`pip install "jax[cuda12]"`) must be present,
the driver and the GPU need not be.
"""

import dataclasses
import importlib.util
import os

import jax

# What jax[cuda12] 0.10.2 is built against (its plugin's cudnn_build_version and
# cuda_runtime_build_version); cuDNN 9.8 is also the oldest it starts with.
_DNN_VERSION = (9, 8)
_CUDA_RUNTIME_VERSION = (12, 9)
# How JAX's GPU client sizes its memory pool: this fraction of the GPU's memory, taken at start.
MEM_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """One GPU model as XLA sees it (CUDA's device properties) and its dense bf16 peak."""

    description: str
    compute_capability: tuple[int, int]
    core_count: int
    memory_mib: int
    memory_bandwidth_bytes_per_s: float
    l2_cache_mib: int
    clock_rate_ghz: float
    peak_bf16_tflops: float

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


# SXM boards, CUDA's total memory (MiB, as nvidia-smi shows it) and NVIDIA's data-sheet rates.
GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 81559, 3.35e12, 50, 1.98, 989),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 143771, 4.8e12, 50, 1.98, 989),
}


class CudaPluginMissingError(RuntimeError):
    """A GPU topology was asked for but JAX's CUDA plugin (the GPU compiler) is not installed."""


def target_config(spec: GpuSpec) -> str:
    """The GpuTargetConfigProto (text format) of `spec`, as the CUDA plugin takes it."""
    major, minor = spec.compute_capability
    return "\n".join(
        [
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            "  shared_memory_per_block_optin: 232448",
            "  shared_memory_per_core: 233472",
            "  threads_per_core_limit: 2048",
            f"  core_count: {spec.core_count}",
            "  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {int(spec.memory_bandwidth_bytes_per_s)}",
            f"  l2_cache_size: {spec.l2_cache_mib * 2**20}",
            f"  clock_rate_ghz: {spec.clock_rate_ghz}",
            f"  device_memory_size: {spec.memory_mib * 2**20}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            f"dnn_version_info {{ major: {_DNN_VERSION[0]} minor: {_DNN_VERSION[1]} }}",
            f"runtime_version {{ major: {_CUDA_RUNTIME_VERSION[0]} "
            f"minor: {_CUDA_RUNTIME_VERSION[1]} }}",
            f'device_description_str: "{spec.description}"',
        ]
    )


def parse_count(topology: str) -> tuple[int, int]:
    """'h100:8' -> (1 host, 8 GPUs each); 'h100:4x8' -> (4, 8); 'h100' -> (1, 1)."""
    _, _, shape = topology.partition(":")
    parts = shape.lower().split("x") if shape else ["1"]
    if len(parts) == 1:
        parts = ["1", *parts]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"--topology={topology}: a GPU topology is <gpu>:<GPUs> or <gpu>:<hosts>x<GPUs per "
            f"host>, e.g. h100:8 or h100:4x8."
        )
    return int(parts[0]), int(parts[1])


def mem_fraction() -> float:
    """The share of each GPU's memory JAX's client takes for its pool (75% unless set)."""
    value = os.environ.get(MEM_FRACTION_VARIABLE)
    return float(value) if value else DEFAULT_MEM_FRACTION


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (jax[cuda12]'s `jax_plugins.xla_cuda12`) is importable."""
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def compile_only_devices(gpu: GpuSpec, topology: str) -> list:
    """Compile-only CUDA devices of `gpu` in `topology` ('h100:8', 'h200:2x8'), no GPU needed."""
    hosts, per_host = parse_count(topology)
    if not cuda_plugin_installed():
        raise CudaPluginMissingError(
            f"--topology={topology} needs JAX's CUDA compiler, which is not part of the test "
            f'install: pip install "jax[cuda12]=={jax.__version__}" (no GPU or driver needed '
            "to compile)."
        )
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="cuda",
            target_config=target_config(gpu),
            topology=f"1x{hosts}x{per_host}",
        )
    except NotImplementedError as error:
        raise CudaPluginMissingError(
            f"--topology={topology}: JAX's CUDA plugin is installed but did not start ({error}). "
            "Without a GPU it starts only when JAX_PLATFORMS=cpu (or "
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) is set before JAX starts; "
            "`python -m maskgit_jax.aot_compile` sets it."
        ) from error
    return list(description.devices)
