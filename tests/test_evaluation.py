"""Tests of the evaluation metrics, the FID Inception converter and rejection sampling.

The converter test builds a GraphDef with the real graph's node names, ops, shapes and
attributes (BatchNormWithGlobalNormalization at GraphDef producer version 5, as in the
2015-12-05 file) and random weights (`tests/inception_graph.py`), runs it in TensorFlow at
299x299, and compares with the Flax network on the converted parameters.
"""

import numpy as np
import pytest
import scipy.linalg

from maskgit_jax.evaluation import inception, metrics, rejection
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


def test_rejection_keeps_top_fraction_per_class():
    num_classes, batch_size = 5, 7
    labels = np.array([0, 1, 1, 2, 4, 4, 4, 0, 2, 1])
    perm = np.random.default_rng(5).permutation(num_classes + 3)[:num_classes]
    drawn = []

    def sample_fn(batch_labels, rng):
        import jax

        assert batch_labels.shape == (batch_size,)
        score = np.asarray(jax.random.uniform(rng, (batch_size,)))
        images = np.stack([batch_labels.astype(float), score], axis=1)
        drawn.append(images)
        return images

    def classifier_fn(images):
        logits = np.zeros((len(images), num_classes + 3))
        logits[np.arange(len(images)), perm[images[:, 0].astype(int)]] = 10 * images[:, 1]
        return {"logits": logits}

    import jax

    kept = rejection.rejection_sample(
        sample_fn,
        classifier_fn,
        labels,
        jax.random.PRNGKey(0),
        acceptance_rate=0.25,
        batch_size=batch_size,
        class_index=perm,
    )
    assert kept.shape == (labels.size, 2)
    np.testing.assert_array_equal(kept[:, 0], labels)
    everything = np.concatenate(drawn)
    for c, n in zip(*np.unique(labels, return_counts=True), strict=True):
        candidates = everything[everything[:, 0] == c, 1]
        assert len(candidates) >= 4 * n  # ceil(n / 0.25) real draws (+ batch padding)
        scores = np.sort(candidates[: 4 * n])[::-1][:n]
        np.testing.assert_allclose(kept[labels == c, 1], scores)

    drawn.clear()
    everything_kept = rejection.rejection_sample(
        sample_fn,
        classifier_fn,
        labels,
        jax.random.PRNGKey(1),
        acceptance_rate=1.0,
        batch_size=batch_size,
        class_index=perm,
    )
    assert sum(len(d) for d in drawn) == 14  # 10 candidates in two padded batches
    np.testing.assert_array_equal(everything_kept[:, 0], labels)


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
    import jax

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


def test_evaluate_report_from_sampled_outputs():
    import jax

    from maskgit_jax import evaluate

    def sample_fn(labels, rng):
        noise = np.asarray(jax.random.normal(rng, (len(labels), 4)))
        return np.concatenate([np.eye(6)[labels] * 5.0, noise], axis=1)

    def inception_fn(images):
        return {"pool_3": images, "logits": images[:, :6] * 4.0}

    labels = np.arange(60) % 6
    outputs = evaluate.sample_outputs(
        sample_fn, inception_fn, labels, jax.random.PRNGKey(0), batch_size=16
    )
    assert outputs["pool_3"].shape == (60, 10) and outputs["logits"].shape == (60, 6)
    mu, sigma = metrics.compute_statistics(outputs["pool_3"])
    result = evaluate.report(outputs, {"mu": mu, "sigma": sigma}, splits=2, k=3)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and "precision" not in result
    assert 5.0 < result["inception_score"] <= 6.0
    with_features = {"mu": mu + 1.0, "sigma": sigma, "features": outputs["pool_3"]}
    result = evaluate.report(outputs, with_features, splits=2, k=3)
    assert result["fid"] == pytest.approx(10.0, rel=1e-6)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)
