"""The digits quality judges (`evaluation.digits_quality`) and `benchmarks/digits_quality.py`."""

import os
import subprocess
import sys

import numpy as np
import pytest

from maskgit_jax.evaluation import digits_quality
from tests.conftest import REPO_ROOT
from tests.helpers import load_config_file, save_random_pretrained


def test_features_pool_each_digit_pixel_back_exactly():
    digits = np.random.default_rng(0).random((3, 8, 8))
    images = np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)[..., None].repeat(3, axis=-1)
    np.testing.assert_allclose(
        digits_quality.digit_features(images), digits.reshape(3, 64), rtol=1e-6
    )
    with pytest.raises(ValueError, match="multiple of 8"):
        digits_quality.digit_features(np.zeros((3, 12, 12, 3)))


def test_within_class_diversity_is_the_mean_pairwise_distance_per_class():
    features = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    labels = np.array([0, 0, 1, 1, 2])  # Class 2 has one image: it is left out.
    # Class 0: one pair at distance 5; class 1: identical images, distance 0.
    assert digits_quality.within_class_diversity(features, labels) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="at least two images"):
        digits_quality.within_class_diversity(features[:1], labels[:1])


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(1)
    features, bank = rng.random((7, 5)), rng.random((11, 5))
    brute = np.linalg.norm(features[:, None] - bank[None], axis=-1).min(axis=1)
    np.testing.assert_allclose(digits_quality.nearest_distances(features, bank), brute, atol=1e-6)


@pytest.fixture(scope="module")
def reference():
    return digits_quality.DigitsReference(image_size=16)


def test_real_digits_set_the_scales(reference):
    real, train = reference.real_rows()
    assert (real.count, train.count) == (297, 1500)
    assert real.frechet == pytest.approx(0.0, abs=1e-6)
    assert train.frechet > 0.01
    # Near-copies are calibrated on the held-out digits, and training digits copy themselves.
    assert real.near_copies == pytest.approx(digits_quality.NEAR_COPY_PERCENTILE / 100, abs=0.01)
    assert train.near_copies == 1.0
    assert 0.9 < real.accuracy < 1.0 and train.accuracy > real.accuracy
    assert train.diversity == pytest.approx(real.diversity, rel=0.1)


def test_class_means_score_as_collapsed_and_copies_as_copies(reference):
    labels = reference.train_labels
    means = np.stack([reference.train_images[labels == c].mean(axis=0) for c in range(10)])
    collapsed = reference.score("class means", means[labels], labels)
    real = reference.real_rows()[0]
    assert collapsed.diversity == pytest.approx(0.0, abs=1e-6)
    assert collapsed.frechet > 5 * reference.real_rows()[1].frechet
    copies = reference.score("copies", reference.train_images[:300], labels[:300])
    assert copies.near_copies == 1.0 and copies.accuracy > real.accuracy
    with pytest.raises(ValueError, match="labels"):
        reference.score("mismatched", means, labels)


@pytest.fixture(scope="module")
def random_digits_model(tmp_path_factory):
    """A pretrained directory of the digits config with random weights."""
    directory = tmp_path_factory.mktemp("digits_quality") / "pretrained"
    return save_random_pretrained(directory, load_config_file("configs/digits.py"))


def test_benchmark_prints_the_table_of_a_model(random_digits_model):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    relative = os.path.relpath(random_digits_model, random_digits_model.parent.parent)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "digits_quality.py"),
            f"--pretrained={relative}",
        ],
        cwd=random_digits_model.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert rows["held-out digits"][0] == "297"
    assert rows["held-out digits"][4] == "1.000"  # Diversity against itself.
    assert rows["training digits"][3] == "1.00"  # The Fréchet baseline against itself.
    assert rows["reconstructions of training digits"][0] == "1500"
    samples = rows["samples, config defaults"]
    assert samples[0] == "1500"
    # Random weights draw noise, not digits: far from the data.
    assert float(samples[3]) > 2.0
    config = load_config_file("configs/digits.py")
    side = config.image_size // 2 ** (len(config.tokenizer.channel_multipliers) - 1)
    assert f"{side}x{side} tokens, {config.tokenizer.codebook_size} codes" in done.stdout
