"""The unified token sequence (NTP-MRISeg), its loss targets and its block-causal attention mask.

    [BOS] [SOV] [Gg] [Gg] [SOT] image(g*g) [EOV] text... [SOV] [ORDER] [Gm] [Gm] [SOT] mask... [EOV] [EOS]
    [BOS] [SOV] [Gg] [Gg] [SOT] image(g*g) [EOV] text... [REJ] [EOS]                       (target absent)

RoPE positions: with `text_slots` > 0 (the decoder's setting) the text is given that many positions
whatever its length, so the decision, header and mask tokens always sit at the same positions and every
mask cell is a fixed distance from its image cell (`position_shift`); 0 keeps plain positions 0..T-1.

`labels[t]` is the target of the output at position t (already shifted: do not shift again), -100 where
there is no loss. Raster order is plain next-token prediction. Next-scale order is not: the `[SOT]` output
predicts scale 1, and scale k >= 2 is predicted in one step from s_k*s_k input *slots* holding scale k-1's
codes nearest-upsampled to s_k x s_k (plus a learned scale embedding chosen by `scale_ids`); all slots of
one scale share a block of the block-causal attention mask, so they see each other and everything before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from napari_mris.errors import PromptError
from napari_mris.model.vocab import BOS, EOS, EOV, PAD, REJ, SOT, SOV, VocabLayout

IGNORE = -100
HEADER_LENGTH = 5  # [SOV] [ORDER] [Gm] [Gm] [SOT]
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


def position_shift(n_text: int, text_slots: int) -> int:
    """How far the tokens after an `n_text`-token text move along the RoPE positions (0 when text_slots is 0).

    Why: a mask token must find the image token of its own cell. With plain positions their distance
    changes with the prompt's length, and rotary attention cannot learn a fixed "look g*g + c back"; with a
    fixed number of text positions the distance is the same in every sequence.
    """
    if text_slots <= 0:
        return 0
    if n_text > text_slots:
        raise ValueError(f"{n_text} text tokens do not fit the decoder's {text_slots} text positions")
    return text_slots - n_text


def count_text_tokens(layout: VocabLayout, prefix: torch.Tensor) -> int:
    """The number of text tokens in a prefix built by `prefix_ids`."""
    start = layout.text_start
    return int(((prefix >= start) & (prefix < start + layout.n_text)).sum())


def mask_header(layout: VocabLayout, order: str, grid: int) -> list[int]:
    """`[SOV] [ORDER] [Gm] [Gm] [SOT]`: forced once the model has chosen [SOV]."""
    g = layout.grid_token(grid)
    return [SOV, layout.order_token(order), g, g, SOT]


def check_scales(order: str, scales: Sequence[int]) -> tuple[int, ...]:
    """Validate the token grid sizes of a decoding order (raster: one grid; scale: 1 = s_1 < s_2 < ...)."""
    scales = tuple(int(s) for s in scales)
    if not scales:
        raise ValueError("scales must name at least one token grid size")
    if order == "raster" and len(scales) != 1:
        raise ValueError(f"raster order uses a single-scale mask tokenizer, got scales {scales}")
    if order == "scale":
        if scales[0] != 1:
            raise ValueError(f"next-scale order must start at a 1x1 scale (predicted by [SOT]), got scales {scales}")
        if any(b <= a for a, b in zip(scales, scales[1:], strict=False)):
            raise ValueError(f"next-scale sizes must increase strictly, got {scales}")
    return scales


def scale_slots(layout: VocabLayout, prev_codes: torch.Tensor, prev_size: int, size: int) -> torch.Tensor:
    """Scale k-1's codes [B, p*p] nearest-upsampled to [B, size*size] scale-order vocabulary ids (the slot inputs)."""
    if prev_codes.dim() != 2 or prev_codes.shape[1] != prev_size * prev_size:
        raise ValueError(
            f"previous-scale codes must be [B, {prev_size * prev_size}] for a {prev_size}x{prev_size} scale, "
            f"got {tuple(prev_codes.shape)}"
        )
    source = (torch.arange(size, device=prev_codes.device) * prev_size) // size  # torch 'nearest' index rule
    index = (source[:, None] * prev_size + source[None, :]).reshape(-1)
    return layout.mask_ids("scale", prev_codes[:, index])


def cell_offset(size: int) -> int:
    """Where the cells of an s x s grid start in the cell table of `code_cells`: 1 + 4 + ... + (s-1)^2."""
    return (size - 1) * size * (2 * size - 1) // 6


def grid_of_cell(index: int) -> int:
    """The grid size s whose cells hold table index `index` (the inverse of `cell_offset`)."""
    size = 1
    while cell_offset(size + 1) <= index:
        size += 1
    return size


