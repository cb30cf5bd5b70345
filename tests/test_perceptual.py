"""VGG16 perceptual features against Keras, the weight-file converter, and the loss."""

import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskgit_jax import convert_perceptual
from maskgit_jax.models import perceptual

keras = pytest.importorskip("keras")

SIZE = 32


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """A randomly initialised Keras VGG16 (no download) saved as Keras 3 weights."""
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    folder = tmp_path_factory.mktemp("vgg16")
    weights = folder / "vgg16.weights.h5"
    model.save_weights(str(weights))
    return model, weights


@pytest.fixture(scope="module")
def converted(vgg, tmp_path_factory):
    _, weights = vgg
    output = tmp_path_factory.mktemp("converted") / "vgg16"
    convert_perceptual.convert(weights, output)
    return output, convert_perceptual.load_perceptual_params(output)


def _keras_weights(model):
    return {
        name: dict(zip(("kernel", "bias"), model.get_layer(name).get_weights(), strict=True))
        for name in perceptual.VGG16_LAYERS
    }


def _write_classic(model, path):
    # The published Keras 2 notop file's layout: a group per layer, arrays named
    # `<layer>_W_1:0` / `<layer>_b_1:0` and listed in the group's `weight_names`.
    names = [layer.name for layer in model.layers]
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [n.encode() for n in names]
        file.attrs["backend"] = b"tensorflow"
        for layer in model.layers:
            group = file.create_group(layer.name)
            arrays = layer.get_weights()
            weight_names = [f"{layer.name}_{k}_1:0" for k in ("W", "b")[: len(arrays)]]
            group.attrs["weight_names"] = [w.encode() for w in weight_names]
            for name, array in zip(weight_names, arrays, strict=True):
                group.create_dataset(name, data=array)


def _copy(src, tmp_path, name="copy.weights.h5"):
    path = tmp_path / name
    shutil.copy(src, path)
    return path


def test_features_match_keras_intermediate_outputs(vgg, converted):
    model, _ = vgg
    _, params = converted
    layers = perceptual.VGG16_LAYERS
    reference = keras.Model(model.input, [model.get_layer(n).output for n in layers])
    images = np.random.default_rng(0).uniform(size=(3, SIZE, SIZE, 3)).astype(np.float32)
    expected = reference(keras.applications.vgg16.preprocess_input(images * 255.0))
    found = jax.jit(perceptual.vgg16_features_fn(layers))(params, jnp.asarray(images))
    assert list(found) == list(layers)
    for name, want in zip(layers, expected, strict=True):
        want = np.asarray(want)
        got = np.asarray(found[name])
        assert got.shape == want.shape, name
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_default_layers_and_preprocessing():
    assert perceptual.DEFAULT_FEATURE_LAYERS[-1] == "block5_conv3"
    image = jnp.zeros((1, 1, 1, 3)).at[..., 0].set(1.0)  # pure red
    np.testing.assert_allclose(
        perceptual.preprocess_images(image)[0, 0, 0], [-103.939, -116.779, 255.0 - 123.68]
    )
    with pytest.raises(ValueError, match="block6_conv1"):
        perceptual.VGG16Features(feature_layers=("block6_conv1",)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))
        )


def test_converted_params_are_the_keras_weights(vgg, converted):
    model, _ = vgg
    _, params = converted
    expected = _keras_weights(model)
    assert set(params) == set(perceptual.VGG16_LAYERS)
    for name in perceptual.VGG16_LAYERS:
        for kind in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(params[name][kind]), expected[name][kind])


def test_reads_classic_keras2_layout_and_keras_archive(vgg, tmp_path):
    model, _ = vgg
    expected = _keras_weights(model)
    classic = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    _write_classic(model, classic)
    # The hand-written file is what Keras itself accepts as Keras 2 weights.
    clone = keras.models.clone_model(model)
    clone.load_weights(str(classic))
    np.testing.assert_array_equal(clone.get_layer("block5_conv3").get_weights()[0],
                                  expected["block5_conv3"]["kernel"])  # fmt: skip
    archive = tmp_path / "vgg16.keras"
    model.save(str(archive))
    for path in (classic, archive):
        read = convert_perceptual.read_keras_vgg16(path)
        for name in perceptual.VGG16_LAYERS:
            np.testing.assert_array_equal(read[name]["kernel"], expected[name]["kernel"])
            np.testing.assert_array_equal(read[name]["bias"], expected[name]["bias"])


def test_reads_keras3_file_without_layer_names(vgg, tmp_path):
    # Older Keras 3 files lack the `name` attribute; conv paths then map in layer order.
    model, weights = vgg
    path = _copy(weights, tmp_path)
    with h5py.File(path, "r+") as file:
        for entry in file["layers"].values():
            entry["vars"].attrs.pop("name", None)
    read = convert_perceptual.read_keras_vgg16(path)
    expected = _keras_weights(model)
    for name in perceptual.VGG16_LAYERS:
        np.testing.assert_array_equal(read[name]["kernel"], expected[name]["kernel"])


