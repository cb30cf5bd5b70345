"""TFDS builder of random crops of the photographs bundled with scikit-image and scikit-learn.

A real-image dataset that needs no download, for checking a tokenizer on natural images:
the train split holds crops of TRAIN_PHOTOS, the test split crops of TEST_PHOTOS, and no
photograph appears in both, so test crops are never seen in training. Every crop is a square
of random side (log-uniform between the crop size and half the photo's shorter side) at a
random position, resized to the crop size with PIL's antialiased Lanczos filter. Positions
and sides come from a fixed seed per (split, photo), so the dataset is the same on every
preparation. Grayscale photos are repeated to RGB and alpha channels are dropped.

Images are stored as PNG-encoded uint8 RGB. The label is the index of the source photo:
meaningful for train (`NUM_CLASSES` = number of train photos), but for test it is only the
test photo's index modulo `NUM_CLASSES`, kept to fit the pipeline's {"image", "label"}
contract; it names no train class.

Configs: `photos` (= `photos/64px`, 64x64 crops) and `photos/32px` (32x32 crops).
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
import tensorflow_datasets as tfds

# Photographs the train split is cropped from (scikit-image names, plus scikit-learn's china).
TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "china",
    "brick",
    "grass",
    "gravel",
)
# Photographs the test split is cropped from; disjoint from TRAIN_PHOTOS.
TEST_PHOTOS = ("camera", "coins", "moon", "flower", "colorwheel", "retina", "clock")
# Photos that ship with scikit-learn (`load_sample_images`) rather than scikit-image.
_SKLEARN_PHOTOS = ("china", "flower")
# Crops taken from every train / test photograph.
TRAIN_CROPS_PER_PHOTO = 320
TEST_CROPS_PER_PHOTO = 50
# Labels are source-photo indices into TRAIN_PHOTOS.
NUM_CLASSES = len(TRAIN_PHOTOS)
# Base seed of the crop positions and sides.
SEED = 0
# Largest crop side as a fraction of the photo's shorter side.
MAX_SIDE_FRACTION = 0.5


def load_photo(name: str) -> np.ndarray:
    """Returns the bundled photograph `name` as a uint8 RGB [H, W, 3] array (no download)."""
    return _load_photo(name).copy()


@functools.cache
def _load_photo(name: str) -> np.ndarray:
    """Cached loader behind `load_photo`; callers must not modify the returned array."""
    if name in _SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_images  # Lazily: only preparation needs it.

        images = load_sample_images()
        index = [f.rsplit("/", 1)[-1] for f in images.filenames].index(f"{name}.jpg")
        image = images.images[index]
    elif name in TRAIN_PHOTOS + TEST_PHOTOS:
        from skimage import data  # Lazily: only preparation needs it.

        image = getattr(data, name)()
    else:
        raise ValueError(f"Unknown photo {name!r}; use one of {TRAIN_PHOTOS + TEST_PHOTOS}.")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"Photo {name!r} has dtype {image.dtype}, expected uint8.")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def random_crops(
    photo: np.ndarray, num_crops: int, crop_size: int, seed: int
) -> list[tuple[int, int, int]]:
    """Returns `num_crops` (top, left, side) squares inside `photo`, a function of `seed`.

    Sides are log-uniform in [crop_size, MAX_SIDE_FRACTION * min(H, W)] (just crop_size when
    the photo is too small for more); positions are uniform over the valid range.
    """
    height, width = photo.shape[:2]
    low = crop_size
    high = max(low, int(MAX_SIDE_FRACTION * min(height, width)))
    if min(height, width) < low:
        raise ValueError(f"Photo of shape {photo.shape} is smaller than crop_size={crop_size}.")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(num_crops):
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
        side = min(max(side, low), high)
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crops.append((top, left, side))
    return crops


def photo_crops(name: str, split: str, crop_size: int) -> np.ndarray:
    """Returns the uint8 [N, crop_size, crop_size, 3] crops of photo `name` for `split`."""
    from PIL import Image  # Lazily: only preparation needs it.

    if split == "train":
        photos, count = TRAIN_PHOTOS, TRAIN_CROPS_PER_PHOTO
    elif split == "test":
        photos, count = TEST_PHOTOS, TEST_CROPS_PER_PHOTO
    else:
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'test'.")
    if name not in photos:
        raise ValueError(f"Photo {name!r} is not a {split} photo: {photos}.")
    photo = _load_photo(name)
    # A distinct, fixed seed per (split, photo): adding photos never moves existing crops.
    seed = np.random.SeedSequence([SEED, crop_size, int(split == "test"), photos.index(name)])
    out = np.empty((count, crop_size, crop_size, 3), np.uint8)
    for i, (top, left, side) in enumerate(
        random_crops(photo, count, crop_size, int(seed.generate_state(1)[0]))
    ):
        patch = Image.fromarray(photo[top : top + side, left : left + side])
        if side != crop_size:
            patch = patch.resize((crop_size, crop_size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out[i] = np.asarray(patch)
    return out


@dataclasses.dataclass(eq=False)
class PhotosConfig(tfds.core.BuilderConfig):
    """Builder config: the side of the stored square crops."""

    crop_size: int = 64


class Photos(tfds.core.GeneratorBasedBuilder):
    """Random crops of bundled photographs; train and test come from disjoint photos."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "320 crops per train photo, 50 per test photo."}
    BUILDER_CONFIGS = [
        PhotosConfig(name="64px", crop_size=64, description="64x64 crops."),
        PhotosConfig(name="32px", crop_size=32, description="32x32 crops."),
    ]
    DEFAULT_CONFIG_NAME = "64px"

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not via dataset_info_from_configs), which needs no metadata files.
        size = self.builder_config.crop_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Random square crops of scikit-image's and scikit-learn's bundled photographs; "
                "train and test crops come from disjoint photos. Labels are source-photo "
                "indices, meaningful for train only."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Returns the train and test generators."""
        del dl_manager  # Nothing to download: the photos ship with the libraries.
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        """Yields ("<photo>_<i>", example) for every crop of the split's photos."""
        from PIL import Image  # Lazily: only preparation needs it.

        photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS
        for index, name in enumerate(photos):
            crops = photo_crops(name, split, self.builder_config.crop_size)
            for i, crop in enumerate(crops):
                # Encoded here with PIL at low zlib effort: several times faster than the TF
                # graph tfds runs for numpy arrays, and lossless all the same.
                png = io.BytesIO()
                Image.fromarray(crop).save(png, format="png", compress_level=1)
                yield f"{name}_{i}", {"image": png.getvalue(), "label": index % NUM_CLASSES}
