"""The one sampler's contract: keys drawn one way, chunking, devices, compile reuse, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax.decoding.logits import cast_matmul_kernels
from maskgit_jax.decoding.options import DecodeOptions
from maskgit_jax.sampling import pipeline
from tests.test_official_checkpoint import tiny_config

# Tiny config: 8x8 images, 4x4 tokens, 16 codes, 4 classes. 8 fake CPU devices (conftest).
LABELS = np.arange(11) % 4
NUM_STEPS = 3
CODEBOOK = 16
KEY = jax.random.PRNGKey(11)


@pytest.fixture(scope="module")
def pipes():
    config = tiny_config()
    config.training.label_dropout = 0.1  # Guidance allowed.
    full = pipeline.MaskGITPipeline.with_random_weights(config, seed=5)
    kwargs = dict(devices=jax.devices()[:1], max_batch_size=4)
    one = pipeline.MaskGITPipeline(
        config, full.tokenizer_variables, full.transformer_variables, **kwargs
    )
    four = pipeline.MaskGITPipeline(
        config, full.tokenizer_variables, full.transformer_variables, devices=jax.devices()[:4]
    )
    return dict(full=full, one=one, four=four)


VARIANTS = [
    dict(),
    dict(ordering="halton"),
    dict(guidance_scale=1.5, top_k=5),
    dict(dtype="bfloat16", temperature=0.8, choice_temperature=2.0),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_same_key_same_tokens_on_every_path(pipes, overrides):
    options = pipes["full"].options(num_steps=NUM_STEPS, **overrides)
    reference = pipes["full"].generate_tokens(LABELS, KEY, options)
    assert reference.shape == (11, 4, 4) and reference.max() < CODEBOOK
    # 1 device in chunks of 4 rows, and 4 devices in one program.
    np.testing.assert_array_equal(pipes["one"].generate_tokens(LABELS, KEY, options), reference)
    np.testing.assert_array_equal(pipes["four"].generate_tokens(LABELS, KEY, options), reference)
    # A process sampling rows 5.. of the list passes row_offset=5.
    tail = pipes["four"].generate_tokens(LABELS[5:], KEY, options, row_offset=5)
    np.testing.assert_array_equal(tail, reference[5:])
    # The device-side images (evaluation) and the host images are the decoded tokens.
    images = pipes["full"].generate(LABELS, KEY, options)
    np.testing.assert_array_equal(images, pipes["full"].decode_tokens(reference))
    on_device = pipes["four"].sample(LABELS, KEY, options)
    assert isinstance(on_device, jax.Array) and len(on_device.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(on_device), images, atol=1e-6)


def test_keyword_overrides_equal_an_options_object(pipes):
    pipe = pipes["full"]
    options = DecodeOptions.from_config(pipe.config, num_steps=NUM_STEPS, ordering="halton")
    np.testing.assert_array_equal(
        pipe.generate_tokens(LABELS, KEY, options),
        pipe.generate_tokens(LABELS, KEY, num_steps=NUM_STEPS, ordering="halton"),
    )
    assert pipe.options().num_steps == pipe.config.sampling.num_steps


def test_options_change_the_samples_and_keys_matter(pipes):
    pipe = pipes["full"]
    base = pipe.generate_tokens(LABELS, KEY, num_steps=NUM_STEPS)
    assert np.any(pipe.generate_tokens(LABELS, jax.random.PRNGKey(12), num_steps=NUM_STEPS) != base)
    for overrides in VARIANTS[1:]:
        other = pipe.generate_tokens(LABELS, KEY, num_steps=NUM_STEPS, **overrides)
        assert np.any(other != base), overrides


def test_bf16_tokens_mostly_equal_fp32(pipes):
    pipe = pipes["full"]
    fp32 = pipe.generate_tokens(LABELS, KEY, num_steps=NUM_STEPS, top_k=1, ordering="halton")
    bf16 = pipe.generate_tokens(
        LABELS, KEY, num_steps=NUM_STEPS, top_k=1, ordering="halton", dtype="bfloat16"
    )
    assert (fp32 == bf16).mean() > 0.8


def test_large_batches_are_chunked_into_one_program(pipes):
    pipe = pipes["one"]  # max_batch_size 4: 11 rows are 3 chunks of the same padded shape.
    options = pipe.options(num_steps=NUM_STEPS)
    assert pipe._chunks(11) == (4, [(0, 4), (4, 8), (8, 11)])
    pipe.generate_tokens(LABELS, KEY, options)
    programs = pipe._decode_cache_size()
    pipe.generate_tokens(np.arange(30) % 4, jax.random.PRNGKey(3), options)
    assert pipe._decode_cache_size() == programs


def test_tokenizer_calls_are_chunked_into_one_program(pipes):
    pipe = pipes["one"]  # max_batch_size 4
    whole = pipeline.MaskGITPipeline(
        pipe.config, pipe.tokenizer_variables, pipe.transformer_variables, devices=jax.devices()[:1]
    )
    grids = np.random.default_rng(0).integers(0, CODEBOOK, (11, 4, 4))
    images = pipe.decode_tokens(grids)
    assert images.shape == (11, 8, 8, 3)
    # Equal up to the float rounding of another batch shape (4 rows against 11).
    np.testing.assert_allclose(images, whole.decode_tokens(grids), atol=1e-5)
    tokens = pipe.encode(images)
    np.testing.assert_array_equal(tokens, whole.encode(images))
    programs = pipe._decode._cache_size(), pipe._encode._cache_size()
    more = np.random.default_rng(1).integers(0, CODEBOOK, (30, 4, 4))
    assert pipe.encode(pipe.decode_tokens(more)).shape == (30, 4, 4)
    assert (pipe._decode._cache_size(), pipe._encode._cache_size()) == programs


def test_new_weights_temperatures_and_guidance_scales_reuse_programs(pipes):
    pipe = pipes["four"]
    guided = pipe.options(num_steps=NUM_STEPS, guidance_scale=1.0)
    before = pipe.generate_tokens(LABELS, KEY, guided)
    programs, decoders = pipe._decode_cache_size(), pipe._decode._cache_size()
    pipe.generate_tokens(LABELS, KEY, guided.replace(guidance_scale=3.0, temperature=0.5))
    pipe.generate(LABELS, KEY, guided.replace(choice_temperature=1.0))
    scaled = jax.tree.map(lambda x: 1.5 * np.asarray(x), pipe.transformer_variables)
    original = pipe.transformer_variables
    pipe.set_variables(transformer_variables=scaled)
    after = pipe.generate_tokens(LABELS, KEY, guided)
    pipe.set_variables(transformer_variables=original)
    assert np.any(after != before)
    assert pipe._decode_cache_size() == programs
    assert pipe._decode._cache_size() == decoders


def test_bf16_kernels_are_cast_once_and_follow_new_weights(pipes):
    full = pipes["full"]
    kept, per_call = (
        pipeline.MaskGITPipeline(
            full.config,
            full.tokenizer_variables,
            full.transformer_variables,
            devices=jax.devices()[:4],
            keep_cast_weights=keep,
        )
        for keep in (True, False)
    )
    options = kept.options(num_steps=NUM_STEPS, dtype="bfloat16")
    first = kept.generate_tokens(LABELS, KEY, options)
    source, cast = kept._cast_weights
    assert source is kept.transformer_variables and set(cast) == {"bfloat16"}
    kernels = cast["bfloat16"]
    leaves = jax.tree_util.tree_leaves_with_path(kernels)
    assert {leaf.dtype for path, leaf in leaves if path[-1].key == "kernel"} == {
        jnp.dtype(jnp.bfloat16)
    }
    assert {leaf.dtype for path, leaf in leaves if path[-1].key == "bias"} == {
        jnp.dtype(jnp.float32)
    }
    assert all(len(leaf.sharding.device_set) == 4 for _, leaf in leaves)
    # The next call reuses the cast copy; a sampler that does not keep it decodes the same.
    np.testing.assert_array_equal(kept.generate_tokens(LABELS, KEY, options), first)
    assert kept._cast_weights[1]["bfloat16"] is kernels
    np.testing.assert_array_equal(per_call.generate_tokens(LABELS, KEY, options), first)
    assert per_call._cast_weights == (None, {})
    # New weights are cast anew, whether set or assigned.
    scaled = jax.tree.map(lambda x: 1.5 * np.asarray(x), full.transformer_variables)
    kept.set_variables(transformer_variables=scaled)
    per_call.set_variables(transformer_variables=scaled)
    after = kept.generate_tokens(LABELS, KEY, options)
    assert np.any(after != first)
    np.testing.assert_array_equal(after, per_call.generate_tokens(LABELS, KEY, options))
    kept.transformer_variables = jax.device_put(full.transformer_variables, kept._replicated)
    np.testing.assert_array_equal(kept.generate_tokens(LABELS, KEY, options), first)
    # float32 decodes from the variables themselves.
    assert kept._cast_variables(jnp.float32) is kept.transformer_variables


def test_class_label_conditions_only_its_own_row(pipes):
    pipe = pipes["full"]
    changed = 0
    for seed in range(6):
        base = pipe.generate_tokens([0, 1, 2], jax.random.PRNGKey(seed), num_steps=NUM_STEPS)
        other = pipe.generate_tokens([3, 1, 2], jax.random.PRNGKey(seed), num_steps=NUM_STEPS)
        np.testing.assert_array_equal(other[1:], base[1:])
        changed += int(np.any(other[0] != base[0]))
    assert changed >= 1


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(labels=[0, 1, 4]), r"class id 4 is out of range: the model has 4 classes"),
        (dict(labels=[0.0, 1.0]), r"labels must be a 1-D integer array"),
        (dict(num_steps=0), r"num_steps must be an integer >= 1; got 0"),
        (dict(temperature=0.0), r"temperature must be a finite number > 0"),
        (dict(choice_temperature=-1.0), r"choice_temperature must be a finite number >= 0"),
        (dict(choice_temperature=float("nan")), r"choice_temperature must be a finite number"),
        (dict(schedule="bogus"), r"bogus"),
        (dict(ordering="raster"), r"ordering must be one of"),
        (dict(dtype="float16"), r"dtype must be one of"),
        (dict(top_k=2.5), r"top_k must be an integer"),
        (dict(row_offset=-1), r"row_offset must be >= 0"),
        (dict(colour="red"), r"unknown decoding options \['colour'\]"),
    ],
)
def test_bad_input_raises_before_tracing(pipes, call, match):
    pipe = pipes["four"]
    labels = call.pop("labels", [0, 1])
    programs = pipe._decode_cache_size()
    with pytest.raises((ValueError, TypeError), match=match):
        pipe.generate(labels, KEY, **call)
    assert pipe._decode_cache_size() == programs


def test_guidance_without_label_dropout_needs_force():
    pipe = pipeline.MaskGITPipeline.with_random_weights(tiny_config(), seed=1)
    with pytest.raises(ValueError, match="label_dropout=0"):
        pipe.options(guidance_scale=1.0)
    with pytest.raises(ValueError, match="label_dropout=0"):
        pipe.generate([0], KEY, DecodeOptions(guidance_scale=1.0))
    assert pipe.options(guidance_scale=1.0, force_guidance=True).guided


@pytest.mark.parametrize(
    "tokens, match",
    [
        (np.full((1, 4, 4), CODEBOOK), f"token id {CODEBOOK} is outside the codebook"),
        (np.zeros((1, 16), np.int32), r"tokens must be \[B, h, w\]"),
        (np.zeros((1, 4, 4), np.float32), "token ids must be integers"),
    ],
)
def test_decode_tokens_rejects_bad_ids(pipes, tokens, match):
    with pytest.raises(ValueError, match=match):
        pipes["four"].decode_tokens(tokens)


def test_bf16_decoding_casts_only_matmul_kernels():
    tree = {
        "dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
        "embed": {"embedding": np.ones((3, 2), np.float32)},
        "step": np.int32(3),
    }
    cast = cast_matmul_kernels(tree, jax.numpy.bfloat16)
    assert cast["dense"]["kernel"].dtype == jax.numpy.bfloat16
    assert cast["dense"]["bias"].dtype == np.float32
    assert cast["embed"]["embedding"].dtype == np.float32
    assert cast["step"].dtype == np.int32
    assert cast_matmul_kernels(tree, jax.numpy.float32) is tree
