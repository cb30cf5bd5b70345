"""Tests of the evaluation metrics, the FID Inception converter, rejection sampling, the
rows (keys) of each process's samples and reference statistics files (ours and ADM's).

The converter test builds a GraphDef with the real graph's node names, ops, shapes and
attributes (BatchNormWithGlobalNormalization at GraphDef producer version 5, as in the
2015-12-05 file) and random weights (`tests/inception_graph.py`), runs it in TensorFlow at
299x299, and compares with the Flax network on the converted parameters.
"""

import jax
import numpy as np
import pytest
import scipy.linalg

from maskgit_jax.evaluation import inception, metrics, reference_sets, rejection, samples
from tests.inception_graph import build_graph

# ---------------------------------------------------------------------------------- metrics


def _random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_fid_matches_independent_sqrtm_computation():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    # Independent form: tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2), symmetric PSD roots.
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)
    assert metrics.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert metrics.fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fid_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    d = 10
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.fid_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(5, 20))  # 5 points in 20-d: rank-4 covariance
    mu, sigma = metrics.compute_statistics(features)
    mu2, sigma2 = metrics.compute_statistics(features + 1.0)
    fid = metrics.fid_from_stats(mu, sigma, mu2, sigma2)
    assert np.isfinite(fid) and fid == pytest.approx(20.0, abs=1e-2)


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(50, 8)).astype(np.float32)
    metrics.save_statistics(tmp_path / "ref.npz", features, keep_features=True)
    stats = metrics.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_allclose(stats["mu"], features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(features.T.astype(np.float64)), rtol=1e-12)
    np.testing.assert_array_equal(stats["features"], features)
    with pytest.raises(FileNotFoundError, match="--mode=reference"):
        metrics.load_statistics(tmp_path / "missing.npz")


def _adm_batch(path, rng, n=6, d=2048):
    """An ADM reference batch: mu, sigma, uint8 images as arr_0, sFID statistics."""
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    features = rng.normal(size=(n, d))
    np.savez(
        path,
        images,
        mu=features.mean(0),
        sigma=np.cov(features, rowvar=False),
        mu_s=np.zeros(7),
        sigma_s=np.eye(7),
    )
    return images


def test_adm_reference_batch_is_read_with_its_images(tmp_path):
    images = _adm_batch(tmp_path / "adm.npz", np.random.default_rng(9))
    plain = metrics.load_statistics(tmp_path / "adm.npz", feature_dim=inception.FEATURE_DIM)
    assert sorted(plain) == ["mu", "sigma"]
    stats = metrics.load_statistics(tmp_path / "adm.npz", feature_dim=2048, images=True)
    assert sorted(stats) == ["images", "mu", "sigma"]
    np.testing.assert_array_equal(stats["images"], images)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    # With stored features the images are not read: the features are what they would give.
    np.savez(
        tmp_path / "both.npz",
        images,
        mu=stats["mu"],
        sigma=stats["sigma"],
        features=np.ones((6, 2048)),
    )
    both = metrics.load_statistics(tmp_path / "both.npz", feature_dim=2048, images=True)
    assert sorted(both) == ["features", "mu", "sigma"]


