"""Snap the finished token mask to the stem's lesion map: the tokens decide what, the map draws it.

A U-Net stem (`decoder.pixel_decoder_channels`, docs/model.md) reads the slice at 112 x 112 and draws lesion
borders inside a 16 x 16 patch, which the mask codes can only approximate; the token decoder reads the text
and decides whether the described finding is there ([SOV]/[REJ]) and which lesions it means. The final
mask joins the two: the token parts that touch a lesion of the map, plus every lesion they touch.

A token part that touches no lesion is dropped: the two halves of the model disagree there, and the
map, which reads the pixels at four times the token resolution, is the one that has seen the image.
Without this, a prompt for a lesion-free lung was answered with a blob drawn on that lung from the text
alone (docs/results.md, stop 25). A drawing with no supported part is empty: "not present".

The snap only ever follows the tokens' reading of the text: it never adds a lesion the tokens did not
touch, and an empty drawing stays empty (the answer "not present"), because the map is text-free: filling
an empty answer with every lesion would answer a prompt for an empty zone with the lesions elsewhere.
The stream itself shows the tokens; only the finished update is snapped.

Where the map's border lies is its cut, 0.5 unless an adapter carries one chosen on a user's own
corrections (finetune.choose_lesion_threshold in the training package, stored by adapters.save_adapter):
a radiologist who outlines lesions tighter or wider than the training annotators moves the border there,
which the LoRA matrices on the transformer cannot reach (docs/results.md, "Correction loop"). The user's
cut moves borders only: which lesions are there, and so which token parts are supported, is decided at
the model's own cut (LESION_THRESHOLD), so a calibrated border never turns a finding "not present".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LESION_THRESHOLD = 0.5  # the map's cut unless an adapter carries a user's own


def recentred(probability: np.ndarray, threshold: float) -> np.ndarray:
    """`probability` mapped piecewise-linearly so that `threshold` lands on 0.5 (0 and 1 stay where they
    are, the order of values is kept): a lesion cut other than 0.5 then agrees with the 0.5 that the rest
    of the pipeline thresholds at. The identity at 0.5."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"lesion threshold must lie strictly between 0 and 1, got {threshold}")
    low = probability * (0.5 / threshold)
    high = 0.5 + (probability - threshold) * (0.5 / (1.0 - threshold))
    return np.where(probability < threshold, low, high).astype(np.float32)


def snap_to_lesion_map(
    token_probability: np.ndarray, lesion_probability: np.ndarray, lesion_threshold: float = LESION_THRESHOLD
) -> np.ndarray:
    """max(supported token probability, lesion probability drawn for the touched lesions), (H, W) in [0, 1].

    Parts and lesions are the 8-connected components of `token_probability >= 0.5` and of
    `lesion_probability >= LESION_THRESHOLD`. A token part is supported when it overlaps a lesion;
    unsupported parts are set to 0. A touched lesion is drawn at `lesion_threshold`: its pixels at or above
    the cut when the cut is higher, the whole component of `lesion_probability >= lesion_threshold` around
    it when lower. Thresholding the result at 0.5 gives exactly the supported parts united with the drawn
    lesions (the lesion values `recentred` onto 0.5); an empty token mask comes back unchanged.
    """
    if token_probability.shape != lesion_probability.shape:
        raise ValueError(f"token {token_probability.shape} and lesion {lesion_probability.shape} maps differ")
    drawn_values = recentred(lesion_probability, lesion_threshold)
    tokens = token_probability >= 0.5
    if not tokens.any():
        return token_probability
    eight = np.ones((3, 3), bool)
    lesions, lesion_count = ndimage.label(lesion_probability >= LESION_THRESHOLD, structure=eight)
    parts, part_count = ndimage.label(tokens, structure=eight)
    supported = np.zeros(part_count + 1, bool)
    supported[np.unique(parts[lesions > 0])] = True
    supported[0] = False
    touched = np.zeros(lesion_count + 1, bool)
    touched[np.unique(lesions[tokens])] = True
    touched[0] = False
    drawn = touched[lesions]
    if lesion_threshold < LESION_THRESHOLD:  # wider: the components at the lower cut around the touched lesions
        wide, _ = ndimage.label(lesion_probability >= lesion_threshold, structure=eight)
        drawn = np.isin(wide, np.unique(wide[drawn])) & (wide > 0)
    kept = np.where(tokens & ~supported[parts], 0.0, token_probability)
    return np.maximum(kept, np.where(drawn, drawn_values, 0.0)).astype(np.float32)
