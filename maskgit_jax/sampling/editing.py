"""Image editing on the host: token masks from pixels or boxes, blur, and compositing.

The authors' demo recipe: mask the token cells covering the region to change (one token of
margin on each side), re-decode them from part-way along the schedule (`EDIT_START_STEP` of
`EDIT_NUM_STEPS`), then blend output and input with the token mask upsampled to pixels and
blurred by a Gaussian of radius `image_size/16 - 1`. The decoding itself is the pipeline's.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Defaults of the authors' editing demo: start at step 2 of 12.
EDIT_NUM_STEPS = 12
EDIT_START_STEP = 2


class EditResult(NamedTuple):
    """What the editing methods return with `return_details=True`.

    Attributes:
        images: float32 [B, H, W, 3] in [0, 1], the composited output.
        tokens: int32 [B, h, w], the decoded token grid (before compositing).
        input_tokens: int32 [B, h, w], the encoded input (the canvas, for outpainting).
        token_mask: bool [B, h, w], True where tokens were regenerated.
    """

    images: np.ndarray
    tokens: np.ndarray
    input_tokens: np.ndarray
    token_mask: np.ndarray


def _dilate(mask: np.ndarray, margin: int) -> np.ndarray:
    """Grows a bool mask [B, h, w] by `margin` cells in every direction (a square dilation)."""
    if margin <= 0:
        return mask
    height, width = mask.shape[1:]
    padded = np.pad(mask, ((0, 0), (margin, margin), (margin, margin)))
    out = np.zeros_like(mask)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            out |= padded[:, dy : dy + height, dx : dx + width]
    return out


def token_mask_from_pixels(mask: np.ndarray, factor: int, margin: int = 1) -> np.ndarray:
    """Token cells [B, H/f, W/f] covering any True pixel of `mask` [B, H, W], grown by `margin`."""
    mask = np.asarray(mask, bool)
    batch, height, width = mask.shape
    cells = mask.reshape(batch, height // factor, factor, width // factor, factor)
    return _dilate(cells.any(axis=(2, 4)), margin)


def token_mask_from_box(
    box: Sequence[float], height: int, width: int, factor: int, margin: int = 1
) -> np.ndarray:
    """Token cells [H/f, W/f] covering the pixel box (x0, y0, x1, y1; x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    pixels = np.zeros((1, height, width), bool)
    pixels[0, max(0, int(y0)) : max(0, math.ceil(y1)), max(0, int(x0)) : max(0, math.ceil(x1))] = 1
    return token_mask_from_pixels(pixels, factor, margin)[0]


def gaussian_kernel(sigma: float) -> np.ndarray:
    """A normalized 1-D Gaussian of standard deviation `sigma`, truncated at 3 sigma."""
    half = max(0, math.ceil(3.0 * sigma))
    if sigma <= 0 or half == 0:
        return np.ones(1, np.float32)
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(masks: np.ndarray, sigma: float) -> np.ndarray:
    """Blurs float maps [B, H, W] with a separable Gaussian (edges extended); sigma <= 0: copy.

    Values farther than 3 sigma from any nonzero cell stay exactly 0 (the kernel is truncated).
    """
    masks = np.asarray(masks, np.float32)
    kernel = gaussian_kernel(sigma)
    half = kernel.size // 2
    if half == 0:
        return masks.copy()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (half, half)
        padded = np.pad(masks, pad, mode="edge")
        length = masks.shape[axis]
        out = np.zeros_like(masks)
        for k, weight in enumerate(kernel):
            out += weight * np.take(padded, np.arange(k, k + length), axis=axis)
        masks = out
    return masks


def composite(
    generated: np.ndarray, original: np.ndarray, token_mask: np.ndarray, radius: float
) -> np.ndarray:
    """Blends `generated` into `original` [B, H, W, 3] where the blurred token mask is high.

    `token_mask` [B, h, w] is upsampled to pixels (nearest) and blurred by a Gaussian of
    standard deviation `radius` pixels; outside the blur's reach the output equals `original`.
    """
    height, width = original.shape[1:3]
    factor_y, factor_x = height // token_mask.shape[1], width // token_mask.shape[2]
    pixels = np.repeat(np.repeat(token_mask.astype(np.float32), factor_y, 1), factor_x, 2)
    alpha = np.clip(gaussian_blur(pixels, radius), 0.0, 1.0)[..., None]
    return (alpha * generated + (1.0 - alpha) * original).astype(np.float32)


def window_starts(size: int, window: int) -> list[int]:
    """Start offsets of windows of `window` cells covering `size` cells, overlapping by half."""
    if size <= window:
        return [0]
    stride = max(1, window // 2)
    starts = list(range(0, size - window, stride))
    return starts + [size - window]
