"""`benchmarks/op_profile.py`: ops named after the model part they compute, and the script runs."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maskgit_jax.models import build_transformer
from tests.conftest import REPO_ROOT
from tests.test_official_checkpoint import TINY_CONFIG_SOURCE, tiny_config

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import op_profile  # noqa: E402 (found through the path above)


def _parts_of_compiled_loss_gradient(dtype) -> set[str]:
    """The parts `op_profile` names in the optimized HLO of a tiny transformer's loss gradient."""
    model = build_transformer(tiny_config(), dtype=dtype)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 20)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ids))

    def loss(p):
        return jnp.mean(model.apply(p, ids).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    instructions = op_profile.parse_hlo(text)
    assert instructions and all(op.body for op in instructions.values())
    return {op_profile.part_of(op) for op in instructions.values()}


def test_forward_and_backward_ops_are_named_by_model_part():
    for dtype in (jnp.float32, jnp.bfloat16):
        parts = _parts_of_compiled_loss_gradient(dtype)
        for direction in ("forward", "backward"):
            assert f"{direction}: projection matmuls" in parts, (dtype, sorted(parts))
            assert f"{direction}: LayerNorm" in parts, (dtype, sorted(parts))
        assert "forward: MLP GELU" in parts, (dtype, sorted(parts))


def test_fusion_bodies_decide_the_part():
    matmul = op_profile.Instruction(
        "f32[8,16]",
        "jit(f)/jvp(MaskedTransformer)/TransformerLayer_0/Mlp_0/intermediate_output/dot_general",
        frozenset({"parameter", "dot"}),
    )
    cast = op_profile.Instruction(
        "bf16[16,32]",
        "jit(f)/jvp(MaskedTransformer)/TransformerLayer_0/Mlp_0/layer_output/convert_element_type",
        frozenset({"parameter", "convert"}),
    )
    gelu = op_profile.Instruction(
        "bf16[8,32]",
        "jit(f)/MaskedTransformer/TransformerLayer_0/Mlp_0/layer_output/convert_element_type",
        frozenset({"parameter", "add", "tanh", "multiply", "convert"}),
    )
    layout = op_profile.Instruction("bf16[32,8]", "", frozenset({"copy", "transpose"}))
    assert op_profile.part_of(matmul) == "forward: projection matmuls"
    assert op_profile.part_of(cast) == "forward: dtype converts"
    assert op_profile.part_of(gelu) == "forward: MLP GELU"
    assert op_profile.part_of(layout) == "XLA-inserted copies and transposes"


def _run_script(tmp_path, *flags: str) -> str:
    config = tmp_path / "tiny.py"
    config.write_text(TINY_CONFIG_SOURCE)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "benchmarks/op_profile.py", f"--config={config}", "--top=3", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _part_times(output: str) -> dict[str, float]:
    """{part: ms} from the script's table of parts."""
    rows = output.split("share\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {row[:62].strip(): float(row[62:].split()[0]) for row in rows}


def test_script_profiles_the_train_step(tmp_path):
    output = _run_script(tmp_path, "--program=train", "--dtype=float32", "--batch=2")
    parts = _part_times(output)
    # A part is listed when traced ops were named after it.
    assert {"forward: projection matmuls", "backward: projection matmuls"} <= set(parts)
    total_ms = float(output.split("op time summed over threads: ")[1].split(" ms")[0])
    assert total_ms > 0
    np.testing.assert_allclose(sum(parts.values()), total_ms, rtol=0.01, atol=0.01)
    assert "slowest 3 ops" in output


def test_script_profiles_decoding(tmp_path):
    output = _run_script(tmp_path, "--program=decode", "--dtype=bfloat16", "--batch=2")
    parts = _part_times(output)
    assert "forward: projection matmuls" in parts
    assert not any(part.startswith("backward") for part in parts)
