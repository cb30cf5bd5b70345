"""Image grids and PNG files for samples and reconstructions."""

import io

import numpy as np
from etils import epath
from PIL import Image


def make_grid(images: np.ndarray, rows: int) -> np.ndarray:
    """Tiles images [N, H, W, C] (N divisible by rows) into one [rows*H, cols*W, C] image."""
    images = np.asarray(images)
    count, height, width, channels = images.shape
    if count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows evenly.")
    cols = count // rows
    grid = images.reshape(rows, cols, height, width, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * height, cols * width, channels)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (clipped) -> uint8."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def write_png(image: np.ndarray, path: str | epath.PathLike) -> epath.Path:
    """Writes one float [H, W, 3] image in [0, 1] as PNG (local or gs://)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def read_image(path: str | epath.PathLike) -> np.ndarray:
    """Reads an image file as float RGB [H, W, 3] in [0, 1]."""
    with epath.Path(path).open("rb") as f:
        image = Image.open(f).convert("RGB")
    return np.asarray(image, np.float32) / 255.0