def code_cells(scales: Sequence[int]) -> torch.Tensor:
    """For each mask code of one order (codes of all `scales` in sequence order), its cell in one table
    that holds every grid 1x1, 2x2, ..., GxG in turn (cell j of the s x s grid is `cell_offset(s) + j`).

    A decoder with `cell_features` adds the pixel-stem feature of that cell (the stem's features pooled to
    the s x s grid) to the input of the position that predicts the code, so a mask position reads its own
    patch of the image directly. The table layout depends on nothing but the grid sizes, so raster and
    next-scale codes index the same table.
    """
    return torch.cat([cell_offset(s) + torch.arange(s * s) for s in scales])


def _mask_code_list(order: str, mask_codes: Sequence[torch.Tensor] | torch.Tensor, scales: tuple[int, ...]):
    if isinstance(mask_codes, torch.Tensor):
        mask_codes = [mask_codes] if order == "raster" else list(mask_codes)
    codes = [torch.as_tensor(c).reshape(-1) for c in mask_codes]
    if len(codes) != len(scales):
        raise ValueError(f"{order} mask: {len(codes)} code grids for {len(scales)} scales {scales}")
    for c, s in zip(codes, scales, strict=True):
        if c.numel() != s * s:
            raise ValueError(f"{order} mask: {c.numel()} codes for a {s}x{s} scale ({s * s} expected)")
    return codes


def build_training_sequence(
    layout: VocabLayout,
    image_codes: torch.Tensor,
    text_ids: Sequence[int] | torch.Tensor,
    image_grid: int,
    order: str,
    mask_codes: Sequence[torch.Tensor] | torch.Tensor | None,
    scales: Sequence[int],
    pixels: torch.Tensor | None = None,
    text_slots: int = 0,
) -> TrainingSequence:
    """One training example; `mask_codes=None` builds the `[REJ]` form (target absent).

    `pixels` (1, S, S) travels with the sequence for a decoder with a pixel stem; `text_slots` is the
    decoder's fixed number of text positions (see `position_shift`).
    """
    layout.order_token(order)  # fails early on an order this model lacks
    scales = check_scales(order, scales)
    prefix = prefix_ids(layout, image_codes, text_ids, image_grid)
    n = prefix.numel()
    shift = position_shift(len(torch.as_tensor(text_ids).reshape(-1)), text_slots)

    def positions(length: int) -> torch.Tensor:
        ids = torch.arange(length)
        ids[n:] += shift
        return ids

    if mask_codes is None:
        input_ids = torch.cat([prefix, torch.tensor([REJ, EOS])])
        labels = torch.full_like(input_ids, IGNORE)
        labels[n - 1] = REJ
        return TrainingSequence(
            input_ids,
            labels,
            torch.zeros_like(input_ids),
            torch.arange(len(input_ids)),
            torch.empty(0, dtype=torch.long),
            order,
            pixels,
            positions(len(input_ids)),
            torch.full_like(input_ids, -1),
        )

    codes = _mask_code_list(order, mask_codes, scales)
    header = torch.tensor(mask_header(layout, order, scales[-1]))
    if order == "raster":
        targets = layout.mask_ids(order, codes[0])
        body = torch.cat([targets, torch.tensor([EOV, EOS])])
        input_ids = torch.cat([prefix, header, body])
        labels = torch.full_like(input_ids, IGNORE)
        sot = n + HEADER_LENGTH - 1
        labels[sot : sot + targets.numel()] = targets
        labels[sot + targets.numel()] = EOV
        mask_positions = torch.arange(sot, sot + targets.numel())
        scale_ids = torch.zeros_like(input_ids)
        block_ids = torch.arange(len(input_ids))
    else:
        slot_inputs = [
            scale_slots(layout, codes[k - 1][None], scales[k - 1], scales[k])[0] for k in range(1, len(scales))
        ]
        input_ids = torch.cat([prefix, header, *slot_inputs])
        labels = torch.full_like(input_ids, IGNORE)
        scale_ids = torch.zeros_like(input_ids)
        block_ids = torch.arange(len(input_ids))
        sot = n + HEADER_LENGTH - 1
        labels[sot] = layout.mask_ids(order, codes[0])[0]
        start = sot + 1
        for k in range(1, len(scales)):  # scale number k+1 (1-based), held by s*s slots
            stop = start + scales[k] ** 2
            labels[start:stop] = layout.mask_ids(order, codes[k])
            scale_ids[start:stop] = k + 1
            block_ids[start:stop] = start
            start = stop
        mask_positions = torch.arange(sot, len(input_ids))
    labels[n - 1] = SOV  # the presence decision, at the last text position
    slot_cells = torch.full_like(input_ids, -1)
    slot_cells[mask_positions] = code_cells(scales)
    return TrainingSequence(
        input_ids, labels, scale_ids, block_ids, mask_positions, order, pixels, positions(len(input_ids)), slot_cells
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
