"""The decoder's vocabulary: one contiguous id range per kind of token.

One decoder reads and writes every kind of token (specials, grid-size meta tokens, text, image codes and the
mask codes of each decoding order), so each kind gets its own offset range in a single vocabulary. The layout
is stored in `config.json` (`to_dict`), so a model directory says exactly how its ids are laid out.

    0..8      [PAD] [BOS] [EOS] [SOV] [SOT] [EOV] [REJ] [RASTER] [SCALE]
    9..72     [G1] .. [G64]             grid-size meta tokens
    73..      text ids, image codes, raster mask codes, scale mask codes (only the orders the model has)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[SOV]", "[SOT]", "[EOV]", "[REJ]", "[RASTER]", "[SCALE]")
PAD, BOS, EOS, SOV, SOT, EOV, REJ, RASTER, SCALE = range(len(SPECIAL_TOKENS))
ORDERS = ("raster", "scale")
ORDER_TOKENS = {"raster": RASTER, "scale": SCALE}
MAX_GRID = 64
GRID_START = len(SPECIAL_TOKENS)  # id of [G1]
TEXT_START = GRID_START + MAX_GRID  # first text id (73)


def _as_long(values: Iterable[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"token codes must be integers, got a {values.dtype} tensor")
        return values.long()
    return torch.as_tensor(list(values), dtype=torch.long)


def _shift_checked(values: Iterable[int] | torch.Tensor, start: int, count: int, what: str) -> torch.Tensor:
    """Map codes 0..count-1 to ids start..start+count-1, refusing anything out of range (a wrong tokenizer)."""
    codes = _as_long(values)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= count):
        raise ValueError(
            f"{what} out of range: expected 0..{count - 1}, got min {int(codes.min())} max {int(codes.max())}"
        )
    return codes + start


@dataclass(frozen=True)
class VocabLayout:
    """Offsets of every token kind in the decoder's vocabulary."""

    n_text: int
    n_image: int
    n_mask: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (("n_text", self.n_text), ("n_image", self.n_image)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VocabLayout.{name} must be a positive integer, got {value!r}")
        if not self.n_mask:
            raise ValueError("VocabLayout.n_mask must name at least one decoding order ('raster' or 'scale')")
        unknown = sorted(set(self.n_mask) - set(ORDERS))
        if unknown:
            raise ValueError(f"VocabLayout.n_mask has unknown decoding orders {unknown}; known: {list(ORDERS)}")
        for order, size in self.n_mask.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"VocabLayout.n_mask[{order!r}] must be a positive integer, got {size!r}")
        # A fixed key order (raster before scale) makes the ranges independent of how the dict was built.
        object.__setattr__(self, "n_mask", {order: self.n_mask[order] for order in ORDERS if order in self.n_mask})

    # -- ranges ------------------------------------------------------------------------------------------------
    @property
    def text_start(self) -> int:
        return TEXT_START

    @property
    def image_start(self) -> int:
        return TEXT_START + self.n_text

    def mask_range(self, order: str) -> tuple[int, int]:
        """[start, stop) of the mask codes of `order`."""
        self._check_order(order)
        start = self.image_start + self.n_image
        for name, size in self.n_mask.items():
            if name == order:
                return start, start + size
            start += size
        raise AssertionError("unreachable")

    @property
    def vocab_size(self) -> int:
        return self.image_start + self.n_image + sum(self.n_mask.values())

    @property
    def orders(self) -> tuple[str, ...]:
        return tuple(self.n_mask)

    # -- single tokens -----------------------------------------------------------------------------------------
    def grid_token(self, size: int) -> int:
        """The meta token [G<size>] that states a token grid of size x size."""
        if not isinstance(size, int) or not 1 <= size <= MAX_GRID:
            raise ValueError(f"grid size must be an integer in 1..{MAX_GRID}, got {size!r}")
        return GRID_START + size - 1

    def order_token(self, order: str) -> int:
        self._check_order(order)
        return ORDER_TOKENS[order]

    # -- code <-> id -------------------------------------------------------------------------------------------
    def text_ids(self, ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
        return _shift_checked(ids, self.text_start, self.n_text, "text token ids")

    def image_ids(self, codes: Iterable[int] | torch.Tensor) -> torch.Tensor:
        return _shift_checked(codes, self.image_start, self.n_image, "image codes")

    def mask_ids(self, order: str, codes: Iterable[int] | torch.Tensor) -> torch.Tensor:
        start, stop = self.mask_range(order)
        return _shift_checked(codes, start, stop - start, f"{order} mask codes")

    def mask_codes(self, order: str, ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Vocabulary ids back to mask codes 0..K-1 (the inverse of `mask_ids`)."""
        start, stop = self.mask_range(order)
        ids = _as_long(ids)
        if ids.numel() and (int(ids.min()) < start or int(ids.max()) >= stop):
            raise ValueError(
                f"{order} mask token ids must lie in {start}..{stop - 1}, got min {int(ids.min())} max {int(ids.max())}"
            )
        return ids - start

    def token_name(self, token_id: int) -> str:
        """A readable name for one id (for docs, logs and test failures)."""
        if 0 <= token_id < GRID_START:
            return SPECIAL_TOKENS[token_id]
        if token_id < TEXT_START:
            return f"[G{token_id - GRID_START + 1}]"
        if token_id < self.image_start:
            return f"text:{token_id - self.text_start}"
        if token_id < self.image_start + self.n_image:
            return f"img:{token_id - self.image_start}"
        for order in self.n_mask:
            start, stop = self.mask_range(order)
            if start <= token_id < stop:
                return f"{order}:{token_id - start}"
        raise ValueError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")

    # -- persistence -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "n_text": self.n_text,
            "n_image": self.n_image,
            "n_mask": dict(self.n_mask),
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VocabLayout:
        missing = {"n_text", "n_image", "n_mask"} - set(data)
        if missing:
            raise ValueError(f"vocabulary section is missing {sorted(missing)}")
        unknown = set(data) - {"n_text", "n_image", "n_mask", "vocab_size"}
        if unknown:
            raise ValueError(f"vocabulary section has unknown keys {sorted(unknown)}")
        if not isinstance(data["n_mask"], Mapping):
            raise ValueError(f"vocabulary section: n_mask must be a mapping, got {data['n_mask']!r}")
        layout = cls(n_text=data["n_text"], n_image=data["n_image"], n_mask=dict(data["n_mask"]))
        if "vocab_size" in data and data["vocab_size"] != layout.vocab_size:
            raise ValueError(
                f"vocabulary section says vocab_size {data['vocab_size']}, its ranges give {layout.vocab_size}"
            )
        return layout

    def _check_order(self, order: str) -> None:
        if order not in self.n_mask:
            raise ValueError(f"decoding order {order!r} is not in this model; it has {list(self.n_mask)}")
