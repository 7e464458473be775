"""Autoregressive decoding of a mask, as one generator that streams partial results.

`autoregressive_infer` runs the prefix once (KV cache), lets the model decide `[SOV]` (target present) or
`[REJ]` (absent), feeds the forced header `[SOV] [ORDER] [Gm] [Gm] [SOT]` and then writes the mask:

- raster: one token per forward pass, row by row; greedy, sampling, beam search, or greedy with
  self-speculative decoding (the NkTP heads propose, one forward pass verifies; output identical to greedy);
- next-scale: one forward pass per scale over all its slots (block attention: the slots see the cache and
  each other), so a 1x1 preview comes first and every later scale refines it.

What follows the header is the decoding order's (`orders.py`: its layout, positions, cells and loop); only
legal tokens are ever emitted: the presence decision is read among `[SOV]`/`[REJ]` only (`orders.LegalTokens`),
and the mask loop's logits cover the order's mask codes only (`orders.Feed`).

The prefix is run in two parts: the image block `[BOS] ... image [EOV]` (`prefill_image`, which also runs the
pixel stem) and then the text on a copy of its cache. The image block does not depend on the prompt, so
several findings of one image share one `ImagePrefill`; a single finding takes the same two steps, so its
mask is the same whether it was asked alone or among others.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from napari_mris.model.decoder import MRISDecoder
from napari_mris.model.orders import DecodingOrder, Feed, LegalTokens, Picker, Placement, position_shift
from napari_mris.model.sequence import count_text_tokens
from napari_mris.model.vocab import EOV, PAD, REJ, SOV


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


def reject_probability(order: DecodingOrder, logits: torch.Tensor) -> torch.Tensor:
    """p([REJ]) / (p([SOV]) + p([REJ])) per row of `logits` [B, V] at the decision position (the last text
    position): the presence decision, read among its two legal tokens only."""
    decision = LegalTokens(order.layout.vocab_size, [SOV, REJ])(None, logits).float().softmax(-1)
    return decision[:, REJ]


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


@torch.no_grad()
def autoregressive_infer(
    decoder: MRISDecoder,
    order: DecodingOrder,
    prefix: torch.Tensor,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_k: int | None = None,
    beam: int = 1,
    generator: torch.Generator | None = None,
    update_every: int | None = None,
    speculative: bool = True,
    pixels: torch.Tensor | None = None,
    image: ImagePrefill | None = None,
    reject_threshold: float = 0.5,
    decided: float | None = None,
) -> Iterator[DecodeStep]:
    """Decode one mask (or `samples` masks in one batch) for `prefix` = `prefix_ids(...)`, streaming updates.

    The presence decision is `[REJ]` when p([REJ]) among [SOV]/[REJ] is above `reject_threshold` (0.5: the
    more likely of the two; a model can carry a calibrated one, config.json `reject_threshold`), shared by
    all samples; sampling only varies the mask. Beam search returns the best beam (B = 1) and exists for
    raster order only. Greedy choice follows the mask tokenizer's greedy rule (`DecodingOrder.greedy_rule`).
    `pixels` (1, S, S), the preprocessed slice, feeds a decoder's pixel stem (required when it has one).
    `image`, a `prefill_image` of this prefix's image block, skips the image part (then `pixels` is unused).
    `decided`, a p([REJ]) read elsewhere (`presence_probabilities` of an adapter's base model), replaces this
    decoder's own in the decision.
    """
    _check_arguments(decoder, order, prefix, samples, temperature, top_k, beam, update_every, generator)
    device = next(decoder.parameters()).device
    total = order.n_codes
    greedy = order.greedy_rule() if temperature == 0 else None
    pick = Picker(order.mask_slice, temperature, top_k, generator, greedy, beam, speculative)

    with eval_mode(decoder):  # no dropout while decoding; the caller's mode comes back even after Stop
        # 1. The prefix into the KV cache: the image block (shared by the findings of one image), then the
        # text on a copy of its cache; the decision is read at the last text position.
        if image is None:
            image = prefill_image(decoder, prefix[: image_block_length(prefix)], pixels)
        text, cache = image.continue_with(prefix.to(device))
        out = decoder(text[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        p_reject = float(reject_probability(order, out.logits[:, -1])[0]) if decided is None else float(decided)
        if p_reject > reject_threshold:
            yield DecodeStep(order.name, order.no_codes(), 0, total, True, True, p_reject)
            return

        # 2. The forced header, for every row of the batch (samples or beams share the cached prefix), fed
        # with the positions and cell features that training gave it (`orders.Placement`).
        batch = beam if beam > 1 else samples
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        n_text = count_text_tokens(order.layout, prefix)
        placement = order.placement(prefix.numel(), n_text, decoder.config.text_slots)
        cell_table = None
        if decoder.config.cell_features:
            cell_table = decoder.cell_table(image.pixel_features, order.grid, image.lesion_logits)
        feed = Feed(decoder, cache, placement, cell_table, vocab_slice=order.mask_slice)
        out = feed(torch.tensor(order.header(), device=device).expand(batch, -1))

        # 3. The order's own loop, streamed every `update_every` tokens (default: a raster row, a scale).
        every, last_yield = update_every or order.stream_every, 0
        for codes, done in order.write(feed, out.logits[:, -1], out.hidden_states, pick):
            if done - last_yield >= every or done == total:
                last_yield = done
                yield DecodeStep(order.name, codes, done, total, False, done == total, p_reject, image.lesion_logits)


@torch.no_grad()
def infer_findings(
    decoder: MRISDecoder,
    order: DecodingOrder,
    image: ImagePrefill,
    texts: Sequence[torch.Tensor],
    *,
    speculative: bool = True,
    reject_threshold: float = 0.5,
    decided: Sequence[float] | None = None,
) -> Iterator[list[DecodeStep]]:
    """Greedy masks for several findings of one image decoded together, one batch row per finding: yields
    one `DecodeStep` per finding (in the order given) after every step of the order's loop.

    `texts` are the findings' text ids (vocabulary ids, what `prefix_ids` puts after the image block). Shorter
    texts are left-padded inside the text block; the padding is masked out of every attention and each row
    gets the positions it would have alone (`Placement.shift` per row), so each finding is decoded as
    `autoregressive_infer` decodes it, up to the rounding of batched float arithmetic. A finding the model
    answers "not present" (`reject_threshold`, as in `autoregressive_infer`) leaves the batch. Why: on a CPU
    one forward pass of F rows costs little more than one of a single row, so the later findings of an image
    come almost free (docs/results.md). `decided`: one p([REJ]) per finding read elsewhere, as in
    `autoregressive_infer`.
    """
    if not texts:
        raise ValueError("infer_findings needs at least one finding")
    device = image.ids.device
    total, n_image = order.n_codes, image.ids.numel()
    lengths = torch.tensor([len(t) for t in texts], device=device)
    width = int(lengths.max())
    ids = torch.full((len(texts), width), PAD, dtype=torch.long, device=device)
    text_valid = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]  # left padding
    for row, text in enumerate(texts):
        ids[row, width - len(text) :] = text.to(device)
    key_valid = None  # texts of one length need no padding, so no mask: the plain causal path
    if not bool(text_valid.all()):
        key_valid = torch.cat([torch.ones(len(texts), n_image, dtype=torch.bool, device=device), text_valid], 1)
    pick = Picker(order.mask_slice, greedy=order.greedy_rule(), speculative=speculative)

    with eval_mode(decoder):
        # 1. The texts on copies of the image block's cache, then one presence decision per finding.
        cache = copy.deepcopy(image.cache)
        cache.batch_repeat_interleave(len(texts))
        text_feed = Feed(decoder, cache, Placement(n_image, 0, order.cells), None, key_valid)
        positions = (n_image + (torch.cumsum(text_valid, 1) - 1).clamp(min=0)).long()
        index = torch.arange(n_image, n_image + width, device=device)
        mask = None if key_valid is None else text_feed.attention(index, False)
        out = decoder(
            ids, past_key_values=cache, use_cache=True, position_ids=positions, attention_mask=mask, logits_to_keep=1
        )
        p_reject = reject_probability(order, out.logits[:, -1])
        if decided is not None:
            p_reject = torch.as_tensor(list(decided), dtype=p_reject.dtype, device=p_reject.device)
        present = torch.nonzero(p_reject <= reject_threshold)[:, 0]
        p_reject = p_reject.tolist()
        steps = [DecodeStep(order.name, order.no_codes(), 0, total, True, True, p) for p in p_reject]
        if not len(present):
            yield steps
            return

        # 2. The findings that are present: header and mask, each row at its own positions after its text.
        shifts = torch.tensor([position_shift(len(t), decoder.config.text_slots) for t in texts], device=device)
        placement = Placement(n_image + width, (shifts + lengths - width)[:, None], order.cells)
        cell_table = None
        if decoder.config.cell_features:
            cell_table = decoder.cell_table(image.pixel_features, order.grid, image.lesion_logits)
        feed = Feed(decoder, cache, placement, cell_table, key_valid, order.mask_slice)
        feed.select(present)
        out = feed(torch.tensor(order.header(), device=device).expand(len(present), -1))
        for codes, done in order.write(feed, out.logits[:, -1], out.hidden_states, pick):
            for k, row in enumerate(present.tolist()):
                mine = [c[k : k + 1] for c in codes] if isinstance(codes, list) else codes[k : k + 1]
                steps[row] = DecodeStep(
                    order.name, mine, done, total, False, done == total, p_reject[row], image.lesion_logits
                )
            yield list(steps)


def presence_probabilities(
    decoder: MRISDecoder, order: DecodingOrder, image: ImagePrefill, texts: Sequence[torch.Tensor]
) -> list[float]:
    """Each finding's p([REJ]) at the decision position, nothing drawn: `infer_findings` with a threshold no
    probability is under, so every finding leaves the batch after its decision. The pipeline asks an adapter's
    base model this way: the base decides "not present", the adapter draws (pipeline.MRISPipeline)."""
    first = next(infer_findings(decoder, order, image, texts, reject_threshold=-1.0))
    return [step.reject_probability for step in first]


@contextmanager
def eval_mode(decoder: MRISDecoder) -> Iterator[None]:
    was_training = decoder.training
    decoder.eval()
    try:
        yield
    finally:
        decoder.train(was_training)


def _check_arguments(decoder, order, prefix, samples, temperature, top_k, beam, update_every, generator) -> None:
    layout = order.layout
    if decoder.config.vocab_size != layout.vocab_size:
        raise ValueError(f"decoder has {decoder.config.vocab_size} ids but the vocabulary {layout.vocab_size}")
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
        if not order.one_code_per_step:
            raise ValueError(f"beam search is for raster order; {order.name} order writes a whole scale per step")
        if samples > 1 or temperature > 0:
            raise ValueError("beam search is deterministic: use samples=1 and temperature=0 with beam > 1")
        n_codes = order.mask_slice.stop - order.mask_slice.start
        if beam > n_codes:
            raise ValueError(f"beam {beam} is wider than the {n_codes} mask codes")
    if order.n_scale_ids > decoder.config.n_scales:
        n_scales = decoder.config.n_scales
        raise ValueError(f"{order.n_scale_ids} scales but the decoder has scale embeddings for {n_scales}")
    length = prefix.numel() + len(order.header()) + order.n_codes
    if length > decoder.config.max_position_embeddings:
        raise ValueError(
            f"prefix + mask is {length} tokens, more than the decoder's {decoder.config.max_position_embeddings}"
        )
