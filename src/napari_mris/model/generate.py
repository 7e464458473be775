"""Autoregressive decoding of a mask, as one generator that streams partial results.

`autoregressive_infer` runs the prefix once (KV cache), lets the model decide `[SOV]` (target present) or
`[REJ]` (absent), feeds the forced header `[SOV] [ORDER] [Gm] [Gm] [SOT]` and then writes the mask:

- raster: one token per forward pass, row by row; greedy, sampling, beam search, or greedy with
  self-speculative decoding (the NkTP heads propose, one forward pass verifies; output identical to greedy);
- next-scale: one forward pass per scale over all its slots (block attention: the slots see the cache and
  each other), so a 1x1 preview comes first and every later scale refines it.

Only legal tokens are ever emitted: `LegalTokens` (a transformers `LogitsProcessor`, so the same object also
plugs into `generate()`) sets every other logit to -inf before any choice.

The prefix is run in two parts: the image block `[BOS] ... image [EOV]` (`prefill_image`, which also runs the
pixel stem) and then the text on a copy of its cache. The image block does not depend on the prompt, so
several findings of one image share one `ImagePrefill`; a single finding takes the same two steps, so its
mask is the same whether it was asked alone or among others.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from napari_mris.model.decoder import MRISDecoder
from napari_mris.model.sequence import (
    HEADER_LENGTH,
    check_scales,
    code_cells,
    count_text_tokens,
    mask_header,
    position_shift,
    scale_slots,
)
from napari_mris.model.vocab import EOV, REJ, SOV, VocabLayout


@dataclass
class DecodeStep:
    """One streamed update. Codes are mask codes 0..K-1 (not vocabulary ids)."""

    order: str
    codes: list[torch.Tensor] | torch.Tensor  # scale: [B, s*s] per completed scale; raster: [B, n_done]
    tokens_done: int
    tokens_total: int
    rejected: bool  # the model wrote [REJ]: the described target is not in the image
    finished: bool
    reject_probability: float = 0.0  # p([REJ]) / (p([SOV]) + p([REJ])) at the decision position
    lesion_logits: torch.Tensor | None = None  # the prefill's stem read-out (DecoderOutput.lesion_logits), if any


@dataclass
class ImagePrefill:
    """The image block of a prefix run once through the decoder: its KV cache and the pixel stem's outputs.

    Each finding's text continues a deep copy of `cache` (transformers' recipe for reusing a prompt cache),
    because decoding appends to a cache in place.
    """

    ids: torch.Tensor  # [T0] the block's ids, `[BOS] [SOV] [Gg] [Gg] [SOT] image [EOV]`, on the decoder's device
    cache: Any  # transformers DynamicCache holding T0 positions
    lesion_logits: torch.Tensor | None  # the stem's read-out (DecoderOutput.lesion_logits), if any
    pixel_features: torch.Tensor | None  # the stem's (1, g*g, H) features, for cell features

    def continue_with(self, prefix: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The text part of `prefix` and a private copy of the cache to feed it to; a prefix of another image
        is a ValueError, never a mask drawn from the wrong image's cache."""
        n = self.ids.numel()
        if prefix.numel() <= n or not torch.equal(prefix[:n].to(self.ids.device), self.ids):
            raise ValueError("the prefix does not start with this ImagePrefill's image block (another image?)")
        return prefix[n:], copy.deepcopy(self.cache)


def image_block_length(prefix: torch.Tensor) -> int:
    """Tokens up to and including the first `[EOV]`: the image block of a `prefix_ids` prefix."""
    ends = (prefix == EOV).nonzero()
    if not len(ends):
        raise ValueError("prefix has no [EOV]: build it with prefix_ids()")
    return int(ends[0, 0]) + 1


