"""The training sequences of one step: what the decoder is asked, and what it should answer.

Each example is drawn as one of four kinds, with fractions from the recipe:

- `full`: its own description, target = the whole mask;
- `zone`: a prompt naming only some of its lung zones, target = the part of the mask in those zones
  (re-encoded, since the cache holds only whole masks);
- `absent`: a prompt naming zones with no lesion, target = `[REJ]`;
- `foreign`: the description of another image whose mask does not overlap this one and whose text names
  only the other lung side, target = `[REJ]` (the text, not the image, must decide what is segmented).

Optionally the image is flipped left-right, with left and right swapped in the text, and (with
`train.wording_fraction`) the prompt of any kind is put into a random radiology sentence. The decoding order
is drawn per batch, not per example: a raster sequence is ~430 tokens and a next-scale one ~660, so a
mixed batch pads every raster example to the next-scale length (measured on the default recipe, 1 thread:
one-order batches make a step about 15 % cheaper on average). Everything is a function of (seed, step,
rank), so a resumed run sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from napari_mris.errors import PromptError
from napari_mris.model.orders import decoding_order
from napari_mris.model.sequence import TrainingSequence, build_training_sequence
from napari_mris.model.vocab import VocabLayout
from napari_mris_train.config import ConfigError, TrainRecipe
from napari_mris_train.encode_cache import EncodedSplit
from napari_mris_train.het_memory import sample_key
from napari_mris_train.prompts import (
    absent_target,
    lesion_zones,
    parse_zones,
    reword,
    swap_left_right,
    zone_restricted,
)

KINDS = ("full", "zone", "absent", "foreign")
FOREIGN_TRIES = 16  # random candidates tried for a non-overlapping foreign description


@dataclass
class Sample:
    sequence: TrainingSequence
    key: int  # stable id of (example, order, flip, kind, prompt) for the HET memory
    kind: str
    text: str
    index: int
    lesion: torch.Tensor  # (1, S, S) the whole mask, any lesion, flipped with the sample (text-free target)


class SequenceMixer:
    def __init__(
        self, data: EncodedSplit, tokenizers, layout: VocabLayout, recipe: TrainRecipe, text_slots: int = 0
    ) -> None:
        missing = [o for o in recipe.orders if o not in layout.orders or o not in tokenizers.masks]
        if missing:
            raise ConfigError(f"train.orders asks for {missing}, but the model directory has only {layout.orders}")
        if len(data) < 1:
            raise ConfigError("the training split is empty")
        self.data, self.tokenizers, self.layout, self.recipe = data, tokenizers, layout, recipe
        self.orders = tuple(recipe.orders)
        self.decoding_orders = {name: decoding_order(name, layout, tokenizers.masks[name]) for name in self.orders}
        self.text_slots = text_slots  # the decoder's fixed text positions (orders.position_shift)
        self.grid = int(tokenizers.image.grid)
        self._permutations: dict[int, np.ndarray] = {}

    def example_index(self, position: int) -> int:
        """The example at a global data position: epochs are seeded permutations of the split."""
        epoch, offset = divmod(position, len(self.data))
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng([self.recipe.seed, epoch]).permutation(len(self.data))}
        return int(self._permutations[epoch][offset])

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[Sample]:
        rng = np.random.default_rng([self.recipe.seed, step, rank])
        first = (step * world + rank) * batch_size
        order = self.orders[int(rng.integers(len(self.orders)))]
        return [self.sample(self.example_index(first + i), rng, order) for i in range(batch_size)]

    def draw_kind(self, rng: np.random.Generator) -> str:
        r, u = self.recipe, rng.random()
        for kind, fraction in (("absent", r.absent_fraction), ("zone", r.zone_fraction)):
            if u < fraction:
                return kind
            u -= fraction
        return "foreign" if u < r.foreign_fraction else "full"

    def sample(self, index: int, rng: np.random.Generator, order: str) -> Sample:
        kind = self.draw_kind(rng)
        flip = kind != "foreign" and self.recipe.flip and bool(rng.random() < 0.5)
        mask = self.data.masks[index].numpy()
        mask = mask[:, ::-1].copy() if flip else mask
        built = None
        if kind == "zone":
            built = self.zone(mask, order, rng)
        elif kind == "absent":
            text = absent_target(mask, rng)
            built = None if text is None else (text, None)
        elif kind == "foreign":
            built = self.foreign(index, rng)
        if built is None:  # the kind could not be built for this mask: fall back to the real description
            kind = "full"
            text = self.data.descriptions[index]
            built = (swap_left_right(text) if flip else text, [c[index, int(flip)] for c in self.codes(order)])
        text, codes = built
        fraction = self.recipe.wording_fraction  # drawn only when asked: older recipes see the same data
        worded = self.reworded(text, rng) if fraction and rng.random() < fraction else None
        if worded is not None:
            text, ids = worded
        elif kind == "full" and not flip:
            ids = self.data.text_ids[index]
        else:
            ids = self.tokenizers.text.encode(text, truncate=True)
        sequence = build_training_sequence(
            self.decoding_orders[order],
            self.data.image_codes[index, int(flip)],
            ids,
            self.grid,
            codes,
            pixels=self.pixels(index, flip),
            text_slots=self.text_slots,
        )
        key = sample_key(index, order, flip, kind, text)
        return Sample(sequence, key, kind, text, index, self.lesion_target(mask))

    def reworded(self, text: str, rng: np.random.Generator) -> tuple[str, list[int]] | None:
        """`text` in a random radiology sentence and its ids; None when the sentence is longer than the
        model reads (cutting it could drop the zone words the target depends on)."""
        sentence = reword(text, rng)
        try:
            return sentence, self.tokenizers.text.encode(sentence)
        except PromptError:
            return None

    def stem_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixels (B, 1, S, S), whole masks (B, 1, S, S)) of random examples, each flipped or not: the
        text-free batches of the stem warm-up (trainer.warm_up_stem), a function of (seed, step)."""
        rng = np.random.default_rng([self.recipe.seed, step, 1_000_003])  # a stream apart from `batch`'s
        pixels, targets = [], []
        for index in rng.integers(len(self.data), size=batch_size):
            flip = self.recipe.flip and bool(rng.random() < 0.5)
            mask = self.data.masks[int(index)].numpy()
            pixels.append(self.pixels(int(index), flip))
            targets.append(self.lesion_target(mask[:, ::-1].copy() if flip else mask))
        return torch.stack(pixels), torch.stack(targets)

    @staticmethod
    def lesion_target(mask: np.ndarray) -> torch.Tensor:
        """The (already flipped) whole mask as a (1, S, S) float tensor (losses.lesion_loss pools it)."""
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        """(1, S, S) float model image in [0, 1], flipped with the mask and text when the sample is."""
        image = self.data.images[index].float() / 255.0
        return (image.flip(-1) if flip else image)[None]

    def codes(self, order: str) -> list[torch.Tensor]:
        return self.data.mask_codes[order]

    @torch.no_grad()
    def zone(self, mask: np.ndarray, order: str, rng: np.random.Generator):
        made = zone_restricted(mask, rng)
        if made is None:
            return None
        text, partial = made
        partial_t = torch.from_numpy(np.ascontiguousarray(partial, dtype=np.float32))[None, None]
        return text, [c[0] for c in self.tokenizers.masks[order].encode(partial_t)]

    def foreign(self, index: int, rng: np.random.Generator):
        """Another image's description that names only the lung side(s) where this mask has nothing.

        Pixel non-overlap alone is not enough: QaTa annotators use the levels loosely, so a text naming
        "middle left" may well describe this image's "lower left" lesion. Disjoint sides are safe.
        """
        own = self.data.masks[index]
        own_sides = {zone.split()[1] for zone, _ in lesion_zones(own.numpy())}
        for _ in range(FOREIGN_TRIES):
            other = int(rng.integers(len(self.data)))
            text = self.data.descriptions[other]
            sides = {zone.split()[1] for zone in parse_zones(text)}
            if other != index and sides and not sides & own_sides and not (self.data.masks[other] & own).any():
                return text, None
        return None


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a collated batch (tensors and the per-example position lists) to the training device."""
    return {k: v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] for k, v in batch.items()}
