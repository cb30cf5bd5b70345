"""Image grids and PNG files for samples and reconstructions."""

import io
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

# Cells smaller than this many pixels per side are enlarged (nearest neighbour) in grids.
MIN_CELL_SIZE = 32


def make_grid(
    images: np.ndarray,
    rows: int,
    *,
    row_labels: Sequence[str] | None = None,
    gap: int | None = None,
    background: float = 1.0,
) -> np.ndarray:
    """Tiles images [N, H, W, C] (N divisible by rows) into one float image a person can read.

    Cells below `MIN_CELL_SIZE` pixels are enlarged by a whole factor (nearest neighbour, so
    8x8 digits stay crisp), `gap` pixels of `background` (default: 1/16 of a cell, at least
    2) separate neighbouring cells, and `row_labels` (one per row) are written in a margin on
    the left. Returns [rows * cell + (rows + 1) * gap, ..., C] in the images' value range.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}.")
    count, height, width, channels = images.shape
    if rows < 1 or count % rows:
        raise ValueError(f"{count} images do not fill {rows} rows evenly.")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows.")
    scale = max(1, -(-MIN_CELL_SIZE // max(height, width)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = height * scale, width * scale
    gap = max(2, min(height, width) // 16) if gap is None else gap
    cols = count // rows
    margin = _label_margin(row_labels, height) if row_labels is not None else 0
    grid = np.full(
        (rows * (height + gap) + gap, margin + cols * (width + gap) + gap, channels),
        background,
        np.float32,
    )
    for index, image in enumerate(images):
        top = gap + (index // cols) * (height + gap)
        left = margin + gap + (index % cols) * (width + gap)
        grid[top : top + height, left : left + width] = image
    if row_labels is not None:
        for row, label in enumerate(row_labels):
            top = gap + row * (height + gap)
            grid[top : top + height, gap:margin] = _render_label(label, height, margin - gap)
    return grid


def _font(height: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, min(height // 2, 16)))


def _label_margin(labels: Sequence[str], height: int) -> int:
    """Pixels left of the first column: the widest label plus padding."""
    font = _font(height)
    widths = [font.getbbox(str(label))[2] for label in labels]
    return max(widths, default=0) + 8


def _render_label(label: str, height: int, width: int) -> np.ndarray:
    """Dark text on white, [height, width, 1] floats in [0, 1], vertically centred."""
    canvas = Image.new("L", (width, height), 255)
    ImageDraw.Draw(canvas).text(
        (2, height // 2), str(label), fill=0, font=_font(height), anchor="lm"
    )
    return (np.asarray(canvas, np.float32) / 255.0)[..., None]


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
        return from_pil(Image.open(f))


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode as float RGB [H, W, 3] in [0, 1] (alpha dropped)."""
    return np.asarray(image.convert("RGB"), np.float32) / 255.0
