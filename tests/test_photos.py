"""Tests of the bundled `photos` builder, its config and the reconstruction metrics; offline."""

import hashlib
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds
from skimage.metrics import structural_similarity

from maskgit_jax import config_lib
from maskgit_jax.data import input_pipeline
from maskgit_jax.data.datasets import photos
from maskgit_jax.evaluation.reconstruction_metrics import codebook_usage, psnr, ssim
from tests.conftest import REPO_ROOT


def _load_config():
    """Returns configs/photos.py's config."""
    spec = importlib.util.spec_from_file_location("photos_config", REPO_ROOT / "configs/photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory):
    """Prepares the 32x32 photos dataset once for the module (the cheaper config)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("photos/32px", data_dir=data_dir).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def splits(photos_dir):
    """Returns {split: (images uint8 [N, 32, 32, 3], labels [N])} of the prepared dataset."""
    builder = tfds.builder("photos/32px", data_dir=photos_dir)
    out = {}
    for split in ("train", "test"):
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        out[split] = (
            np.stack([ex["image"] for ex in examples]),
            np.array([ex["label"] for ex in examples]),
        )
    return out


def _digest(image: np.ndarray) -> bytes:
    """Returns a hash of an image's bytes and shape."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).digest()


def test_builder_shapes_and_split_sizes(photos_dir, splits):
    builder = tfds.builder("photos/32px", data_dir=photos_dir)
    assert builder.info.splits["train"].num_examples == 3200
    assert builder.info.splits["test"].num_examples == 350
    assert builder.info.features["label"].num_classes == len(photos.TRAIN_PHOTOS)
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    assert train_images.shape == (3200, 32, 32, 3) and train_images.dtype == np.uint8
    assert test_images.shape == (350, 32, 32, 3) and test_images.dtype == np.uint8
    # Train labels are the source photo: exactly TRAIN_CROPS_PER_PHOTO crops each.
    np.testing.assert_array_equal(
        np.bincount(train_labels, minlength=len(photos.TRAIN_PHOTOS)),
        [photos.TRAIN_CROPS_PER_PHOTO] * len(photos.TRAIN_PHOTOS),
    )
    assert test_labels.min() >= 0 and test_labels.max() < len(photos.TRAIN_PHOTOS)
    # Real photo content, not blank crops: most crops have visible contrast.
    assert np.mean(train_images.std(axis=(1, 2, 3)) > 5) > 0.9


def test_default_config_is_64px():
    info = tfds.builder("photos", data_dir="/nonexistent").info
    assert info.features["image"].shape == (64, 64, 3)
    assert info.features["image"].encoding_format == "png"


def test_train_and_test_photos_are_disjoint(splits):
    assert not set(photos.TRAIN_PHOTOS) & set(photos.TEST_PHOTOS)
    # Different names could still load the same picture: compare the pixels too.
    train_photos = {_digest(photos.load_photo(n)) for n in photos.TRAIN_PHOTOS}
    test_photos = {_digest(photos.load_photo(n)) for n in photos.TEST_PHOTOS}
    assert len(train_photos) == len(photos.TRAIN_PHOTOS)
    assert len(test_photos) == len(photos.TEST_PHOTOS)
    assert not train_photos & test_photos
    train_crops = {_digest(image) for image in splits["train"][0]}
    test_crops = {_digest(image) for image in splits["test"][0]}
    assert not train_crops & test_crops


def test_photos_are_rgb_uint8():
    for name in ("camera", "china", "astronaut"):
        photo = photos.load_photo(name)
        assert photo.ndim == 3 and photo.shape[-1] == 3 and photo.dtype == np.uint8
    gray = photos.load_photo("camera")
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    with pytest.raises(ValueError, match="Unknown photo"):
        photos.load_photo("brain")  # Would need a download.


def test_crops_are_deterministic_and_stored_losslessly(splits):
    first = photos.photo_crops("coins", "test", 32)
    again = photos.photo_crops("coins", "test", 32)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (photos.TEST_CROPS_PER_PHOTO, 32, 32, 3)
    # Crops land at different places: not all the same picture.
    assert len({_digest(c) for c in first}) == len(first)
    # PNG is lossless: the stored test crops are exactly the generated ones.
    expected = {
        _digest(c) for name in photos.TEST_PHOTOS for c in photos.photo_crops(name, "test", 32)
    }
    assert {_digest(image) for image in splits["test"][0]} == expected
    with pytest.raises(ValueError, match="not a train photo"):
        photos.photo_crops("coins", "train", 32)


def test_config_pipeline_reads_photos(photos_dir):
    config = _load_config()
    config_lib.validate(config)
    assert config.stage == "tokenizer"
    assert config_lib.tokens_per_side(config) == 8
    assert config.dataset.random_flip
    dataset_config = config.dataset.copy_and_resolve_references()
    dataset_config.data_dir = photos_dir
    train, eval_ds, info = input_pipeline.create_datasets(
        dataset_config, image_size=config.image_size, global_batch_size=8, seed=0
    )
    assert (info.num_train_examples, info.num_eval_examples) == (3200, 350)
    assert info.eval_split == "test"
    batch = next(train)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    eval_batch = next(iter(eval_ds))
    assert eval_batch["image"].shape == (8, 32, 32, 3)


def test_psnr_known_values():
    a = np.full((2, 16, 16, 3), 0.5)
    assert psnr(a, a) == np.inf  # Not capped: exact reconstructions are infinitely good.
    b = a.copy()
    b[0] += 0.1  # MSE 0.01 -> 20 dB.
    b[1] += 0.01  # MSE 1e-4 -> 40 dB.
    per_image = psnr(a, b, reduce=False)
    np.testing.assert_allclose(per_image, [20.0, 40.0], atol=1e-9)
    assert psnr(a, b) == pytest.approx(30.0)  # Mean of per-image values, not of MSEs.
    rng = np.random.default_rng(0)
    c = rng.random((16, 16, 3))
    d = np.clip(c + rng.normal(0, 0.05, c.shape), 0, 1)
    mse = np.mean((c - d) ** 2)
    assert psnr(c, d) == pytest.approx(10 * np.log10(1.0 / mse))
    assert psnr(c * 255, d * 255, max_value=255.0) == pytest.approx(psnr(c, d))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(c, d[:8])


def test_ssim_identical_and_noise():
    rng = np.random.default_rng(1)
    image = photos.photo_crops("coins", "test", 32)[:4] / 255.0
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    scores = [
        ssim(image, np.clip(image + rng.normal(0, s, image.shape), 0, 1)) for s in (0.01, 0.05, 0.2)
    ]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 27, 3), (11, 11, 3), (24, 24, 1)])
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.random(shape)
    for b in (rng.random(shape), np.clip(a + rng.normal(0, 0.1, shape), 0, 1)):
        expected = structural_similarity(
            a,
            b,
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(ssim(a, b) - expected) < 1e-4


def test_ssim_batch_is_mean_of_images():
    rng = np.random.default_rng(2)
    a = rng.random((3, 20, 20, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape) * np.array([0.2, 1, 3])[:, None, None, None], 0, 1)
    per_image = ssim(a, b, reduce=False)
    assert per_image.shape == (3,)
    np.testing.assert_allclose(per_image, [ssim(a[i], b[i]) for i in range(3)])
    assert ssim(a, b) == pytest.approx(per_image.mean())
    assert per_image[0] > per_image[1] > per_image[2]


def test_codebook_usage_known_ids():
    assert codebook_usage(np.array([0, 0, 1, 1]), 4) == pytest.approx((0.5, 2.0))
    assert codebook_usage(np.full((2, 8, 8), 3), 16) == pytest.approx((1 / 16, 1.0))
    assert codebook_usage(np.arange(256).reshape(16, 16), 256) == pytest.approx((1.0, 256.0))
    # p = (1/2, 1/4, 1/4): entropy 1.5 log 2, perplexity 2**1.5.
    assert codebook_usage([5, 5, 6, 7], 8) == pytest.approx((3 / 8, 2**1.5))
    with pytest.raises(ValueError, match="must lie in"):
        codebook_usage([0, 8], 8)
    with pytest.raises(ValueError, match="integers"):
        codebook_usage([0.5], 8)
