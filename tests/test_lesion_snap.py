"""The final snap: the tokens decide which of the stem's lesions are meant, the map draws them, and a token
part the map does not support is dropped."""

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
    tokens[0, 38:40] = 0.6  # a token part far from any lesion: unsupported, dropped
    out = snap_to_lesion_map(tokens, lesions)
    mask = out >= 0.5
    assert mask[2:12, 2:12].all() and not mask[25:35, 25:35].any()
    assert mask[12:14, 12:14].all() and not mask[0, 38:40].any()  # the supported part's spill-over stays
    np.testing.assert_allclose(out[2:8, 2:8], 0.9)  # inside a kept lesion: its map probability
    first = np.zeros(shape, bool)
    first[2:12, 2:12] = True
    assert np.array_equal(mask, first | (blob(shape, slice(8, 14), slice(8, 14), 1.0) > 0))


def test_an_empty_token_mask_stays_empty():
    """[SOV] with no lesion code written, or an answer for an empty zone: the map never fills it."""
    shape = (20, 20)
    lesions = blob(shape, slice(1, 5), slice(1, 5), 0.9) + blob(shape, slice(10, 15), slice(10, 15), 0.6)
    tokens = np.full(shape, 0.3, np.float32)  # below the threshold everywhere: nothing drawn
    out = snap_to_lesion_map(tokens, lesions)
    assert not (out >= 0.5).any()
    assert out is tokens


def test_a_one_side_drawing_keeps_the_other_side_out():
    """Asked for one lung, the tokens touch its lesion: the other lung's lesion is never added."""
    shape = (30, 40)
    left, right = blob(shape, slice(5, 25), slice(3, 15), 0.9), blob(shape, slice(8, 22), slice(25, 37), 0.9)
    tokens = blob(shape, slice(10, 16), slice(6, 12), 0.8)
    mask = snap_to_lesion_map(tokens, left + right) >= 0.5
    assert mask[5:25, 3:15].all() and not mask[:, 20:].any()


def test_a_drawing_the_map_does_not_support_is_not_present():
    """A blob drawn on a lung where the map sees no lesion (a prompt for a lesion-free lung): the answer is
    empty, "not present", not a shape made from the text alone."""
    tokens = blob((10, 10), slice(2, 4), slice(2, 4), 0.8)
    out = snap_to_lesion_map(tokens, np.full((10, 10), 0.2, np.float32))
    assert not (out >= 0.5).any() and out.shape == tokens.shape
    lesion_elsewhere = blob((10, 10), slice(6, 9), slice(6, 9), 0.9)
    assert not (snap_to_lesion_map(tokens, lesion_elsewhere) >= 0.5).any()  # nor the lesion it did not touch
    with pytest.raises(ValueError, match="differ"):
        snap_to_lesion_map(tokens, np.zeros((5, 5), np.float32))


def test_diagonal_neighbours_are_one_lesion():
    lesions = np.zeros((6, 6), np.float32)
    lesions[1, 1] = lesions[2, 2] = lesions[3, 3] = 0.9  # 8-connected: one lesion
    tokens = np.zeros((6, 6), np.float32)
    tokens[1, 1] = 0.9
    assert (snap_to_lesion_map(tokens, lesions) >= 0.5).sum() == 3


def test_an_adapters_lesion_threshold_moves_the_border():
    """A user's own cut (an adapter's calibration) draws the touched lesion tighter or wider; thresholding
    at 0.5 still gives exactly the supported parts and the lesions at that cut."""
    shape = (30, 30)
    halo = blob(shape, slice(4, 26), slice(4, 26), 0.4)
    rim = blob(shape, slice(7, 23), slice(7, 23), 0.6)
    core = blob(shape, slice(10, 20), slice(10, 20), 0.9)
    lesion = np.maximum(np.maximum(halo, rim), core)
    tokens = blob(shape, slice(12, 14), slice(12, 14), 0.8)
    for threshold, drawn in ((0.5, rim), (0.8, core), (0.3, halo)):
        mask = snap_to_lesion_map(tokens, lesion, lesion_threshold=threshold) >= 0.5
        assert np.array_equal(mask, drawn > 0), threshold
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        snap_to_lesion_map(tokens, lesion, lesion_threshold=1.0)


def test_recentred_puts_the_threshold_on_one_half():
    from napari_mris.lesion_snap import recentred

    p = np.linspace(0, 1, 101, dtype=np.float32)
    np.testing.assert_allclose(recentred(p, 0.5), p, atol=1e-6)  # the default cut changes nothing
    for threshold in (0.2, 0.8):
        r = recentred(p, threshold)
        assert r[0] == 0 and r[-1] == pytest.approx(1) and (np.diff(r) > 0).all()
        assert np.array_equal(r >= 0.5, p >= threshold)


def test_a_users_cut_moves_borders_never_which_parts_are_supported():
    """Support is decided at the model's own cut: a faint lesion (peak 0.6) still supports its token part
    under a tight 0.8 cut (the finding stays present, drawn by its tokens), and a wide 0.3 cut neither
    supports a part that touches only a sub-0.5 haze nor draws a haze no touched lesion lies in."""
    shape = (30, 60)
    faint = blob(shape, slice(5, 15), slice(5, 15), 0.6)
    tokens = blob(shape, slice(8, 12), slice(8, 12), 0.9)
    mask = snap_to_lesion_map(tokens, faint, lesion_threshold=0.8) >= 0.5
    assert np.array_equal(mask, tokens > 0)  # kept, and the lesion is not drawn below the user's cut

    haze = blob(shape, slice(5, 25), slice(35, 55), 0.35)
    lesion = np.maximum(np.maximum(blob(shape, slice(2, 28), slice(2, 28), 0.35), faint), haze)
    tokens_on_haze = tokens + blob(shape, slice(18, 20), slice(40, 42), 0.9)
    mask = snap_to_lesion_map(tokens_on_haze, lesion, lesion_threshold=0.3) >= 0.5
    assert mask[2:28, 2:28].all()  # the faint lesion's 0.3 component, drawn wide
    assert not mask[:, 30:].any()  # the token part on the haze: unsupported; the haze: no touched lesion in it