def test_truncated_file_is_rejected(vgg, tmp_path):
    _, weights = vgg
    data = weights.read_bytes()
    truncated = tmp_path / "truncated.weights.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert_perceptual.PerceptualWeightsError, match="truncated"):
        convert_perceptual.read_keras_vgg16(truncated)


def test_missing_layer_is_named(vgg, tmp_path):
    _, weights = vgg
    path = _copy(weights, tmp_path)
    with h5py.File(path, "r+") as file:
        for entry in file["layers"].values():
            if entry["vars"].attrs.get("name") == "block4_conv1":
                del entry["vars"]["0"], entry["vars"]["1"]
    with pytest.raises(convert_perceptual.PerceptualWeightsError, match="no layer block4_conv1"):
        convert_perceptual.read_keras_vgg16(path)


def test_misshaped_layer_is_named(vgg, tmp_path):
    _, weights = vgg
    path = _copy(weights, tmp_path)
    with h5py.File(path, "r+") as file:
        for entry in file["layers"].values():
            if entry["vars"].attrs.get("name") == "block3_conv2":
                del entry["vars"]["0"]
                entry["vars"]["0"] = np.zeros((3, 3, 256, 128), np.float32)
    with pytest.raises(
        convert_perceptual.PerceptualWeightsError, match=r"block3_conv2/kernel.*\(3, 3, 256, 256\)"
    ):
        convert_perceptual.read_keras_vgg16(path)


def test_extra_convolution_is_rejected(vgg, tmp_path):
    model, _ = vgg
    path = tmp_path / "vgg19_like.h5"
    _write_classic(model, path)
    with h5py.File(path, "r+") as file:
        group = file.create_group("block3_conv4")
        group.attrs["weight_names"] = [b"block3_conv4_W_1:0", b"block3_conv4_b_1:0"]
        group["block3_conv4_W_1:0"] = np.zeros((3, 3, 256, 256), np.float32)
        group["block3_conv4_b_1:0"] = np.zeros((256,), np.float32)
    with pytest.raises(convert_perceptual.PerceptualWeightsError, match="block3_conv4"):
        convert_perceptual.read_keras_vgg16(path)


def test_missing_files_explain_how_to_get_weights(converted, tmp_path):
    with pytest.raises(FileNotFoundError, match="save_weights"):
        convert_perceptual.read_keras_vgg16(tmp_path / "absent.weights.h5")
    with pytest.raises(FileNotFoundError, match="save_weights"):
        convert_perceptual.load_perceptual_params(tmp_path / "absent")
    (tmp_path / "not_converted").mkdir()
    (tmp_path / "not_converted" / "vgg16.weights.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a converted"):
        convert_perceptual.load_perceptual_params(tmp_path / "not_converted")
    output, params = converted
    with pytest.raises(FileExistsError):
        convert_perceptual.save_perceptual_params(output, params)


def test_perceptual_loss_zero_positive_and_differentiable(converted):
    _, params = converted
    features_fn = perceptual.vgg16_features_fn()
    rng = np.random.default_rng(1)
    images_a = jnp.asarray(rng.uniform(size=(2, SIZE, SIZE, 3)), jnp.float32)
    images_b = jnp.asarray(rng.uniform(size=(2, SIZE, SIZE, 3)), jnp.float32)

    loss_and_grad = jax.jit(
        jax.value_and_grad(lambda a, b: perceptual.perceptual_loss(features_fn, params, a, b))
    )
    same, same_grad = loss_and_grad(images_a, images_a)
    # Zero up to float32 rounding, and a minimum: the gradient vanishes there too.
    assert 0.0 <= float(same) < 1e-8
    assert np.all(np.isfinite(np.asarray(same_grad)))
    assert np.abs(np.asarray(same_grad)).max() < 1e-6

    loss, grad = loss_and_grad(images_a, images_b)
    grad = np.asarray(grad)
    assert float(loss) > 0.0
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0

    # Closer images are closer perceptually.
    nearer, _ = loss_and_grad(images_a, 0.9 * images_a + 0.1 * images_b)
    assert 0.0 < float(nearer) < float(loss)


def test_perceptual_loss_formula():
    # A stand-in feature function with two "layers", so the formula is checked cheaply.
    def features_fn(params, images):
        return {"pixels": images, "shifted": jnp.square(images) + params}

    rng = np.random.default_rng(2)
    images_a = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    images_b = rng.uniform(size=(2, 4, 5, 3)).astype(np.float32)
    loss = perceptual.perceptual_loss(features_fn, 0.5, jnp.asarray(images_a), images_b)
    expected = 0.0
    for fa, fb in ((images_a, images_b), (images_a**2 + 0.5, images_b**2 + 0.5)):
        na = fa / np.linalg.norm(fa, axis=-1, keepdims=True)
        nb = fb / np.linalg.norm(fb, axis=-1, keepdims=True)
        term = ((na - nb) ** 2).sum(-1).mean()
        assert 0.0 < term <= 4.0
        expected += term
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        perceptual.perceptual_loss(features_fn, 0.5, images_a, images_b[:1])
