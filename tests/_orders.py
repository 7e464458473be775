"""Decoding orders for tests that build sequences by hand: scales without a trained mask tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

from napari_mris.model.orders import DecodingOrder, LegalTokens, PlainCodes, decoding_order
from napari_mris.model.vocab import VocabLayout


def order_for(layout: VocabLayout, name: str, scales: Sequence[int]) -> DecodingOrder:
    """Order `name` over `scales`, with argmax greedy (tests compare against argmax teacher forcing)."""
    return decoding_order(name, layout, PlainCodes(tuple(scales)))


def legal_codes(layout: VocabLayout, name: str) -> LegalTokens:
    """Only the mask codes of order `name`."""
    return LegalTokens(layout.vocab_size, range(*layout.mask_range(name)))
