"""The final snap: the token mask decides which of the stem's lesions are kept, the lesion map draws them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mris.lesion_snap import snap_to_lesion_map


def blob(shape, rows, cols, value):
    out = np.zeros(shape, np.float32)
    out[rows, cols] = value
    return out


def test_touched_lesions_are_drawn_by_the_map_and_untouched_ones_stay_out():
    shape = (40, 40)
    lesions = blob(shape, slice(2, 12), slice(2, 12), 0.9) + blob(shape, slice(25, 35), slice(25, 35), 0.8)
    tokens = blob(shape, slice(8, 14), slice(8, 14), 0.7)  # overlaps the first lesion only, and spills over
    tokens[0, 39] = 0.6  # a token pixel far from any lesion: kept
    out = snap_to_lesion_map(tokens, lesions)
    mask = out >= 0.5
    assert mask[2:12, 2:12].all() and not mask[25:35, 25:35].any()
    assert mask[12:14, 12:14].all() and mask[0, 39]  # the token mask itself stays
    np.testing.assert_allclose(out[2:8, 2:8], 0.9)  # inside a kept lesion: its map probability
    assert np.array_equal(mask, (tokens >= 0.5) | ((lesions >= 0.5) & ~(np.arange(40)[:, None] >= 25)))


def test_an_empty_token_mask_takes_every_lesion_of_the_map():
    """[SOV] with no lesion code written: the present answer and the empty drawing disagree."""
    shape = (20, 20)
    lesions = blob(shape, slice(1, 5), slice(1, 5), 0.9) + blob(shape, slice(10, 15), slice(10, 15), 0.6)
    out = snap_to_lesion_map(np.zeros(shape, np.float32), lesions)
    assert np.array_equal(out >= 0.5, lesions >= 0.5)


def test_no_lesion_in_the_map_leaves_the_tokens_alone():
    tokens = blob((10, 10), slice(2, 4), slice(2, 4), 0.8)
    assert snap_to_lesion_map(tokens, np.full((10, 10), 0.2, np.float32)) is tokens
    with pytest.raises(ValueError, match="differ"):
        snap_to_lesion_map(tokens, np.zeros((5, 5), np.float32))


def test_diagonal_neighbours_are_one_lesion():
    lesions = np.zeros((6, 6), np.float32)
    lesions[1, 1] = lesions[2, 2] = lesions[3, 3] = 0.9  # 8-connected: one lesion
    tokens = np.zeros((6, 6), np.float32)
    tokens[1, 1] = 0.9
    assert (snap_to_lesion_map(tokens, lesions) >= 0.5).sum() == 3
