"""Snap the finished token mask to the stem's lesion map: the tokens decide what, the map draws it.

A U-Net stem (`decoder.pixel_decoder_channels`, docs/model.md) reads the slice at 112 x 112 and draws lesion
borders inside a 16 x 16 patch, which the mask codes can only approximate; the token decoder reads the text
and decides whether the described finding is there ([SOV]/[REJ]) and which lesions it means. The final
mask joins the two: the token mask plus every connected lesion of the map that the token mask touches.

The snap only ever follows the tokens' reading of the text: it never adds a lesion the tokens did not
touch, and an empty drawing stays empty (the answer "not present"), because the map is text-free: filling
an empty answer with every lesion would answer a prompt for an empty zone with the lesions elsewhere.
The stream itself shows the tokens; only the finished update is snapped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def snap_to_lesion_map(token_probability: np.ndarray, lesion_probability: np.ndarray) -> np.ndarray:
    """max(token probability, lesion probability on the touched lesions), both (H, W) in [0, 1].

    Touched: the 8-connected components of `lesion_probability >= 0.5` that overlap `token_probability >=
    0.5`. Thresholding the result at 0.5 gives exactly the token mask united with the touched lesions; an
    empty token mask comes back unchanged.
    """
    if token_probability.shape != lesion_probability.shape:
        raise ValueError(f"token {token_probability.shape} and lesion {lesion_probability.shape} maps differ")
    tokens = token_probability >= 0.5
    if not tokens.any():
        return token_probability
    labels, count = ndimage.label(lesion_probability >= 0.5, structure=np.ones((3, 3), bool))
    if count == 0:
        return token_probability
    keep = np.zeros(count + 1, bool)
    keep[np.unique(labels[tokens])] = True
    keep[0] = False
    touched = keep[labels]
    return np.maximum(token_probability, np.where(touched, lesion_probability, 0.0)).astype(np.float32)