def test_with_image_features_runs_the_images_once_in_padded_batches(tmp_path):
    images = _adm_batch(tmp_path / "adm.npz", np.random.default_rng(10), n=7, d=3)
    stats = metrics.load_statistics(tmp_path / "adm.npz", images=True)
    calls = []

    def inception_fn(batch):
        calls.append(batch.shape)
        return {"pool_3": batch.reshape(len(batch), -1)[:, :5] * 2.0}

    done = reference_sets.with_image_features(stats, inception_fn, batch_size=4)
    assert calls == [(4, 4, 4, 3), (4, 4, 4, 3)]  # 7 images: one shape, the last padded
    assert "images" not in done and "images" in stats  # the caller's dict is not changed
    want = images.reshape(7, -1)[:, :5].astype(np.float32) / 255.0 * 2.0
    np.testing.assert_allclose(done["features"], want, rtol=1e-6)
    calls.clear()
    assert reference_sets.with_image_features(done, inception_fn, 4) == done and not calls


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"mu": np.zeros(3)}, "has no 'sigma' array"),
        ({"mu": np.zeros(3), "sigma": np.zeros((3, 2))}, r"are not \[D\], \[D, D\]"),
        ({"mu": np.zeros(8), "sigma": np.eye(8)}, "8-d features .* are 2048-d"),
        (
            {"mu": np.zeros(2048), "sigma": np.eye(2048), "features": np.zeros((4, 8))},
            r"features \(4, 8\) are not \[N, 2048\]",
        ),
        (
            {"mu": np.zeros(2048), "sigma": np.eye(2048), "arr_0": np.zeros((2, 4, 4, 3))},
            "'arr_0' is float64 .* uint8 images",
        ),
    ],
)
def test_load_statistics_names_what_is_wrong(tmp_path, arrays, match):
    np.savez(tmp_path / "stats.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        metrics.load_statistics(tmp_path / "stats.npz", feature_dim=2048, images=True)


def test_load_statistics_of_a_file_that_is_not_npz(tmp_path):
    (tmp_path / "stats.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="is not an .npz statistics file"):
        metrics.load_statistics(tmp_path / "stats.npz")


@pytest.mark.parametrize(
    "n, m, rel",
    [(6, 9, 1e-7), (9, 6, 1e-7), (12, 13, 1e-7), (13, 12, 1e-7), (3, 40, 1e-7), (40, 30, 1e-12)],
)
def test_fast_fid_equals_fid_from_stats(n, m, rel):
    """N or M <= D = 12 (low rank) and both > D: the fast forms equal `fid_from_stats`.

    With a rank-deficient covariance the matrix square root itself is good to ~1e-8 only
    (float64 roots of eigenvalues near 0), hence float32 precision; full rank: float64.
    """
    rng = np.random.default_rng(n)
    d = 12
    a = rng.normal(size=(n, d))
    b = 1.5 * rng.normal(size=(m, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.3
    (mu_a, sigma_a), (mu_b, sigma_b) = metrics.compute_statistics(a), metrics.compute_statistics(b)
    expected = metrics.fid_from_stats(mu_a, sigma_a, mu_b, sigma_b)
    assert expected > 1.0
    assert metrics.fid_between(a, b) == pytest.approx(expected, rel=rel)
    assert metrics.fid_to_reference(a, mu_b, sigma_b) == pytest.approx(expected, rel=rel)


def test_fast_fid_of_features_against_themselves_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(0, 2, (8, 2048)).astype(np.float32)
    other = features + rng.normal(0, 0.5, features.shape).astype(np.float32)
    assert metrics.fid_between(features, features) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid_between(features, other) > 100.0
    mu, sigma = metrics.compute_statistics(features)
    assert metrics.fid_to_reference(features, mu, sigma) == pytest.approx(0.0, abs=1e-3)
    assert metrics.fid_to_reference(features, mu + 1.0, sigma) == pytest.approx(2048.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.fid_between(features[:1], features)
    with pytest.raises(ValueError, match="do not match the reference statistics"):
        metrics.fid_to_reference(features[:, :8], mu, sigma)


def test_inception_score_extremes():
    n, c = 100, 10
    uniform = np.full((n, c), 1.0 / c)
    assert metrics.inception_score(uniform, splits=1)[0] == pytest.approx(1.0)
    assert metrics.inception_score(np.zeros((n, c)), splits=1)[0] == pytest.approx(1.0)
    one_hot = np.eye(c)[np.arange(n) % c]
    mean, std = metrics.inception_score(one_hot, splits=10)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
    logits = 50.0 * one_hot  # confident logits: close to c
    assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(c, rel=1e-6)


def test_precision_recall_sanity():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 16))
    assert metrics.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = rng.normal(size=(150, 16)) + 100.0
    assert metrics.precision_recall(real, far, k=3, batch_size=64) == (0.0, 0.0)
    # Fakes covering half of the real modes: precision ~1, recall ~0.5.
    modes = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 50.0])
    half = rng.normal(size=(300, 2))
    precision, recall = metrics.precision_recall(modes, half, k=3)
    assert precision > 0.9 and 0.4 <= recall <= 0.5


# --------------------------------------------------------------------- rejection sampling


def _row_images(batch_labels, row):
    """Fake images [B, 3]: label, the global row, and a score drawn from the row's key."""
    rows = row + np.arange(len(batch_labels))
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(0), r))(rows)
    score = np.asarray(jax.vmap(lambda k: jax.random.uniform(k))(keys))
    return np.stack([batch_labels.astype(float), rows, score], axis=1)


