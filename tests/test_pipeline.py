import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from PIL import Image

from maskgit_jax import sample
from maskgit_jax.checkpoints import pretrained
from maskgit_jax.data import images_io
from maskgit_jax.decoding import core, orders
from maskgit_jax.decoding.options import DecodeOptions
from maskgit_jax.sampling import editing, pipeline
from tests.conftest import REPO_ROOT
from tests.test_official_checkpoint import tiny_config

# Tiny config: 8x8 images, downsampling 2, 4x4 tokens, 16 codes, 4 classes.
# Every generate call below uses NUM_STEPS and batches of at most 8 (one padded shape), and
# every edit the demo's 12 steps from step 2, so each decoding variant compiles once.
NUM_STEPS = 4
LABELS = np.array([0, 1, 2])
CODEBOOK = 16


@pytest.fixture(scope="module")
def pipe():
    assert len(jax.devices()) == 8, "tests/conftest.py should give 8 fake CPU devices"
    return pipeline.MaskGITPipeline.with_random_weights(tiny_config(), seed=3)


@pytest.fixture(scope="module")
def first(pipe):
    return pipe.generate_tokens(LABELS, jax.random.PRNGKey(0), num_steps=NUM_STEPS)


@pytest.fixture(scope="module")
def images(pipe, first):
    return pipe.decode_tokens(first[:2])


def test_generate_shapes_range_and_determinism(pipe, first):
    assert first.shape == (3, 4, 4) and first.dtype == np.int32
    assert first.min() >= 0 and first.max() < CODEBOOK and len(np.unique(first)) > 1
    images = pipe.generate(LABELS, jax.random.PRNGKey(0), num_steps=NUM_STEPS)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and np.ptp(images) > 0.05
    np.testing.assert_array_equal(images, pipe.decode_tokens(first))
    np.testing.assert_array_equal(
        pipe.generate_tokens(LABELS, jax.random.PRNGKey(0), num_steps=4), first
    )
    assert np.any(pipe.generate_tokens(LABELS, jax.random.PRNGKey(1), num_steps=NUM_STEPS) != first)
    # A row does not depend on the batch size or padding (3 and 2 rows both pad to 8).
    np.testing.assert_array_equal(
        pipe.generate_tokens(LABELS[:2], jax.random.PRNGKey(0), num_steps=NUM_STEPS), first[:2]
    )


def test_top_k_1_is_greedy_and_ignores_the_sampling_key(pipe):
    greedy = [
        pipe.generate_tokens(
            LABELS, jax.random.PRNGKey(s), num_steps=NUM_STEPS, top_k=1, choice_temperature=0
        )
        for s in (0, 5)
    ]
    np.testing.assert_array_equal(greedy[0], greedy[1])
    # Every confidence is 1 under top-1 filtering: all tokens are revealed in the first step,
    # as the argmax of the logits of the all-masked input.
    inputs = np.concatenate([CODEBOOK + LABELS[:, None], np.full((3, 16), CODEBOOK + 4)], axis=1)
    apply = jax.jit(functools.partial(pipe.transformer.apply, num_logits=CODEBOOK))
    logits = apply(pipe.transformer_variables, inputs)
    np.testing.assert_array_equal(greedy[0].reshape(3, 16), np.argmax(logits[:, 1:], axis=-1))


GUIDED = DecodeOptions(guidance_scale=2.0)
TOP3 = DecodeOptions(top_k=3)


