import jax
import numpy as np
import pytest

from maskgit_jax.sampling import sampler as sampling
from tests.test_official_checkpoint import random_variables, tiny_config

# Every call below uses these shapes and static options, so the module compiles the decoder
# once (the sampler's jit cache is per sampler object).
LABELS = np.array([0, 1, 2])
NUM_STEPS = 4
CODEBOOK_SIZE = 16


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    assert config.tokenizer.codebook_size == CODEBOOK_SIZE and config.num_classes == 4
    sampler = sampling.MaskGITSampler(config)
    tokenizer_vars = random_variables(sampler.tokenizer, np.zeros((1, 8, 8, 3), np.float32))
    transformer_vars = random_variables(sampler.transformer, np.zeros((1, 17), np.int32), seed=2)
    before = sampler._generate_tokens._cache_size()
    first = sampler.generate(
        tokenizer_vars, transformer_vars, LABELS, jax.random.PRNGKey(0), num_steps=NUM_STEPS
    )
    return dict(
        sampler=sampler,
        tokenizer_vars=tokenizer_vars,
        transformer_vars=transformer_vars,
        first=first,
        compiled_by_first_call=sampler._generate_tokens._cache_size() - before,
    )


def _tokens(setup, labels=LABELS, seed=0, **kw):
    kw.setdefault("num_steps", NUM_STEPS)
    return np.asarray(
        setup["sampler"].generate_tokens(
            setup["transformer_vars"], labels, jax.random.PRNGKey(seed), **kw
        )
    )


def _generate(setup, labels=LABELS, seed=0, **kw):
    kw.setdefault("num_steps", NUM_STEPS)
    return setup["sampler"].generate(
        setup["tokenizer_vars"], setup["transformer_vars"], labels, jax.random.PRNGKey(seed), **kw
    )


def test_generate_returns_float_images_in_unit_range(setup):
    images = setup["first"]
    assert isinstance(images, np.ndarray)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.ptp(images) > 0.05  # Not a constant (e.g. all-clipped) image.


def test_generated_tokens_are_codebook_ids_only(setup):
    # Unrestricted logits would sample class ids (16..19) or the mask id (20) among these
    # 5 x 3 x 16 tokens with probability near one under random weights.
    tokens = np.stack([_tokens(setup, seed=seed) for seed in range(5)])
    assert tokens.shape == (5, 3, 16) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < CODEBOOK_SIZE
    assert len(np.unique(tokens)) > 1


def test_images_decode_the_generated_tokens(setup):
    # The images are the tokenizer's decoding of the tokens drawn with the same key.
    tokens = _tokens(setup, seed=0)
    assert tokens.shape == (3, 16)
    decoded = setup["sampler"].decode_tokens(setup["tokenizer_vars"], tokens)
    np.testing.assert_array_equal(decoded, setup["first"])
    grid = setup["sampler"].decode_tokens(setup["tokenizer_vars"], tokens.reshape(3, 4, 4))
    np.testing.assert_array_equal(grid, setup["first"])


@pytest.mark.parametrize(
    "tokens, match",
    [
        (np.full((1, 16), CODEBOOK_SIZE), f"token id {CODEBOOK_SIZE} is outside the codebook"),
        (np.full((1, 16), -1), "token id -1 is outside the codebook"),
        (np.zeros((1, 15), np.int32), r"tokens must be \[B, 16\]"),
        (np.zeros((1, 16), np.float32), "token ids must be integers"),
    ],
)
def test_decode_tokens_rejects_bad_ids(setup, tokens, match):
    with pytest.raises(ValueError, match=match):
        setup["sampler"].decode_tokens(setup["tokenizer_vars"], tokens)


def test_class_conditional_inputs_put_the_class_token_first(setup):
    config = setup["sampler"].config
    inputs = np.asarray(sampling.class_conditional_inputs(np.array([0, 3]), config))
    assert inputs.shape == (2, 17) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 0], [CODEBOOK_SIZE, CODEBOOK_SIZE + 3])
    assert np.all(inputs[:, 1:] == CODEBOOK_SIZE + 4)  # The mask id: the last vocabulary row.


