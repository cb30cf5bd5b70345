"""Sample grids a person can read: enlarged small cells, gaps between them, row labels."""

import numpy as np
import pytest

from maskgit_jax.data import images_io


def _images(count, side, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 0.5, (count, side, side, 3)).astype(np.float32)


def test_cells_are_enlarged_and_separated_by_background_gaps():
    images = _images(6, 8)
    grid = images_io.make_grid(images, rows=2, gap=3)
    cell = 32  # 8-pixel images enlarged 4x (nearest neighbour).
    assert grid.shape == (3 + 2 * (cell + 3), 3 + 3 * (cell + 3), 3)
    for index, image in enumerate(images):
        top, left = 3 + (index // 3) * (cell + 3), 3 + (index % 3) * (cell + 3)
        np.testing.assert_array_equal(
            grid[top : top + cell, left : left + cell], image.repeat(4, 0).repeat(4, 1)
        )
        # The gap to the left of and above every cell is background (white).
        assert np.all(grid[top : top + cell, left - 3 : left] == 1.0)
        assert np.all(grid[top - 3 : top, left : left + cell] == 1.0)


def test_large_images_keep_their_size_and_default_gap_scales_with_them():
    grid = images_io.make_grid(_images(4, 64), rows=1)
    assert grid.shape == (4 + 64 + 4, 4 + 4 * (64 + 4), 3)  # gap = 64 // 16


def test_row_labels_are_written_in_a_left_margin():
    images = _images(4, 16)
    plain = images_io.make_grid(images, rows=2)
    labelled = images_io.make_grid(images, rows=2, row_labels=["class 0", "class 1"])
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and margin > 10
    np.testing.assert_array_equal(labelled[:, margin:], plain)
    cell, gap = 32, 2
    first = labelled[gap : gap + cell, :margin]
    second = labelled[2 * gap + cell : 2 * (gap + cell), :margin]
    assert first.min() < 0.5 and second.min() < 0.5  # Dark text on white.
    assert np.any(first != second)  # Different labels, different pixels.


@pytest.mark.parametrize(
    "images, rows, labels, match",
    [
        (np.zeros((5, 8, 8, 3)), 2, None, "do not fill 2 rows"),
        (np.zeros((4, 8, 8)), 2, None, r"must be \[N, H, W, C\]"),
        (np.zeros((4, 8, 8, 3)), 2, ["a"], "1 row labels for 2 rows"),
    ],
)
def test_bad_grids_are_refused(images, rows, labels, match):
    with pytest.raises(ValueError, match=match):
        images_io.make_grid(images, rows, row_labels=labels)
