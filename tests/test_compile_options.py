"""Per-dtype XLA options: which programs get them, that this jaxlib applies them, same outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import compile_options
from maskgit_jax.models import build_transformer
from maskgit_jax.sampling import pipeline
from tests.test_official_checkpoint import tiny_config


@pytest.mark.parametrize(
    "dtype, platform, expect_options",
    [
        ("float32", "cpu", True),
        (jnp.float32, "cpu", True),
        ("bfloat16", "cpu", False),  # YNNPACK's AMX dot is the fast one
        ("float32", "gpu", False),
        ("float32", "tpu", False),
    ],
)
def test_only_cpu_float32_forward_programs_get_options(dtype, platform, expect_options):
    assert bool(compile_options.forward_options(dtype, platform)) == expect_options


def _compiled_text(fn, options, *args) -> str:
    return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def test_cpu_float32_options_move_the_dot_out_of_ynnpack():
    """The option names and values are ones this jaxlib knows, and they change the program."""
    x = jnp.ones((256, 256), jnp.float32)
    options = compile_options.forward_options(jnp.float32, "cpu")
    default = _compiled_text(jnp.matmul, {}, x, x)
    tuned = _compiled_text(jnp.matmul, options, x, x)
    assert "__ynn_fusion" in default
    assert "__ynn_fusion" not in tuned and " dot(" in tuned


def test_transformer_logits_move_only_by_rounding():
    config = tiny_config()
    model = build_transformer(config, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 20)
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), ids))
    options = compile_options.forward_options(jnp.float32, "cpu")

    def apply(v, i):
        return model.apply(v, i)

    default = jax.jit(apply)(variables, ids)
    tuned = jax.jit(apply, compiler_options=options)(variables, ids)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(default), rtol=1e-5, atol=1e-5)


def test_pipeline_decodes_each_dtype_with_its_options():
    config = tiny_config()
    pipe = pipeline.MaskGITPipeline.with_random_weights(config, seed=2, devices=jax.devices()[:1])
    labels = np.arange(3) % 4
    # Jits of one function share their compile cache across pipelines (earlier tests' too),
    # so programs are counted from here on.
    for dtype in ("float32", "bfloat16"):
        pipe._decode_program(pipe.options(num_steps=2, dtype=dtype))
    before = pipe._decode_cache_size()
    fp32 = pipe.generate_tokens(labels, jax.random.PRNGKey(0), num_steps=2)
    pipe.generate_tokens(labels, jax.random.PRNGKey(0), num_steps=2, dtype="bfloat16")
    expected = {
        tuple(sorted(compile_options.forward_options(dtype, "cpu").items()))
        for dtype in (jnp.float32, jnp.bfloat16)
    }
    assert set(pipe._decode_programs) == expected and len(expected) == 2
    assert pipe._decode_cache_size() == before + 2
    # The same call again reuses its program and draws the same tokens.
    again = pipe.generate_tokens(labels, jax.random.PRNGKey(0), num_steps=2)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(fp32))
    assert pipe._decode_cache_size() == before + 2


def test_tokenizer_programs_take_float32_options_with_the_same_images():
    config = tiny_config()
    pipe = pipeline.MaskGITPipeline.with_random_weights(config, seed=3, devices=jax.devices()[:1])
    grid = jax.random.randint(jax.random.PRNGKey(4), (2, 4, 4), 0, 16)
    images = pipe._decode(pipe.tokenizer_variables, grid)
    default = jax.jit(pipe._decode_grid)(pipe.tokenizer_variables, grid)
    np.testing.assert_allclose(np.asarray(images), np.asarray(default), rtol=1e-5, atol=1e-5)
