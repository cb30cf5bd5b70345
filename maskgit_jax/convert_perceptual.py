r"""Converts Keras VGG16 weights into the perceptual loss's Flax parameters (Orbax).

  python -m maskgit_jax.convert_perceptual --input=vgg16.weights.h5 --output=DIR

The user supplies the weights; nothing is downloaded. Accepted files, read with h5py only:
  * Keras 3 `model.save_weights("vgg16.weights.h5")` of `keras.applications.VGG16` (layers
    stored as `layers/conv2d_N/vars/{0,1}`, the Keras layer name in the `vars` group's
    `name` attribute), or the same inside a Keras 3 `.keras` archive;
  * the classic Keras 2 layout, e.g. `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`
    (one group per layer name, its arrays listed by the group's `weight_names` attribute),
    also nested under `model_weights` as in a full-model Keras 2 `.h5`.
Every VGG16 conv layer is checked by name and shape before anything is written.
"""

import io
import os
import re
import zipfile
from typing import Any

import h5py
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath

from maskgit_jax.checkpoints import official as official_checkpoint
from maskgit_jax.models import perceptual

HOW_TO_GET_WEIGHTS = (
    "Produce the VGG16 weights on a machine with internet access:\n"
    '  python -c "import keras; keras.applications.VGG16(include_top=False, '
    "weights='imagenet').save_weights('vgg16.weights.h5')\"\n"
    "then convert them:\n"
    "  python -m maskgit_jax.convert_perceptual --input=vgg16.weights.h5 --output=DIR"
)
# The weights file inside a Keras 3 `.keras` archive.
_KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"


class PerceptualWeightsError(ValueError):
    """A weight file is unreadable or does not hold the VGG16 layers with their shapes."""


