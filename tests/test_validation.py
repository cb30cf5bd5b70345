import re

import numpy as np
import pytest

from maskgit_jax import validation


def _images(shape=(2, 8, 8, 3), dtype=np.float32, low=0.0, high=1.0):
    return np.random.default_rng(0).uniform(low, high, shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Images.


@pytest.mark.parametrize(
    "shape, match",
    [
        ((8, 8, 3), r"batch \[B, H, W, 3\].*shape \(8, 8, 3\)"),
        ((1, 2, 8, 8, 3), r"batch \[B, H, W, 3\].*shape \(1, 2, 8, 8, 3\)"),
        ((2, 8, 8, 1), r"3 \(RGB\) channels.*\(2, 8, 8, 1\)"),
        ((2, 8, 8, 4), r"3 \(RGB\) channels.*\(2, 8, 8, 4\)"),
        ((2, 3, 8, 8), r"3 \(RGB\) channels"),  # NCHW is not accepted.
    ],
)
def test_images_wrong_rank_or_channels(shape, match):
    with pytest.raises(ValueError, match=match):
        validation.check_images(_images(shape))


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 8, 16, 3), (2, 16, 8, 3)])
def test_images_wrong_size_names_both_sizes(shape):
    with pytest.raises(ValueError, match=rf"must be 8x8.*got {shape[1]}x{shape[2]}"):
        validation.check_images(_images(shape), image_size=8)


def test_images_any_size_without_image_size():
    out = validation.check_images(_images((1, 5, 7, 3)))
    assert out.shape == (1, 5, 7, 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_images_non_float_rejected(dtype):
    images = np.zeros((1, 8, 8, 3), dtype)
    with pytest.raises(ValueError, match=rf"floats in \[0, 1\].*dtype {np.dtype(dtype).name}"):
        validation.check_images(images, image_size=8)


def test_uint8_images_hint_to_divide():
    images = np.full((1, 8, 8, 3), 255, np.uint8)
    with pytest.raises(ValueError, match="divide uint8 by 255"):
        validation.check_images(images)


@pytest.mark.parametrize(
    "low, high, match",
    [
        (-0.5, 1.0, r"\[0, 1\]; got values in \[-0.5"),
        (0.0, 255.0, r"\[0, 1\]; got values in \[0, 255\]"),
        (-1.0, 2.0, r"got values in \[-1, 2\]"),
    ],
)
def test_images_out_of_range(low, high, match):
    images = _images()
    images[0, 0, 0, 0], images[1, 1, 1, 1] = low, high
    with pytest.raises(ValueError, match=match):
        validation.check_images(images)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_images_with_non_finite_values_rejected(value):
    images = _images()
    images[1, 2, 3, 0] = value
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        validation.check_images(images)


def test_images_exactly_on_the_bounds_pass():
    images = np.zeros((1, 2, 2, 3), np.float64)
    images[0, 0, 0] = 1.0
    out = validation.check_images(images, image_size=2)
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_valid_images_become_float32(dtype):
    images = _images(dtype=dtype)
    out = validation.check_images(images, image_size=8)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, images.astype(np.float32))


def test_nested_list_images_are_accepted():
    out = validation.check_images([[[[0.0, 0.5, 1.0]]]], image_size=1)
    assert out.dtype == np.float32 and out.shape == (1, 1, 1, 3)


# ---------------------------------------------------------------------------------------------
# Labels.


@pytest.mark.parametrize(
    "labels, bad", [([0, 10], 10), ([3, 11, 12], 11), ([-1, 2], -1), ([0, -7], -7)]
)
def test_labels_out_of_range_name_the_first_bad_id(labels, bad):
    with pytest.raises(ValueError, match=rf"class id {bad} is out of range.*10 classes.*\[0, 10\)"):
        validation.check_labels(np.asarray(labels), num_classes=10)


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0]), np.array([1.5]), np.array([True])])
def test_labels_must_be_integers(labels):
    with pytest.raises(ValueError, match=rf"1-D integer array; got dtype {labels.dtype.name}"):
        validation.check_labels(labels, num_classes=10)


@pytest.mark.parametrize("labels", [np.zeros((2, 2), np.int32), np.int32(3)])
def test_labels_must_be_one_dimensional(labels):
    with pytest.raises(
        ValueError, match=rf"1-D integer array.*shape {re.escape(str(np.shape(labels)))}"
    ):
        validation.check_labels(labels, num_classes=10)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64, np.uint32])
def test_valid_labels_become_int32(dtype):
    out = validation.check_labels(np.array([0, 4, 9], dtype), num_classes=10)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [0, 4, 9])


def test_label_list_is_accepted():
    out = validation.check_labels([1, 2], num_classes=3)
    assert out.dtype == np.int32 and out.tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------
# Token ids.


@pytest.mark.parametrize("bad", [16, 17, 1000, -1])
def test_token_ids_outside_the_codebook(bad):
    ids = np.arange(16).reshape(4, 4)
    ids[2, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the codebook.*\[0, 16\)"):
        validation.check_token_ids(ids, codebook_size=16)


def test_token_ids_must_be_integers():
    with pytest.raises(ValueError, match="token ids must be integers; got dtype float32"):
        validation.check_token_ids(np.zeros((2, 4), np.float32), codebook_size=16)


@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 4, 4)])
def test_valid_token_ids_become_int32_any_shape(shape):
    ids = np.random.default_rng(1).integers(0, 16, shape).astype(np.int64)
    ids.flat[0], ids.flat[-1] = 0, 15
    out = validation.check_token_ids(ids, codebook_size=16)
    assert out.dtype == np.int32 and out.shape == shape
    np.testing.assert_array_equal(out, ids)


# ---------------------------------------------------------------------------------------------
# Decoding steps.


@pytest.mark.parametrize("num_steps", [0, -3, 2.5])
def test_num_steps_must_be_integer_at_least_one(num_steps):
    with pytest.raises(ValueError, match=rf"num_steps must be an integer >= 1; got {num_steps}"):
        validation.check_num_steps(num_steps)


@pytest.mark.parametrize("num_steps, start_step", [(8, 8), (8, 9), (8, -1), (1, 1)])
def test_start_step_out_of_range(num_steps, start_step):
    with pytest.raises(
        ValueError, match=rf"start_step must be in \[0, num_steps={num_steps}\); got {start_step}"
    ):
        validation.check_num_steps(num_steps, start_step)


@pytest.mark.parametrize("num_steps, start_step", [(1, 0), (8, 0), (8, 7), (12, 2)])
def test_valid_steps_pass(num_steps, start_step):
    assert validation.check_num_steps(num_steps, start_step) is None
    assert validation.check_num_steps(np.int64(num_steps), start_step) is None