def test_logits_function_applies_guidance_and_top_k(pipe):
    ids = np.random.default_rng(0).integers(0, CODEBOOK, (2, 17)).astype(np.int32)
    ids[:, 0] = CODEBOOK + 1

    @jax.jit
    def all_logits(variables, ids):
        cond = pipe.transformer.apply(variables, ids, num_logits=CODEBOOK)
        uncond_ids = ids.at[:, 0].set(CODEBOOK + 4)
        uncond = pipe.transformer.apply(variables, uncond_ids, num_logits=CODEBOOK)
        guided = pipe._logits_fn(GUIDED)((variables, 2.0), ids)
        top3 = pipe._logits_fn(TOP3)((variables, 0.0), ids)
        return cond, uncond, guided, top3

    cond, uncond, guided, top3 = map(np.asarray, all_logits(pipe.transformer_variables, ids))
    np.testing.assert_allclose(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(top3).sum(-1) == 3)
    np.testing.assert_array_equal(top3.argmax(-1), cond.argmax(-1))
    assert pipe._logits_fn(TOP3) is pipe._logits_fn(TOP3)  # One compile per variant.


def test_guidance_needs_label_dropout(pipe):
    with pytest.raises(ValueError, match=r"training.label_dropout=0.*force_guidance=True"):
        pipe.generate(LABELS, jax.random.PRNGKey(0), num_steps=NUM_STEPS, guidance_scale=1.5)
    forced = pipe.options(guidance_scale=1.5, ordering="halton", force_guidance=True)
    assert forced.guidance_scale == 1.5 and forced.ordering == "halton"
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipe.generate(LABELS, jax.random.PRNGKey(0), guidance_scale=-1.0)
    with pytest.raises(ValueError, match="ordering must be one of"):
        pipe.generate(LABELS, jax.random.PRNGKey(0), ordering="raster")


def test_halton_order_is_a_spread_out_permutation():
    order = orders.halton_order(4, 4)
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
    rows, cols = order // 4, order % 4
    # Spread out: the first 4 cells use 4 columns and no two are neighbours; the first 8 use
    # every row and every column twice (a raster or clustered order would not).
    assert len(set(cols[:4])) == 4
    assert all(
        abs(rows[i] - rows[j]) + abs(cols[i] - cols[j]) > 1 for i in range(4) for j in range(i)
    )
    assert set(rows[:8]) == {0, 1, 2, 3} and np.all(np.bincount(cols[:8]) == 2)
    tall = orders.halton_order(3, 7)
    np.testing.assert_array_equal(np.sort(tall), np.arange(21))


def test_halton_decoding_reveals_tokens_in_halton_order():
    # Fake model: every position predicts the number of image tokens known so far, so a
    # decoded token records when its position was revealed.
    def counting_logits(params, ids):
        known = jnp.sum(ids[:, 1:] != 99, axis=-1)
        return jnp.where(jnp.arange(CODEBOOK) == known[:, None, None], 0.0, -1e9) * jnp.ones(
            ids.shape + (CODEBOOK,)
        )

    order = orders.halton_order(4, 4)
    inputs = jnp.asarray(np.concatenate([[7], np.full(16, 99)])[None], jnp.int32)
    options = DecodeOptions(num_steps=5, schedule="linear", ordering="halton")
    out = np.asarray(
        core.decode(
            inputs,
            jax.random.PRNGKey(0),
            counting_logits,
            mask_token_id=99,
            options=options,
            order_score=orders.order_score(order),
        )
    )
    revealed_at = out[0, 1:][order]  # Known-count at reveal, listed in Halton order.
    assert np.all(np.diff(revealed_at) >= 0) and len(np.unique(revealed_at)) == 5
    assert out[0, 0] == 7


def test_halton_generation(pipe, first):
    tokens = [
        pipe.generate_tokens(LABELS, jax.random.PRNGKey(s), num_steps=NUM_STEPS, ordering="halton")
        for s in (0, 0, 1)
    ]
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert np.any(tokens[0] != tokens[2])
    assert tokens[0].shape == (3, 4, 4) and tokens[0].max() < CODEBOOK


