"""XLA compiler options that make a forward-only program of a compute dtype fastest per backend.

On CPU, jaxlib 0.10 hands matmuls to YNNPACK by default. For bfloat16 operands that is the
AMX path (about 4x XLA's own dot). For float32 XLA's own dot is faster: the imagenet256
transformer forward at batch 8 runs 296 -> 263 ms per image, and class-conditional decoding
0.42 -> 0.47 images/s (`benchmarks/sample_speed.py --dtypes float32`, 2-core AMX Xeon). The
float32 train step gains nothing (4.35 s either way), so training keeps the defaults. The
imagenet256 VQ decoder (float32 always) runs 698-714 -> 594-615 ms per image, and the FID
Inception network 13.1-13.7 -> 25.8-26.1 images/s at batch 8.
Options go to `jax.jit(..., compiler_options=...)`, one program per option set.
"""

from typing import Any

import jax
import jax.numpy as jnp

# YNNPACK keeps its reduction fusions; dots fall back to XLA's own CPU dot.
_CPU_FLOAT32_FORWARD = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def forward_options(dtype: Any, platform: str | None = None) -> dict[str, str]:
    """Compiler options for a forward-only (sampling, evaluation) program computing in `dtype`.

    `platform` is the devices' platform ("cpu", "gpu", "tpu"); None means the default backend.
    Empty where the defaults are already the fastest.
    """
    platform = platform or jax.default_backend()
    if platform == "cpu" and jnp.dtype(dtype) == jnp.float32:
        return dict(_CPU_FLOAT32_FORWARD)
    return {}
