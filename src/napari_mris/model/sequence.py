"""The unified token sequence (NTP-MRISeg), its loss targets and its block-causal attention mask.

    [BOS] [SOV] [Gg] [Gg] [SOT] image(g*g) [EOV] text... [SOV] [ORDER] [Gm] [Gm] [SOT] mask... [EOV] [EOS]
    [BOS] [SOV] [Gg] [Gg] [SOT] image(g*g) [EOV] text... [REJ] [EOS]                       (target absent)

This module builds the prefix (image and text) and assembles training examples; what follows the header,
and where every token sits (RoPE positions with the decoder's fixed `text_slots`, the cell each mask
position reads), belongs to the decoding order (`orders.py`), which decoding uses as well.

`labels[t]` is the target of the output at position t (already shifted: do not shift again), -100 where
there is no loss. Positions with the same block id see each other (a next-scale block); otherwise
attention is causal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from napari_mris.errors import PromptError
from napari_mris.model.orders import IGNORE, DecodingOrder
from napari_mris.model.vocab import BOS, EOS, EOV, PAD, REJ, SOT, SOV, VocabLayout

IMAGE_START = 5  # the image tokens follow [BOS] [SOV] [Gg] [Gg] [SOT]


@dataclass
class TrainingSequence:
    """One example as the decoder sees it; all tensors are LongTensor[T]."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # target of the output at each position, IGNORE = no loss
    scale_ids: torch.Tensor  # k for the slots of scale k >= 2, 0 elsewhere
    block_ids: torch.Tensor  # non-decreasing; a position sees every position whose block id is <= its own
    mask_positions: torch.Tensor  # positions whose label is a mask code, in target order (empty when rejected)
    order: str
    pixels: torch.Tensor | None = None  # (1, S, S) preprocessed slice, for a decoder with a pixel stem
    position_ids: torch.Tensor | None = None  # RoPE positions (None = 0..T-1)
    slot_cells: torch.Tensor | None = None  # cell of the mask code each position predicts (code_cells), -1 = none

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def prefix_ids(
    layout: VocabLayout, image_codes: torch.Tensor, text_ids: Sequence[int] | torch.Tensor, image_grid: int
) -> torch.Tensor:
    """`[BOS] [SOV] [Gg] [Gg] [SOT] image [EOV] text` as vocabulary ids; the model decides what follows."""
    text = torch.as_tensor(text_ids, dtype=torch.long).reshape(-1)
    if text.numel() == 0:
        raise PromptError("The prompt produced no text tokens; type a description of the finding")
    return torch.cat([image_block_ids(layout, image_codes, image_grid), layout.text_ids(text)])


def image_block_ids(layout: VocabLayout, image_codes: torch.Tensor, image_grid: int) -> torch.Tensor:
    """`[BOS] [SOV] [Gg] [Gg] [SOT] image [EOV]`: the start of every prefix, the same for every prompt."""
    image_codes = torch.as_tensor(image_codes).reshape(-1)
    if image_codes.numel() != image_grid * image_grid:
        raise ValueError(
            f"image codes do not match the image grid: {image_codes.numel()} codes for a "
            f"{image_grid}x{image_grid} grid ({image_grid * image_grid} expected)"
        )
    g = layout.grid_token(image_grid)
    head = torch.tensor([BOS, SOV, g, g, SOT], dtype=torch.long)
    tail = torch.tensor([EOV], dtype=torch.long)
    return torch.cat([head, layout.image_ids(image_codes), tail])


def count_text_tokens(layout: VocabLayout, prefix: torch.Tensor) -> int:
    """The number of text tokens in a prefix built by `prefix_ids`."""
    start = layout.text_start
    return int(((prefix >= start) & (prefix < start + layout.n_text)).sum())