def test_inpaint_keeps_the_unmasked_region(pipe, images):
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True  # Token (0, 0), plus one token of margin: cells [0:2, 0:2].
    result = pipe.inpaint(images, mask, [3, 1], jax.random.PRNGKey(4), return_details=True)
    expected = np.zeros((2, 4, 4), bool)
    expected[:, :2, :2] = True
    np.testing.assert_array_equal(result.token_mask, expected)
    np.testing.assert_array_equal(result.input_tokens, pipe.encode(images))
    np.testing.assert_array_equal(result.tokens[~expected], result.input_tokens[~expected])
    assert np.any(result.tokens[expected] != result.input_tokens[expected])
    assert result.images.shape == (2, 8, 8, 3)
    # Far from the mask (beyond the 4x4-pixel token block) the output is the input exactly;
    # inside it, the decoded tokens (radius 8/16 - 1 < 0: no blur at this size).
    np.testing.assert_array_equal(result.images[:, 4:], images[:, 4:])
    np.testing.assert_array_equal(result.images[:, :, 4:], images[:, :, 4:])
    decoded = pipe.decode_tokens(result.tokens)
    np.testing.assert_array_equal(result.images[:, :4, :4], decoded[:, :4, :4])


def test_edit_box_masks_the_covering_tokens(pipe, images):
    result = pipe.edit(images[0], (4, 4, 6, 6), 2, jax.random.PRNGKey(5), return_details=True)
    expected = np.zeros((1, 4, 4), bool)
    expected[:, 1:4, 1:4] = True  # Cell (2, 2) and its neighbours.
    np.testing.assert_array_equal(result.token_mask, expected)
    np.testing.assert_array_equal(result.tokens[~expected], result.input_tokens[~expected])
    np.testing.assert_array_equal(result.images[:, :2], images[:1, :2])
    with pytest.raises(ValueError, match=r"box \(x0, y0, x1, y1\)"):
        pipe.edit(images[0], (4, 4, 9, 6), 2, jax.random.PRNGKey(5))


def test_outpaint_extends_the_canvas(pipe, images):
    result = pipe.outpaint(
        images, extend_right=4, label=[0, 1], rng=jax.random.PRNGKey(6), return_details=True
    )
    assert result.images.shape == (2, 8, 12, 3) and result.tokens.shape == (2, 4, 6)
    expected = np.zeros((2, 4, 6), bool)
    expected[:, :, 3:] = True  # New columns 4-5 and one column of margin.
    np.testing.assert_array_equal(result.token_mask, expected)
    np.testing.assert_array_equal(result.images[:, :, :6], images[:, :, :6])
    assert result.tokens.max() < CODEBOOK
    with pytest.raises(ValueError, match=r"extended canvas 8x11 is not a multiple"):
        pipe.outpaint(images, extend_right=3, label=0, rng=jax.random.PRNGKey(6))


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((9, 8, 3), np.float32), r"image size 9x8 is not a multiple of .* factor 2"),
        (np.zeros((8, 8, 3), np.uint8), r"images must be floats in \[0, 1\]"),
        (np.zeros((8, 8), np.float32), r"images must be a batch"),
    ],
)
def test_bad_images_raise_before_tracing(pipe, image, match):
    with pytest.raises(ValueError, match=match):
        pipe.inpaint(image, np.ones(image.shape[:2]), 0, jax.random.PRNGKey(0))


