"""Several findings of one image: the rules for a list of them, the label map they make, and a finding's
lesions as instances set against the count its prompt states.

No torch here, and scipy only when lesions are counted: the CLI checks a list of findings before the model
loads (and `napari-mris info` should not pay for importing scipy), the widget before it starts a
worker. The pipeline decodes the findings (`MRISPipeline.stream_findings`); this module owns what a list
of findings may hold and how their masks become one label image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_mris.errors import PromptError

# Why a cap: every finding after the first still costs a whole mask decode (docs/results.md, "Several
# findings"), and a label PNG, the widget's colours and a reader of predictions.csv stay legible with a few
# labels. Eight covers the findings of a chest X-ray report with room to spare.
MAX_FINDINGS = 8

_NUMBERS = {
    "one": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "multiple": None, "several": None,
}  # fmt: skip
_COUNT = re.compile(
    r"\b(?P<n>\d+|" + "|".join(_NUMBERS) + r")\s+(?:[a-z-]+\s+)?"
    r"(?:areas?|regions?|lesions?|foci|focus|opacit(?:y|ies)|spots?|patch(?:es)?|consolidations?|nodules?)\b",
    re.IGNORECASE,
)
EIGHT_CONNECTED = np.ones((3, 3), bool)


def finding_key(prompt: str) -> str:
    """What makes two findings the same: their words, whatever the case and spacing."""
    return " ".join(prompt.split()).casefold()


def check_findings(prompts: Sequence[str]) -> list[str]:
    """The findings as a list, or a PromptError naming the problem: none, an empty one, a repeated one (each
    finding gets its own label, so a repeat would be two labels for one thing), or more than MAX_FINDINGS."""
    if isinstance(prompts, str):
        raise TypeError("check_findings takes a list of prompts, not one string")
    prompts = list(prompts)
    if not prompts:
        raise PromptError("No finding given; describe at least one, e.g. 'lower left lung'")
    if len(prompts) > MAX_FINDINGS:
        raise PromptError(
            f"{len(prompts)} findings, more than the {MAX_FINDINGS} one run takes; split them into runs of at most "
            f"{MAX_FINDINGS}"
        )
    seen: dict[str, int] = {}
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            if len(prompts) == 1:
                raise PromptError("The prompt is empty; describe the finding, e.g. 'lower left lung'")
            raise PromptError(
                f"Finding {number} of {len(prompts)} is empty; remove the empty line or describe the finding"
            )
        key = finding_key(prompt)
        if key in seen:
            raise PromptError(
                f"Finding {number} repeats finding {seen[key]} ({prompt.strip()!r}); give each finding once, "
                "since each gets its own label"
            )
        seen[key] = number
    return prompts


def split_findings(text: str) -> list[str]:
    """The findings of a text box, one per line; blank lines before the first and after the last are ignored,
    a blank line between two findings is kept (check_findings then names it)."""
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def label_map(masks: Sequence[np.ndarray], probabilities: Sequence[np.ndarray | None]) -> np.ndarray:
    """One label image for several findings: label k (1-based) where finding k's mask is, 0 elsewhere.

    Overlaps go to the finding with the higher probability at that pixel; on equal probabilities, to the
    finding given first. A finding with no probability (answered "not present") has none of its own pixels.
    uint8 up to 255 labels.
    """
    if not masks:
        raise ValueError("label_map needs at least one mask")
    scores = np.full((len(masks), *masks[0].shape), -np.inf, np.float32)
    for k, (mask, probability) in enumerate(zip(masks, probabilities, strict=True)):
        weight = probability if probability is not None else mask.astype(np.float32)
        scores[k][mask] = weight[mask]
    best = np.argmax(scores, axis=0)  # the first maximum: the earlier finding wins a tie
    covered = np.isfinite(scores).any(axis=0)
    return np.where(covered, best + 1, 0).astype(np.uint8)


def stated_count(prompt: str) -> int | None:
    """The number of lesions a prompt states ("two infected areas" -> 2, "one lesion" -> 1); None when it
    states none (or only "several")."""
    match = _COUNT.search(prompt)
    if match is None:
        return None
    word = match.group("n").lower()
    return int(word) if word.isdigit() else _NUMBERS[word]


@dataclass(frozen=True)
class Instances:
    """A finding's mask split into its connected lesions (8-connected)."""

    labels: np.ndarray  # int32, 0 background, 1..count one per lesion
    count: int
    stated: int | None  # the count in the prompt, if it states one

    @property
    def note(self) -> str | None:
        """A sentence when the drawing and the prompt disagree on the count; the mask is never changed for it."""
        if self.stated is None or self.stated == self.count:
            return None
        drawn = f"{self.count} lesion{'s' if self.count != 1 else ''} drawn"
        return f"{drawn}, the prompt says {self.stated}"


def instances(mask: np.ndarray, prompt: str) -> Instances:
    """Split `mask` into its 8-connected lesions and set their number against the prompt's stated count."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, bool), structure=EIGHT_CONNECTED)
    return Instances(labels.astype(np.int32), int(count), stated_count(prompt))