def test_rejection_keeps_top_fraction_per_class():
    num_classes, batch_size = 5, 7
    labels = np.array([0, 1, 1, 2, 4, 4, 4, 0, 2, 1])
    perm = np.random.default_rng(5).permutation(num_classes + 3)[:num_classes]
    drawn = []

    def sample_fn(batch_labels, row):
        assert batch_labels.shape == (batch_size,)
        drawn.append(_row_images(batch_labels, row))
        return drawn[-1]

    def classifier_fn(images):
        logits = np.zeros((len(images), num_classes + 3))
        logits[np.arange(len(images)), perm[images[:, 0].astype(int)]] = 10 * images[:, 2]
        return {"logits": logits}

    kept = rejection.rejection_sample(
        sample_fn,
        classifier_fn,
        labels,
        acceptance_rate=0.25,
        batch_size=batch_size,
        class_index=perm,
    )
    assert kept.shape == (labels.size, 3)
    np.testing.assert_array_equal(kept[:, 0], labels)
    everything = np.concatenate(drawn)
    # The labels themselves are rows 0..9, then 4n - n extra draws per class (row 10 on).
    np.testing.assert_array_equal(everything[:10, :2], np.stack([labels, np.arange(10)], 1))
    real = everything[np.isin(np.arange(len(everything)), np.r_[0:10, 14 : 14 + 30])]
    np.testing.assert_array_equal(np.sort(real[:, 1]), np.arange(40))
    for c, n in zip(*np.unique(labels, return_counts=True), strict=True):
        candidates = real[real[:, 0] == c, 2]
        assert len(candidates) == 4 * n  # ceil(n / 0.25) draws
        np.testing.assert_allclose(kept[labels == c, 2], np.sort(candidates)[::-1][:n])

    drawn.clear()
    in_order = rejection.rejection_sample(
        sample_fn,
        classifier_fn,
        labels,
        acceptance_rate=1.0,
        batch_size=batch_size,
        row_offset=100,
    )
    assert sum(len(d) for d in drawn) == 14  # 10 candidates in two padded batches
    # Acceptance rate 1: row i is the image of global row 100 + i, whatever the batch size.
    np.testing.assert_array_equal(in_order, _row_images(labels, 100))


@pytest.mark.parametrize("rate", [1.0, 0.3])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_process_shares_sample_disjoint_rows(rate, count):
    """Each candidate of an evaluation split over `count` processes has its own global row."""
    num_samples, num_classes = 23, 4
    labels = samples.all_labels(num_samples, num_classes)
    rows, kept = [], []
    for index in range(count):
        share = samples.process_share(
            num_samples, num_classes, rate, process_index=index, process_count=count
        )
        assert share.row_offset == sum(len(s) for s in np.array_split(labels, count)[:index])

        def sample_fn(batch_labels, row):
            rows.extend(range(row, row + len(batch_labels)))
            return _row_images(batch_labels, row)

        kept.append(
            rejection.rejection_sample(
                sample_fn,
                lambda images: {"logits": np.eye(num_classes)[images[:, 0].astype(int)]},
                share.labels,
                acceptance_rate=rate,
                # Plain sampling in batches of several sizes (padding included); rejection
                # one candidate at a time, so that every row recorded is a real draw.
                batch_size=5 + index if rate == 1.0 else 1,
                row_offset=share.row_offset,
                extra_row_offset=share.extra_row_offset,
            )
        )
    if rate == 1.0:
        # The processes together: label i at row i, as one call for all labels samples.
        np.testing.assert_array_equal(np.concatenate(kept), _row_images(labels, 0))
    else:
        extras = sum(
            rejection.extra_candidates(s, rate).size for s in np.array_split(labels, count)
        )
        assert extras > num_samples
        np.testing.assert_array_equal(np.sort(rows), np.arange(num_samples + extras))


def test_inception_class_index(tmp_path):
    synsets = [f"n{i:08d}" for i in range(1000)]
    nodes = np.random.default_rng(6).permutation(np.arange(1, 1001))
    text = "".join(
        f'entry {{\n  target_class: {node}\n  target_class_string: "{s}"\n}}\n'
        for node, s in zip(nodes[::-1], synsets[::-1], strict=True)
    )
    (tmp_path / "map.pbtxt").write_text(text)
    np.testing.assert_array_equal(rejection.inception_class_index(tmp_path / "map.pbtxt"), nodes)


# ------------------------------------------------------------------- Inception converter


