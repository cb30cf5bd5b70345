"""TFDS builder for scikit-learn's 8x8 handwritten digits, a dataset that needs no download.

The 1797 images ship inside scikit-learn, so this builder gives a real, labelled image
dataset for offline smoke runs and tests. Images are stored as 32x32 RGB uint8 (nearest-
neighbour upscaling of the 8x8 grid), so the input pipeline can resize them to 16 or 32.
"""

import numpy as np
import tensorflow_datasets as tfds

# Stored side in pixels: the 8x8 digits upscaled 4x by pixel repetition.
IMAGE_SIZE = 32
# The last NUM_TEST images (in scikit-learn's order) form the test split; the rest train.
NUM_TEST = 297
NUM_CLASSES = 10


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns all digits as uint8 RGB [1797, 32, 32, 3] images and int64 labels."""
    from sklearn.datasets import load_digits  # Imported lazily: only preparation needs it.

    data = load_digits()
    # Pixel values are integers 0..16; map them onto 0..255.
    gray = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)
    factor = IMAGE_SIZE // gray.shape[1]
    gray = gray.repeat(factor, axis=1).repeat(factor, axis=2)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    return rgb, data.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits: 1500 train and 297 test images of 10 classes, 32x32 RGB."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "32x32 RGB, last 297 images as the test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly (not via dataset_info_from_configs), which needs no metadata files.
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's 8x8 handwritten digits upscaled to 32x32 RGB.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Splits by position so the splits never depend on randomness."""
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        num = len(digits_arrays()[1])
        return {
            "train": self._generate_examples(0, num - NUM_TEST),
            "test": self._generate_examples(num - NUM_TEST, num),
        }

    def _generate_examples(self, start: int, end: int):
        """Yields (index, example) for images start..end-1 of scikit-learn's order."""
        images, labels = digits_arrays()
        for i in range(start, end):
            yield i, {"image": images[i], "label": int(labels[i])}