@torch.no_grad()
def prefill_image(decoder: MRISDecoder, image_block: torch.Tensor, pixels: torch.Tensor | None = None) -> ImagePrefill:
    """Run the image block (`prefix[:image_block_length(prefix)]`) and the pixel stem once, for any number of
    findings. `pixels` (1, S, S) is required by a decoder with a pixel stem."""
    device = next(decoder.parameters()).device
    ids = image_block.to(device)
    pixel_values = None if pixels is None else pixels.to(device).reshape(1, 1, *pixels.shape[-2:])
    with eval_mode(decoder):
        out = decoder(ids[None], use_cache=True, compute_logits=False, pixel_values=pixel_values)
    return ImagePrefill(ids, out.past_key_values, out.lesion_logits, out.pixel_features)


class LegalTokens(LogitsProcessor):
    """Sets the logits of every token outside `allowed` to -inf (works on [..., V] scores)."""

    def __init__(self, vocab_size: int, allowed: list[int] | range) -> None:
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool)
        self.allowed[list(allowed)] = True

    def __call__(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        if self.allowed.device != scores.device:
            self.allowed = self.allowed.to(scores.device)
        return scores.masked_fill(~self.allowed, float("-inf"))


def mask_code_tokens(layout: VocabLayout, order: str) -> LegalTokens:
    return LegalTokens(layout.vocab_size, range(*layout.mask_range(order)))


class ExpectedPatch:
    """Greedy choice for patch-codebook masks: the code closest to the probability-weighted mean patch.

    With hundreds of lesion-border codes, argmax picks "empty" wherever p(empty) is the largest single
    probability, even when most of the mass says "lesion" (spread over many similar border codes), so a
    greedily decoded mask comes out empty. Choosing the code nearest (L2) to the expected patch decides on
    the pixels instead: the minimum expected squared error choice among the codes.
    """

    def __init__(self, patches: torch.Tensor, mask_slice: slice) -> None:
        self.patches = patches.float()  # (K, p*p), row k = the patch of mask code k
        self.norms = self.patches.pow(2).sum(1)
        self.mask_slice = mask_slice

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.patches.device != scores.device:
            self.patches, self.norms = self.patches.to(scores.device), self.norms.to(scores.device)
        probs = scores[..., self.mask_slice].float().softmax(-1)
        expected = probs @ self.patches
        return (self.norms - 2 * expected @ self.patches.T).argmin(-1) + self.mask_slice.start


def choose(
    scores: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    greedy: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Greedy (temperature 0: argmax, or `greedy(scores)`) or temperature/top-k sampling over legal scores."""
    if temperature == 0:
        return scores.argmax(-1) if greedy is None else greedy(scores)
    scores = scores.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1).reshape(-1, scores.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).reshape(scores.shape[:-1])


@torch.no_grad()
def autoregressive_infer(
    decoder: MRISDecoder,
    layout: VocabLayout,
    prefix: torch.Tensor,
    order: str,
    scales: tuple[int, ...] | list[int],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    beam: int = 1,
    generator: torch.Generator | None = None,
    update_every: int | None = None,
    speculative: bool = True,
    code_patches: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
    image: ImagePrefill | None = None,
) -> Iterator[DecodeStep]:
    """Decode one mask (or `samples` masks in one batch) for `prefix` = `prefix_ids(...)`, streaming updates.

    The presence decision is always the more likely of [SOV]/[REJ] (shared by all samples); sampling only
    varies the mask. Beam search returns the best beam (B = 1) and exists for raster order only.
    `code_patches` (K, p*p), the patch of each mask code, switches greedy choice to `ExpectedPatch`.
    `pixels` (1, S, S), the preprocessed slice, feeds a decoder's pixel stem (required when it has one).
    `image`, a `prefill_image` of this prefix's image block, skips the image part (then `pixels` is unused).
    """
    scales = check_scales(order, scales)
    _check_arguments(decoder, layout, prefix, order, scales, samples, temperature, top_k, beam, update_every, generator)
    device = next(decoder.parameters()).device
    total = sum(s * s for s in scales)
    legal = mask_code_tokens(layout, order)
    mask_slice = slice(*layout.mask_range(order))
    greedy = ExpectedPatch(code_patches, mask_slice) if code_patches is not None else None

    def step(codes, done: int, p_reject: float) -> DecodeStep:
        return DecodeStep(order, codes, done, total, False, done == total, p_reject, lesion_logits)

    with eval_mode(decoder):  # no dropout while decoding; the caller's mode comes back even after Stop
        # 1. The prefix into the KV cache: the image block (shared by the findings of one image), then the
        # text on a copy of its cache; the decision is read at the last text position.
        if image is None:
            image = prefill_image(decoder, prefix[: image_block_length(prefix)], pixels)
        text, cache = image.continue_with(prefix.to(device))
        out = decoder(text[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        lesion_logits = image.lesion_logits
        decision = LegalTokens(layout.vocab_size, [SOV, REJ])(None, out.logits[0, -1])
        p_reject = float(decision.float().softmax(-1)[REJ])
        if int(decision.argmax()) == REJ:
            empty = torch.empty(1, 0, dtype=torch.long) if order == "raster" else []
            yield DecodeStep(order, empty, 0, total, rejected=True, finished=True, reject_probability=p_reject)
            return

        # 2. The forced header, for every row of the batch (samples or beams share the cached prefix).
        batch = beam if beam > 1 else samples
        cache = out.past_key_values
        if decoder.config.cell_features:  # the [SOT] at cache index len(prefix) + 4 predicts mask code 0
            table = decoder.cell_table(image.pixel_features, scales[-1], image.lesion_logits)
            decoder = CellFeatures(decoder, table, code_cells(scales), prefix.numel() + HEADER_LENGTH - 1)
        shift = position_shift(count_text_tokens(layout, prefix), decoder.config.text_slots)
        decoder = ShiftedPositions(decoder, shift) if shift else decoder
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        header = torch.tensor(mask_header(layout, order, scales[-1]), device=device).expand(batch, -1)
        out = decoder(header, past_key_values=cache, use_cache=True)

        # 3a. Next-scale: one forward pass per scale over all of its slots.
        if order == "scale":
            logits = out.logits[:, -1:]  # the [SOT] output predicts the 1x1 scale
            codes: list[torch.Tensor] = []
            for k, size in enumerate(scales):
                if k > 0:
                    slots = scale_slots(layout, codes[-1], scales[k - 1], size)
                    logits = _scale_forward(decoder, slots, k + 1, cache)
                ids = choose(legal(None, logits), temperature, top_k, generator, greedy)
                codes.append(layout.mask_codes(order, ids))
                yield step(list(codes), sum(s * s for s in scales[: k + 1]), p_reject)
            return

        # 3b. Raster: one token at a time, streamed every `update_every` tokens (default: one grid row).
        logits = out.logits[:, -1]
        if beam > 1:
            tokens = (best for best, _ in raster_beam_search(decoder, legal, logits, cache, total, beam))
        elif speculative and temperature == 0 and samples == 1 and decoder.config.nktp_k > 1:
            hidden = out.hidden_states[:, -1]
            tokens = raster_speculative(decoder, legal, logits, hidden, cache, total, mask_slice, greedy)
        else:
            tokens = raster_tokens(decoder, legal, logits, cache, total, temperature, top_k, generator, greedy)
        every, last_yield = update_every or scales[0], 0
        for ids in tokens:
            done = ids.shape[1]
            if done - last_yield >= every or done == total:
                last_yield = done
                yield step(layout.mask_codes(order, ids), done, p_reject)


class ShiftedPositions:
    """The decoder, called with RoPE positions `shift` beyond the cache length (after the text, see
    `sequence.position_shift`); everything else (config, NkTP heads) is the decoder's own."""

    def __init__(self, decoder: MRISDecoder, shift: int) -> None:
        self.decoder, self.shift = decoder, shift

    def __call__(self, input_ids: torch.Tensor, *, past_key_values, **kwargs):
        start = past_key_values.get_seq_length() + self.shift
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return self.decoder(
            input_ids, past_key_values=past_key_values, position_ids=positions.expand(input_ids.shape[0], -1), **kwargs
        )

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)


class CellFeatures:
    """The decoder, given the stem feature of the cell of the mask code each fed token predicts.

    A token at cache index q predicts mask code q - `sot_index` (the [SOT] predicts code 0, as in training,
    `sequence.build_training_sequence`); positions past the mask block get none. Reading the index off the
    cache length keeps every decoding loop (plain, speculative with cache crops, beam, next-scale) unchanged.
    """

    def __init__(self, decoder, cell_table: torch.Tensor, cells: torch.Tensor, sot_index: int) -> None:
        self.decoder, self.cell_table, self.sot_index = decoder, cell_table, sot_index
        self.cells = cells.to(cell_table.device)

    def __call__(self, input_ids: torch.Tensor, *, past_key_values, **kwargs):
        first = past_key_values.get_seq_length() - self.sot_index
        code = torch.arange(first, first + input_ids.shape[1], device=input_ids.device)
        inside = (code >= 0) & (code < len(self.cells))
        slot_cells = torch.where(inside, self.cells[code.clamp(0, len(self.cells) - 1)], -1)
        return self.decoder(
            input_ids,
            past_key_values=past_key_values,
            slot_cells=slot_cells.expand(input_ids.shape[0], -1),
            cell_table=self.cell_table,
            **kwargs,
        )

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)