def build_training_sequence(
    order: DecodingOrder,
    image_codes: torch.Tensor,
    text_ids: Sequence[int] | torch.Tensor,
    image_grid: int,
    mask_codes: Sequence[torch.Tensor] | torch.Tensor | None,
    pixels: torch.Tensor | None = None,
    text_slots: int = 0,
) -> TrainingSequence:
    """One training example; `mask_codes=None` builds the `[REJ]` form (target absent).

    `pixels` (1, S, S) travels with the sequence for a decoder with a pixel stem; `text_slots` is the
    decoder's fixed number of text positions (`orders.position_shift`).
    """
    prefix = prefix_ids(order.layout, image_codes, text_ids, image_grid)
    n = prefix.numel()
    placement = order.placement(n, len(torch.as_tensor(text_ids).reshape(-1)), text_slots)
    if mask_codes is None:
        input_ids = torch.cat([prefix, torch.tensor([REJ, EOS])])
        labels = torch.full_like(input_ids, IGNORE)
        labels[n - 1] = REJ
        block_ids = torch.arange(len(input_ids))
        scale_ids = torch.zeros_like(input_ids)
        mask_positions = torch.empty(0, dtype=torch.long)
    else:
        block = order.block(mask_codes)
        input_ids = torch.cat([prefix, torch.tensor(order.header()), block.inputs])
        sot = placement.sot_index
        labels = torch.full_like(input_ids, IGNORE)
        labels[sot:] = block.labels
        labels[n - 1] = SOV  # the presence decision, at the last text position
        scale_ids = torch.zeros_like(input_ids)
        scale_ids[sot + 1 :] = block.scale_ids
        block_ids = torch.arange(len(input_ids))
        block_ids[sot + 1 :] = sot + 1 + block.blocks
        mask_positions = sot + torch.arange(order.n_codes)  # every order's block starts with its codes
    index = torch.arange(len(input_ids))
    return TrainingSequence(
        input_ids,
        labels,
        scale_ids,
        block_ids,
        mask_positions,
        order.name,
        pixels,
        placement.position_ids(index),
        placement.slot_cells(index),
    )


def block_causal_allowed(block_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool [T, T]: query q may see key k when block(k) <= block(q) and k is a real token.

    Every row keeps its own diagonal, so a padding row is never fully masked (that would give NaN in softmax).
    """
    allowed = (block_ids[None, :] <= block_ids[:, None]) & valid[None, :]
    return allowed | torch.eye(len(block_ids), dtype=torch.bool, device=block_ids.device)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool "may attend" -> the additive float mask transformers expects (0 = attend, dtype min = blocked)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def collate(sequences: Sequence[TrainingSequence]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Right-pad a batch and build its (B, 1, T, T) additive block-causal attention mask.

    `sample_positions[b][i]` is the position whose output predicts the i-th mask code of example b, so a
    per-(sample, target index) memory (HET) can find the same target again in later epochs.
    `pixel_values` (B, 1, S, S) is there when the sequences carry pixels (all or none of them).
    """
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    with_pixels = [s.pixels is not None for s in sequences]
    if any(with_pixels) and not all(with_pixels):
        raise ValueError("some sequences carry pixels and some do not; a batch needs all or none")
    length = max(len(s) for s in sequences)
    batch = len(sequences)
    input_ids = torch.full((batch, length), PAD, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    scale_ids = torch.zeros((batch, length), dtype=torch.long)
    position_ids = torch.arange(length).repeat(batch, 1)
    slot_cells = torch.full((batch, length), -1, dtype=torch.long)
    attention = torch.empty((batch, 1, length, length), dtype=torch.float32)
    for b, seq in enumerate(sequences):
        t = len(seq)
        input_ids[b, :t] = seq.input_ids
        labels[b, :t] = seq.labels
        scale_ids[b, :t] = seq.scale_ids
        if seq.position_ids is not None:
            position_ids[b, :t] = seq.position_ids
            position_ids[b, t:] = seq.position_ids[-1] + 1 + torch.arange(length - t)  # padding: never attended
        if seq.slot_cells is not None:
            slot_cells[b, :t] = seq.slot_cells
        block_ids = torch.arange(length)
        block_ids[:t] = seq.block_ids
        valid = torch.arange(length) < t
        attention[b, 0] = additive_mask(block_causal_allowed(block_ids, valid))
    batch_dict = {
        "input_ids": input_ids,
        "labels": labels,
        "scale_ids": scale_ids,
        "position_ids": position_ids,
        "attention_mask": attention,
        "slot_cells": slot_cells,
        "sample_positions": [seq.mask_positions.clone() for seq in sequences],
    }
    if all(with_pixels):
        batch_dict["pixel_values"] = torch.stack([seq.pixels.float() for seq in sequences])
    return batch_dict
