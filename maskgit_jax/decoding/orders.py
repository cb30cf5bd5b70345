"""Fixed reveal orders for parallel decoding, as the per-position scores the decode loop reads."""

import functools

import numpy as np


def _radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse of `index` in `base`, in [0, 1)."""
    result, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        result += digit * scale
        scale /= base
    return result


@functools.lru_cache(maxsize=32)
def halton_order(height: int, width: int) -> np.ndarray:
    """A permutation of the `height * width` raster indices of a token grid, in Halton order.

    Points of the 2-D Halton sequence (bases 2 and 3; Besnier et al., ICLR 2025) are mapped to
    the grid cells they fall in; each cell is listed at its first hit. Consecutive prefixes
    are spread evenly over the grid, so revealing tokens in this order avoids clusters of
    neighbours decoded in the same step. Cells the sequence has not reached after many points
    (only possible for very elongated grids) follow in raster order.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1; got {height}x{width}.")
    total = height * width
    seen = np.zeros(total, bool)
    order = []
    index = 0
    while len(order) < total and index < 64 * total + 64:
        col = int(_radical_inverse(index, 2) * width)
        row = int(_radical_inverse(index, 3) * height)
        cell = row * width + col
        if not seen[cell]:
            seen[cell] = True
            order.append(cell)
        index += 1
    order.extend(np.flatnonzero(~seen).tolist())
    result = np.asarray(order, np.int32)
    result.flags.writeable = False
    return result


def order_score(permutation: np.ndarray, num_prefix: int = 1) -> np.ndarray:
    """Scores [num_prefix + N] for `decode`: higher = revealed earlier in `permutation` [N].

    `permutation` lists the N image positions in reveal order; the first `num_prefix`
    sequence positions (the class token) are always known, and score highest.
    """
    permutation = np.asarray(permutation)
    size = permutation.size
    if permutation.ndim != 1 or not np.array_equal(np.sort(permutation), np.arange(size)):
        raise ValueError(f"permutation must list each of 0..{size - 1} once.")
    ranks = np.empty(size, np.float32)
    ranks[permutation] = np.arange(size)
    return np.concatenate([np.zeros(num_prefix, np.float32), -ranks])


def named_order_score(ordering: str, side: int) -> np.ndarray:
    """The `order_score` of a named fixed ordering on a `side` x `side` grid with a class token."""
    if ordering == "halton":
        return order_score(halton_order(side, side))
    raise ValueError(f"{ordering!r} is not a fixed ordering.")