def test_bad_options_raise(pipe, images):
    with pytest.raises(ValueError, match=r"class id 4 is out of range"):
        pipe.edit(images, (0, 0, 2, 2), 4, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 1"):
        pipe.generate(LABELS, jax.random.PRNGKey(0), top_k=0)
    with pytest.raises(ValueError, match=r"start_step must be an integer in \[0, num_steps=12\)"):
        pipe.inpaint(images, np.ones((8, 8)), 0, jax.random.PRNGKey(0), start_step=12)


def test_blur_and_composite():
    token_mask = np.zeros((1, 8, 8), bool)
    token_mask[0, 3:5, 3:5] = True
    generated, original = np.ones((1, 32, 32, 3), np.float32), np.zeros((1, 32, 32, 3), np.float32)
    out = editing.composite(generated, original, token_mask, radius=2.0)
    # The 8x8-pixel block (12..19) blurred with sigma 2 reaches 6 pixels (3 sigma) out.
    assert np.all(out[0, :6] == 0) and np.all(out[0, :, 26:] == 0)
    assert out[0, 15, 15, 0] > 0.85 and 0.3 < out[0, 12, 15, 0] < 0.6
    np.testing.assert_allclose(out.sum() / 3, 64.0, rtol=1e-4)  # The blur preserves mass.
    hard = editing.composite(generated, original, token_mask, radius=-0.5)
    assert hard.sum() / 3 == 64.0


def test_sharded_batch_equals_single_device(pipe, first):
    inputs = pipe._shard(np.zeros((3, 5), np.int32))
    assert inputs.shape == (8, 5)
    assert len(inputs.sharding.device_set) == 8 and inputs.sharding.spec == PartitionSpec("batch")
    single = pipeline.MaskGITPipeline(
        pipe.config,
        pipe.tokenizer_variables,
        pipe.transformer_variables,
        devices=jax.devices()[:1],
    )
    assert single.num_devices == 1
    np.testing.assert_array_equal(
        single.generate_tokens(LABELS, jax.random.PRNGKey(0), num_steps=NUM_STEPS), first
    )


def test_requested_labels():
    labels, rows = sample.requested_labels(None, 2, ["1", "3"], 4)
    np.testing.assert_array_equal(labels, [1, 1, 3, 3])
    assert rows == 2
    labels, rows = sample.requested_labels(["0", "1", "2", "3", "0", "1"], None, None, 4)
    assert len(labels) == 6 and rows == 2
    labels, rows = sample.requested_labels(None, 1, None, 4)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def checkpoint(pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "pretrained"
    to_host = functools.partial(jax.tree.map, np.asarray)
    pretrained.save_pretrained(
        directory,
        pipe.config,
        to_host(pipe.tokenizer_variables),
        to_host(pipe.transformer_variables),
    )
    return directory


def run_sample(cwd, *flags):
    command = [sys.executable, "-m", "maskgit_jax.sample", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def test_cli_writes_the_notebook_api_images_whatever_the_batch_size(pipe, checkpoint, tmp_path):
    # Relative paths, as a user types them; batches of 2 rows, one key for the whole run.
    (tmp_path / "model").symlink_to(checkpoint)
    flags = ["--checkpoint=model", "--labels=0,1,3", "--num_steps=2", "--ordering=halton"]
    done = run_sample(tmp_path, *flags, "--batch_size=2", "--output=samples")
    assert done.returncode == 0, done.stderr[-3000:]
    output = tmp_path / "samples"
    names = sorted(p.name for p in output.iterdir())
    assert names == ["00000_class0.png", "00001_class1.png", "00002_class3.png", "grid.png"]
    grid = np.asarray(Image.open(output / "grid.png"))
    # 8x8 images enlarged 4x to 32x32 cells, 2-pixel gaps around them.
    assert grid.shape == (2 + 32 + 2, 2 + 3 * (32 + 2), 3)
    expected = pipe.generate([0, 1, 3], jax.random.PRNGKey(0), num_steps=2, ordering="halton")
    enlarged = images_io.to_uint8(expected[0]).repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(grid[2:34, 2:34], enlarged)
    np.testing.assert_array_equal(grid, images_io.to_uint8(images_io.make_grid(expected, 1)))


@pytest.mark.parametrize(
    "flag, match",
    [
        ("--choice_temperature=-1", "choice_temperature must be a finite number >= 0"),
        ("--labels=0,9", "class id 9 is out of range"),
        ("--dtype=float16", "dtype"),
        ("--top_k=0", "top_k must be an integer >= 1"),
    ],
)
def test_cli_bad_options_fail_before_writing_anything(checkpoint, tmp_path, flag, match):
    flags = [f"--checkpoint={checkpoint}", "--labels=0,1", "--output=out", flag]
    done = run_sample(tmp_path, *flags)
    assert done.returncode != 0
    assert match in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