def _open_h5(path: epath.Path) -> h5py.File:
    with path.open("rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"
    if is_zip:
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
            if _KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
                raise PerceptualWeightsError(
                    f"{path} is a zip archive without {_KERAS_ARCHIVE_WEIGHTS}; not a .keras file."
                )
            return h5py.File(io.BytesIO(archive.read(_KERAS_ARCHIVE_WEIGHTS)), "r")
    if "://" in os.fspath(path):
        return h5py.File(io.BytesIO(path.read_bytes()), "r")
    return h5py.File(os.fspath(path), "r")


def _datasets(group: h5py.Group) -> list[np.ndarray]:
    # Every array below `group`, in h5py's (alphabetical) order.
    found: list[np.ndarray] = []
    group.visititems(
        lambda _, item: found.append(np.asarray(item)) if isinstance(item, h5py.Dataset) else None
    )
    return found


def _as_str(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_keras3(layers: h5py.Group) -> dict[str, list[np.ndarray]]:
    # Keras 3: `layers/<class-based path>/vars/<index>`; paths are `conv2d`, `conv2d_1`, ... in
    # layer order, and recent versions record the layer's own name on the `vars` group.
    named: dict[str, list[np.ndarray]] = {}
    unnamed_convs: list[tuple[int, list[np.ndarray]]] = []
    for path, entry in layers.items():
        variables = entry.get("vars") if isinstance(entry, h5py.Group) else None
        if variables is None or not len(variables):
            continue
        arrays = [np.asarray(variables[key]) for key in sorted(variables, key=int)]
        name = variables.attrs.get("name")
        if name is not None:
            named[_as_str(name)] = arrays
        elif match := re.fullmatch(r"conv2d(?:_(\d+))?", path):
            unnamed_convs.append((int(match.group(1) or 0), arrays))
    if unnamed_convs and not named:
        # Older Keras 3 files: the i-th `conv2d` path is VGG16's i-th convolution.
        unnamed_convs.sort(key=lambda item: item[0])
        if len(unnamed_convs) != len(perceptual.VGG16_LAYERS):
            raise PerceptualWeightsError(
                f"found {len(unnamed_convs)} unnamed conv layers, VGG16 has "
                f"{len(perceptual.VGG16_LAYERS)}."
            )
        return {
            name: arrays
            for name, (_, arrays) in zip(perceptual.VGG16_LAYERS, unnamed_convs, strict=True)
        }
    return named


def _read_keras2(root: h5py.Group) -> dict[str, list[np.ndarray]]:
    # Keras 2: a group per layer name; `weight_names` gives its arrays' paths in order.
    layers: dict[str, list[np.ndarray]] = {}
    for name, group in root.items():
        if not isinstance(group, h5py.Group):
            continue
        weight_names = group.attrs.get("weight_names")
        if weight_names is not None and len(weight_names):
            layers[name] = [np.asarray(group[_as_str(w)]) for w in weight_names]
        elif arrays := _datasets(group):
            layers[name] = arrays
    return layers


def read_keras_vgg16(path: str | epath.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Reads and checks a Keras VGG16 weight file into `{layer: {"kernel", "bias"}}` (float32).

    Raises FileNotFoundError (with how to produce the file) when absent, and
    PerceptualWeightsError naming the first missing or mis-shaped layer, or any convolution
    VGG16 lacks (e.g. a VGG19 file). Extra non-convolutional layers (the top) are ignored.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VGG16 weight file not found: {path}.\n{HOW_TO_GET_WEIGHTS}")
    try:
        with _open_h5(path) as file:
            root = file["model_weights"] if "model_weights" in file else file
            if isinstance(root.get("layers"), h5py.Group):
                layers = _read_keras3(root["layers"])
            else:
                layers = _read_keras2(root)
    except PerceptualWeightsError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise PerceptualWeightsError(
            f"could not read {path} as a Keras weight file (truncated or another format?): {error}"
        ) from error
    return _check_layers(layers, path)


def _check_layers(
    layers: dict[str, list[np.ndarray]], path: epath.Path
) -> dict[str, dict[str, np.ndarray]]:
    expected = perceptual.abstract_vgg16_params()
    params: dict[str, dict[str, np.ndarray]] = {}
    for name in perceptual.VGG16_LAYERS:
        if name not in layers:
            found = ", ".join(sorted(layers)) or "none"
            raise PerceptualWeightsError(
                f"{path} has no layer {name}, so it is not Keras VGG16 weights "
                f"(layers with weights found: {found})."
            )
        arrays = layers[name]
        kernels = [a for a in arrays if a.ndim == 4]
        biases = [a for a in arrays if a.ndim == 1]
        if len(kernels) != 1 or len(biases) != 1 or len(arrays) != 2:
            shapes = [a.shape for a in arrays]
            raise PerceptualWeightsError(
                f"{path}: layer {name} should hold a kernel and a bias, found shapes {shapes}."
            )
        params[name] = {"kernel": kernels[0], "bias": biases[0]}
        for kind, array in params[name].items():
            want = expected[name][kind].shape
            if array.shape != want:
                raise PerceptualWeightsError(
                    f"{path}: {name}/{kind} has shape {array.shape}, VGG16 expects {want}."
                )
            params[name][kind] = array.astype(np.float32)
    extra = [
        n for n, arrays in layers.items() if n not in params and any(a.ndim == 4 for a in arrays)
    ]
    if extra:
        raise PerceptualWeightsError(
            f"{path} holds convolutions VGG16 does not have ({', '.join(sorted(extra))}); "
            "is it another network (e.g. VGG19)?"
        )
    return params


def _local_absolute(path: epath.Path) -> epath.Path:
    # Orbax needs absolute paths; remote (gs://) paths already are.
    return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(os.fspath(path)))


def save_perceptual_params(
    directory: str | epath.PathLike, params: dict[str, Any], overwrite: bool = False
) -> epath.Path:
    """Writes `{"params": params}` with Orbax; refuses a non-empty directory unless `overwrite`."""
    directory = _local_absolute(epath.Path(directory))
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; choose a new output directory.")
    official_checkpoint.check_tree_matches(
        perceptual.abstract_vgg16_params(), params, "VGG16 parameters"
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, {"params": params}, force=True)
    checkpointer.wait_until_finished()
    return directory


def convert(input_path: str | epath.PathLike, output: str | epath.PathLike) -> epath.Path:
    """Reads and checks a Keras VGG16 weight file, then saves it as Flax params at `output`."""
    return save_perceptual_params(output, read_keras_vgg16(input_path))


def load_perceptual_params(
    directory: str | epath.PathLike, sharding: jax.sharding.Sharding | None = None
) -> dict[str, Any]:
    """Loads the converted VGG16 params (for `VGG16Features`), checking names and shapes.

    Arrays land with `sharding` (default: the first local device). A missing directory raises
    FileNotFoundError explaining how to produce it.
    """
    directory = _local_absolute(epath.Path(directory))
    if not directory.exists():
        raise FileNotFoundError(
            f"perceptual-loss weights not found at {directory}. {HOW_TO_GET_WEIGHTS}"
        )
    expected = {"params": perceptual.abstract_vgg16_params()}
    checkpointer = ocp.StandardCheckpointer()
    try:
        item_metadata = checkpointer.metadata(directory).item_metadata
    except (FileNotFoundError, ValueError):
        item_metadata = None
    found = getattr(item_metadata, "tree", None)
    if found is None:
        raise FileNotFoundError(
            f"{directory} is not a converted perceptual-weights directory. {HOW_TO_GET_WEIGHTS}"
        )
    official_checkpoint.check_tree_matches(expected, found, f"VGG16 parameters at {directory}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), expected
    )
    return checkpointer.restore(directory, target)["params"]


def _define_flags() -> None:
    # Defined only when run as a script, so importing `load_perceptual_params` for training
    # adds no flags that could clash with the trainer's own.
    flags.DEFINE_string("input", None, "Keras VGG16 weights: Keras 3 .weights.h5/.keras or 2 .h5.")
    flags.DEFINE_string("output", None, "Directory to write (new or empty).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
    flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    """Converts --input into --output."""
    del argv
    params = read_keras_vgg16(flags.FLAGS.input)
    directory = save_perceptual_params(flags.FLAGS.output, params, overwrite=flags.FLAGS.overwrite)
    logging.info("Wrote VGG16 perceptual-loss parameters to %s", directory)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