def test_same_rng_same_images_other_rng_other_images(setup):
    np.testing.assert_array_equal(_generate(setup, seed=0), setup["first"])
    np.testing.assert_array_equal(_tokens(setup, seed=3), _tokens(setup, seed=3))
    assert np.any(_tokens(setup, seed=0) != _tokens(setup, seed=1))
    assert np.any(_generate(setup, seed=1) != setup["first"])


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, 1, 4], r"class id 4 is out of range: the model has 4 classes"),
        ([-1, 0, 0], r"class id -1 is out of range"),
        ([0.0, 1.0, 2.0], r"labels must be a 1-D integer array"),
    ],
)
def test_bad_labels_raise_before_tracing(setup, labels, match):
    sampler = setup["sampler"]
    size = sampler._generate_tokens._cache_size()
    with pytest.raises(ValueError, match=match):
        _generate(setup, labels=labels)
    assert sampler._generate_tokens._cache_size() == size


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_steps=0), r"num_steps must be an integer >= 1; got 0"),
        (dict(num_steps=-2), r"num_steps must be an integer >= 1; got -2"),
        (dict(temperature=0.0), r"temperature must be > 0; got 0.0"),
        (dict(schedule="bogus"), r"bogus"),
    ],
)
def test_bad_options_raise_before_tracing(setup, options, match):
    sampler = setup["sampler"]
    size = sampler._generate_tokens._cache_size()
    with pytest.raises(ValueError, match=match):
        _tokens(setup, **options)
    assert sampler._generate_tokens._cache_size() == size


def test_later_calls_reuse_the_compiled_program(setup):
    sampler = setup["sampler"]
    assert setup["compiled_by_first_call"] == 1
    size, decode_size = sampler._generate_tokens._cache_size(), sampler._decode_images._cache_size()
    images = _generate(
        setup, labels=np.array([3, 3, 0]), seed=7, temperature=0.7, choice_temperature=2.0
    )
    assert images.shape == (3, 8, 8, 3)
    _tokens(setup, labels=[2, 0, 1], seed=8)
    assert sampler._generate_tokens._cache_size() == size
    assert sampler._decode_images._cache_size() == decode_size


def test_class_label_conditions_only_its_own_row(setup):
    # The class token reaches the logits of every masked position...
    sampler, transformer_vars = setup["sampler"], setup["transformer_vars"]
    inputs = sampling.class_conditional_inputs(np.array([0, 3]), sampler.config)
    logits = np.asarray(jax.jit(sampler.codebook_logits)(transformer_vars, inputs))
    assert logits.shape == (2, 17, CODEBOOK_SIZE)
    assert np.abs(logits[0, 1:] - logits[1, 1:]).min(axis=-1).max() > 1e-4
    # ...and so the samples. Rows decode independently with shared noise: changing row 0's
    # class changes row 0's tokens for some keys and leaves the other rows exactly as they were.
    # (One random layer only weakly conditions the output: a few tokens change per key.)
    changed_rows = 0
    for seed in range(8):
        base = _tokens(setup, labels=[0, 1, 2], seed=seed)
        other = _tokens(setup, labels=[3, 1, 2], seed=seed)
        np.testing.assert_array_equal(other[1:], base[1:])
        changed_rows += int(np.any(other[0] != base[0]))
    assert changed_rows >= 1


def test_bf16_decoding_casts_only_matmul_kernels():
    tree = {
        "dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
        "embed": {"embedding": np.ones((3, 2), np.float32)},
        "step": np.int32(3),
    }
    cast = sampling.cast_matmul_kernels(tree, jax.numpy.bfloat16)
    assert cast["dense"]["kernel"].dtype == jax.numpy.bfloat16
    assert cast["dense"]["bias"].dtype == np.float32
    assert cast["embed"]["embedding"].dtype == np.float32
    assert cast["step"].dtype == np.int32
    assert sampling.cast_matmul_kernels(tree, jax.numpy.float32) is tree


def test_sample_splits_a_sharded_batch_over_devices_with_the_same_images(setup):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    labels = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    rng = jax.random.PRNGKey(5)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = setup["sampler"].sample(
        jax.device_put(setup["tokenizer_vars"], replicated),
        jax.device_put(setup["transformer_vars"], replicated),
        jax.device_put(labels, NamedSharding(mesh, PartitionSpec("data"))),
        rng,
        num_steps=NUM_STEPS,
    )
    assert isinstance(sharded, jax.Array) and len(sharded.sharding.device_set) == 4
    assert sharded.addressable_shards[0].data.shape[0] == 2
    single = _generate(setup, labels=labels, seed=5)
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-5)
