"""Reconstruction metrics of a tokenizer: PSNR, SSIM and codebook usage, in plain numpy.

Images are channel-last arrays in [0, max_value]: a batch [N, H, W, C], a single image
[H, W, C], or a single grayscale image [H, W]. Inputs may be numpy or jax arrays; all maths
is done in float64 on the host. PSNR and SSIM are computed per image and then averaged over
the batch (`reduce=False` returns the per-image values instead).
"""

from __future__ import annotations

import numpy as np

# SSIM constants of Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_batch(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Returns `a` and `b` as float64 [N, H, W, C] arrays of equal shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Image shapes differ: {a.shape} vs {b.shape}.")
    if a.ndim == 2:
        a, b = a[None, ..., None], b[None, ..., None]
    elif a.ndim == 3:
        a, b = a[None], b[None]
    elif a.ndim != 4:
        raise ValueError(f"Expected [N, H, W, C], [H, W, C] or [H, W] images, got {a.shape}.")
    return a, b


def psnr(a, b, max_value: float = 1.0, reduce: bool = True) -> float | np.ndarray:
    """Returns the peak signal-to-noise ratio 10 log10(max_value^2 / MSE) in dB.

    The MSE is taken per image (over H, W and C) and the PSNR values are averaged over the
    batch. Identical images have MSE 0 and PSNR `inf` (not capped), so the mean is `inf` as
    soon as one image of the batch is reconstructed exactly.
    """
    a, b = _as_batch(a, b)
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(max_value**2 / mse)
    return float(np.mean(values)) if reduce else values


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Returns the normalized 1-D Gaussian taps of the separable SSIM window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Returns the separable 'valid' filtering of [N, H, W, C] `x` over H and W."""
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(t * x[:, i : i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, :, j : j + w] for j, t in enumerate(taps))


def ssim(a, b, max_value: float = 1.0, reduce: bool = True) -> float | np.ndarray:
    """Returns the structural similarity index of Wang et al. (2004).

    Local means, variances and covariance use an 11x11 Gaussian window (sigma 1.5,
    population statistics) at every position where the window fits inside the image; the
    SSIM map with C1 = (0.01 max_value)^2 and C2 = (0.03 max_value)^2 is averaged over those
    positions, per channel, then over channels: one value per image, averaged over the
    batch. This equals skimage's `structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=max_value)`.
    Images must be at least 11x11.
    """
    a, b = _as_batch(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}: {a.shape}.")
    taps = _gaussian_window()
    mu_a = _filter_valid(a, taps)
    mu_b = _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    c1 = (SSIM_K1 * max_value) ** 2
    c2 = (SSIM_K2 * max_value) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    # Mean over positions per channel, then over channels: the same as over all three.
    values = ssim_map.mean(axis=(1, 2, 3))
    return float(np.mean(values)) if reduce else values


def codebook_usage(ids, codebook_size: int) -> tuple[float, float]:
    """Returns (fraction of the codebook used, perplexity) of token ids of any shape.

    The perplexity is exp(entropy) of the empirical code distribution: 1 when one code is
    used, `codebook_size` when all codes are used equally often.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size == 0:
        raise ValueError("codebook_usage needs at least one token id.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"Token ids must be integers, got {ids.dtype}.")
    if ids.min() < 0 or ids.max() >= codebook_size:
        raise ValueError(
            f"Token ids must lie in [0, {codebook_size}); got [{ids.min()}, {ids.max()}]."
        )
    counts = np.bincount(ids, minlength=codebook_size)
    p = counts[counts > 0] / ids.size
    entropy = -np.sum(p * np.log(p))
    return float(np.count_nonzero(counts) / codebook_size), float(np.exp(entropy))