@pytest.fixture(scope="module")
def synthetic_graph(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")
    graph_def = build_graph(tf)
    path = tmp_path_factory.mktemp("inception") / inception.GRAPH_FILE
    path.write_bytes(graph_def.SerializeToString())
    return tf, graph_def, path


def test_converted_graph_matches_tensorflow(synthetic_graph):
    tf, graph_def, path = synthetic_graph
    params = inception.load_inception_params(path)
    abstract = inception.abstract_params()
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, abstract)

    x = np.random.default_rng(7).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        want_features, want_logits = session.run(
            ["pool_3/_reshape:0", "softmax/logits:0"], {"Mul:0": x}
        )
    model = inception.InceptionV3()
    out = jax.jit(lambda p, x: model.apply({"params": p}, x, preprocessed=True))(params, x)
    scale = np.abs(want_features).max()
    assert scale > 1e-2  # the random network did not collapse to zero
    np.testing.assert_allclose(out["pool_3"], want_features, rtol=1e-4, atol=1e-4 * scale)
    logit_scale = np.abs(want_logits).max()
    np.testing.assert_allclose(out["logits"], want_logits, rtol=1e-4, atol=1e-4 * logit_scale)


def test_loader_errors_name_the_problem(synthetic_graph, tmp_path):
    tf, graph_def, _ = synthetic_graph
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.tgz"):
        inception.load_inception_params(tmp_path / "nope.pb")
    broken = tf.compat.v1.GraphDef()
    broken.CopyFrom(graph_def)
    kept = [n for n in broken.node if n.name != "mixed_5/tower_1/conv_3/batchnorm/gamma"]
    del broken.node[:]
    broken.node.extend(kept)
    (tmp_path / "broken.pb").write_bytes(broken.SerializeToString())
    with pytest.raises(ValueError, match="'mixed_5/tower_1/conv_3/batchnorm/gamma' not found"):
        inception.load_inception_params(tmp_path / "broken.pb")
    (tmp_path / "junk.pb").write_bytes(b"\x00\x01not a graph" * 10)
    with pytest.raises(ValueError):
        inception.load_inception_params(tmp_path / "junk.pb")


def test_preprocess_matches_tensorflow_bilinear():
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(8).uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)
    want = tf.image.resize(images, (299, 299), method="bilinear", antialias=False).numpy()
    got = np.asarray(inception.preprocess(images))
    np.testing.assert_allclose(got, 2 * want - 1, atol=1e-5)
    same = np.asarray(inception.preprocess(np.full((1, 299, 299, 1), 0.25, np.float32)))
    np.testing.assert_allclose(same, np.full((1, 299, 299, 3), -0.5))


def test_report_of_sampled_outputs():
    def sample_fn(labels, row):
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(0), r))(
            row + np.arange(len(labels))
        )
        noise = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys))
        return np.concatenate([np.eye(6)[labels] * 5.0, noise], axis=1)

    def inception_fn(images):
        return {"pool_3": images, "logits": images[:, :6] * 4.0}

    share = samples.process_share(60, 6)
    assert share.row_offset == 0 and len(share.labels) == 60
    outputs = samples.sample_outputs(sample_fn, inception_fn, share, batch_size=16)
    assert outputs["pool_3"].shape == (60, 10) and outputs["logits"].shape == (60, 6)
    np.testing.assert_array_equal(outputs["pool_3"], sample_fn(samples.all_labels(60, 6), 0))
    mu, sigma = metrics.compute_statistics(outputs["pool_3"])
    result = metrics.report(outputs, {"mu": mu, "sigma": sigma}, splits=2, k=3)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and "precision" not in result
    assert 5.0 < result["inception_score"] <= 6.0
    with_features = {"mu": mu + 1.0, "sigma": sigma, "features": outputs["pool_3"]}
    result = metrics.report(outputs, with_features, splits=2, k=3)
    assert result["fid"] == pytest.approx(10.0, rel=1e-6)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
    # k-NN manifolds need more than k points on each side: none with 3 reference features.
    few = {"mu": mu, "sigma": sigma, "features": outputs["pool_3"][:3]}
    assert "precision" not in metrics.report(outputs, few, splits=2, k=3)


def test_apply_fn_compiled_with_forward_options_matches_the_default_compile(synthetic_graph):
    """make_apply_fn takes float32's compile options (XLA's own CPU convolutions); same outputs."""
    _, _, path = synthetic_graph
    params = inception.load_inception_params(path)
    images = np.random.default_rng(9).uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)
    got = inception.make_apply_fn(params)(images)
    model = inception.InceptionV3()
    want = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    for name in ("pool_3", "logits"):
        scale = np.abs(np.asarray(want[name])).max()
        assert scale > 1e-2
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale)
