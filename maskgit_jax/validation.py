"""Host-side checks of user inputs, run before anything is traced so errors read clearly."""

import numpy as np


def check_images(images, image_size: int | None = None) -> np.ndarray:
    """Checks a float NHWC batch of RGB images in [0, 1]; returns it as a float32 array."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"images must be a batch [B, H, W, 3]; got an array of shape {images.shape}."
        )
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 3 (RGB) channels; got shape {images.shape}.")
    if image_size is not None and images.shape[1:3] != (image_size, image_size):
        raise ValueError(
            f"images must be {image_size}x{image_size} for this model; got "
            f"{images.shape[1]}x{images.shape[2]}."
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be floats in [0, 1]; got dtype {images.dtype} (divide uint8 by 255)."
        )
    low, high = float(images.min()), float(images.max())
    if not (low >= 0.0 and high <= 1.0):  # NaN fails too.
        raise ValueError(f"images must lie in [0, 1]; got values in [{low:.3g}, {high:.3g}].")
    return images.astype(np.float32)


def check_labels(labels, num_classes: int) -> np.ndarray:
    """Checks integer class ids in [0, num_classes); returns them as an int32 vector."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array; got dtype {labels.dtype} shape {labels.shape}."
        )
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"class id {int(bad[0])} is out of range: the model has {num_classes} classes, "
            f"ids must be in [0, {num_classes})."
        )
    return labels.astype(np.int32)


def check_token_ids(ids, codebook_size: int) -> np.ndarray:
    """Checks image-token ids in [0, codebook_size); returns them as int32."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers; got dtype {ids.dtype}.")
    bad = ids[(ids < 0) | (ids >= codebook_size)]
    if bad.size:
        raise ValueError(
            f"token id {int(bad[0])} is outside the codebook: ids must be in [0, {codebook_size})."
        )
    return ids.astype(np.int32)


def check_num_steps(num_steps: int, start_step: int = 0) -> None:
    """Checks a decoding step count >= 1 and a start step in [0, num_steps)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps}.")
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}); got {start_step}.")