@contextmanager
def eval_mode(decoder: MRISDecoder) -> Iterator[None]:
    was_training = decoder.training
    decoder.eval()
    try:
        yield
    finally:
        decoder.train(was_training)


def raster_tokens(
    decoder, legal, logits, cache, n_tokens, temperature, top_k, generator, greedy=None
) -> Iterator[torch.Tensor]:
    """Plain decoding: choose, feed, repeat. Yields the vocabulary ids so far, [B, n]."""
    tokens = torch.empty(logits.shape[0], n_tokens, dtype=torch.long, device=logits.device)
    for i in range(n_tokens):
        tokens[:, i] = choose(legal(None, logits), temperature, top_k, generator, greedy)
        yield tokens[:, : i + 1].clone()
        if i + 1 < n_tokens:
            logits = decoder(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits[:, -1]


def raster_speculative(
    decoder, legal, logits, hidden, cache, n_tokens, mask_slice, greedy=None
) -> Iterator[torch.Tensor]:
    """Greedy decoding where the NkTP heads draft the next tokens and one forward pass checks them all.

    From the hidden state h that predicts token t (greedy `nxt`), head j drafts token t+j-1. Feeding
    [nxt, d_2, ..., d_k] gives the greedy token after each; drafts are kept while they equal it, and the
    greedy token after the last kept one comes for free. Every kept token is the greedy token, so the
    output is the plain greedy output; only the number of forward passes changes. `greedy` replaces
    argmax as the greedy rule (e.g. `ExpectedPatch`); the drafts stay the heads' argmax guesses.
    """
    pick = greedy if greedy is not None else (lambda scores: scores.argmax(-1))
    tokens = torch.empty(1, n_tokens, dtype=torch.long, device=logits.device)
    tokens[:, 0] = pick(legal(None, logits))
    done = 1
    yield tokens[:, :done].clone()
    while done < n_tokens:
        # `hidden` is the state that predicted tokens[done - 1], which is not in the cache yet
        n_draft = min(decoder.config.nktp_k - 1, n_tokens - done)
        drafts = torch.stack(
            [decoder.nktp_logits(hidden, j, mask_slice).argmax(-1) + mask_slice.start for j in range(2, n_draft + 2)],
            dim=-1,
        )  # [1, n_draft]: guesses for tokens[done : done + n_draft]
        out = decoder(torch.cat([tokens[:, done - 1 : done], drafts], 1), past_key_values=cache, use_cache=True)
        chosen = pick(legal(None, out.logits))  # [1, n_draft + 1]: the greedy token after each fed token
        accepted = int((drafts == chosen[:, :n_draft]).long().cumprod(-1).sum())
        new = chosen[:, : accepted + 1][:, : n_tokens - done]  # the kept drafts (== greedy) and one more
        tokens[:, done : done + new.shape[1]] = new
        done += new.shape[1]
        cache.crop(-(n_draft - accepted))  # forget the rejected drafts
        hidden = out.hidden_states[:, accepted]
        yield tokens[:, :done].clone()


def raster_beam_search(decoder, legal, logits, cache, n_tokens, beam) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Beam search over the KV cache (all sequences have the same length, so no length penalty).

    Yields (best beam's ids [1, n], beam log-probabilities [beam], best first) after every token.
    """
    scores = torch.full((beam,), float("-inf"), device=logits.device)
    scores[0] = 0.0  # the beams start identical: expand only one of them
    tokens = torch.empty(beam, 0, dtype=torch.long, device=logits.device)
    for i in range(n_tokens):
        logp = F.log_softmax(legal(None, logits).float(), dim=-1)  # renormalised over the legal tokens
        top = (scores[:, None] + logp).flatten().topk(beam)
        origin, token = top.indices // logp.shape[-1], top.indices % logp.shape[-1]
        scores = top.values
        tokens = torch.cat([tokens[origin], token[:, None]], dim=1)
        yield tokens[:1].clone(), scores.clone()
        if i + 1 < n_tokens:
            cache.reorder_cache(origin)
            logits = decoder(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]


def _scale_forward(decoder: MRISDecoder, slots: torch.Tensor, scale_id: int, cache) -> torch.Tensor:
    """All slots of one scale in one pass: each sees the whole cache and every slot of its own scale."""
    batch, n = slots.shape
    past = cache.get_seq_length()
    mask = torch.zeros(batch, 1, n, past + n, device=slots.device)
    scale_ids = torch.full_like(slots, scale_id)
    return decoder(slots, scale_ids=scale_ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits


def _check_arguments(
    decoder, layout, prefix, order, scales, samples, temperature, top_k, beam, update_every, generator
) -> None:
    if decoder.config.vocab_size != layout.vocab_size:
        raise ValueError(f"decoder has {decoder.config.vocab_size} ids but the vocabulary {layout.vocab_size}")
    layout.order_token(order)
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 1 or prefix.numel() == 0:
        raise ValueError("prefix must be a non-empty 1-D LongTensor from prefix_ids()")
    if int(prefix.min()) < 0 or int(prefix.max()) >= layout.vocab_size:
        raise ValueError(f"prefix ids must lie in 0..{layout.vocab_size - 1}; build it with prefix_ids()")
    if samples < 1 or beam < 1:
        raise ValueError(f"samples and beam must be >= 1, got samples={samples} beam={beam}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    device = next(decoder.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the random generator is on {generator.device} but the decoder on {device}")
    if update_every is not None and update_every < 1:
        raise ValueError(f"update_every must be >= 1 or None, got {update_every}")
    if beam > 1:
        if order != "raster":
            raise ValueError("beam search is for raster order; next-scale order writes a whole scale per step")
        if samples > 1 or temperature > 0:
            raise ValueError("beam search is deterministic: use samples=1 and temperature=0 with beam > 1")
        n_codes = layout.mask_range(order)[1] - layout.mask_range(order)[0]
        if beam > n_codes:
            raise ValueError(f"beam {beam} is wider than the {n_codes} mask codes")
    if order == "scale" and len(scales) > decoder.config.n_scales:
        raise ValueError(f"{len(scales)} scales but the decoder has scale embeddings for {decoder.config.n_scales}")
    length = prefix.numel() + len(mask_header(layout, order, scales[-1])) + sum(s * s for s in scales)
    if length > decoder.config.max_position_embeddings:
        raise ValueError(
            f"prefix + mask is {length} tokens, more than the decoder's {decoder.config.max_position_embeddings}"
        )
