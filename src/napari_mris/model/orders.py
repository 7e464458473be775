"""Decoding orders: the mask block that follows `[SOV] [ORDER] [Gm] [Gm] [SOT]`, one object per order.

Training (`sequence.build_training_sequence`) and inference (`generate.autoregressive_infer`) both go through
these objects, so the header, the slots, the RoPE positions, the cell each mask position reads, the block
ids and the training labels are written once:

- `RasterOrder`: one code per step, row by row; the `[SOT]` output predicts the first code, each code's
  output the next one, the last code's output `[EOV]`.
- `ScaleOrder` (coarse-to-fine, VAR's next-scale prediction): the `[SOT]` output predicts the 1x1 scale, and
  scale k >= 2 is predicted in one step from s_k*s_k input *slots* holding scale k-1's codes brought to
  s_k x s_k by the mask tokenizer (`next_scale_inputs`), plus a learned scale embedding (`scale_ids`); the
  slots of one scale share one attention block, so they see each other and everything before.

The mask tokenizer supplies what depends on its codes: `empty_code` (fills the rows a raster preview has
not reached), `greedy_rule` (how greedy decoding picks a code) and `next_scale_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from napari_mris.model.vocab import EOS, EOV, SOT, SOV, VocabLayout
from napari_mris.tokenizers.patch import upsample_codes

IGNORE = -100  # label of a position without a loss
HEADER_LENGTH = 5  # [SOV] [ORDER] [Gm] [Gm] [SOT]


class MaskCodes(Protocol):
    """What an order needs of its mask tokenizer."""

    scales: Sequence[int]
    empty_code: int

    def greedy_rule(self) -> Callable[[torch.Tensor], torch.Tensor] | None: ...

    def next_scale_inputs(self, codes: torch.Tensor, size: int) -> torch.Tensor: ...


# --------------------------------------------------------------------------- positions and cells


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

    A decoder with `cell_features` adds the pixel-stem feature of that cell to the input of the position
    that predicts the code, so a mask position reads its own patch of the image directly.
    """
    return torch.cat([cell_offset(s) + torch.arange(s * s) for s in scales])


@dataclass(frozen=True)
class Placement:
    """Where the tokens of one sequence sit: its RoPE position and the cell its output predicts, for any
    sequence index. Training asks for every index at once; decoding for the indices it feeds next."""

    prefix_length: int  # tokens up to and including the text
    shift: int | torch.Tensor  # added to every index after the prefix: position_shift, or [B, 1] one per row
    cells: torch.Tensor  # code_cells of the order: cell of the i-th mask code

    @property
    def sot_index(self) -> int:
        """The `[SOT]`, whose output predicts mask code 0."""
        return self.prefix_length + HEADER_LENGTH - 1

    def position_ids(self, index: torch.Tensor) -> torch.Tensor:
        """[n] indices -> [n] positions, or [B, n] with one shift per row."""
        shift = self.shift.to(index.device) if isinstance(self.shift, torch.Tensor) else self.shift
        return index + shift * (index >= self.prefix_length)

    def slot_cells(self, index: torch.Tensor) -> torch.Tensor:
        """Cell of the mask code the output at `index` predicts; -1 where it predicts no mask code."""
        code = index - self.sot_index
        inside = (code >= 0) & (code < len(self.cells))
        cells = self.cells.to(index.device)
        return torch.where(inside, cells[code.clamp(0, len(cells) - 1)], -1)


# --------------------------------------------------------------------------- the orders


@dataclass
class MaskBlock:
    """The tokens after the header of one present-target training sequence, and what they are for.

    `labels[0]` is the target of the `[SOT]` output, `labels[i]` that of `inputs[i - 1]`; the last input has
    no target (its label is dropped).
    """

    inputs: torch.Tensor  # vocabulary ids fed after the header
    labels: torch.Tensor  # len(inputs) + 1 targets, from the [SOT] output on
    scale_ids: torch.Tensor  # per input: k for a slot of scale k >= 2, else 0
    blocks: torch.Tensor  # per input: offset of its attention block (its own index = plain causal)


class DecodingOrder:
    """One way of writing the mask after the header; see the module docstring."""

    name: ClassVar[str]
    one_code_per_step: ClassVar[bool] = False  # a code per forward pass: beam search and NkTP drafts apply

    def __init__(self, layout: VocabLayout, tokenizer: MaskCodes) -> None:
        self.layout = layout
        self.order_token = layout.order_token(self.name)  # fails early on an order this model lacks
        self.tokenizer = tokenizer
        self.scales = self.check_scales(tuple(int(s) for s in tokenizer.scales))
        self.mask_slice = slice(*layout.mask_range(self.name))
        self.cells = code_cells(self.scales)

    @classmethod
    def check_scales(cls, scales: tuple[int, ...]) -> tuple[int, ...]:
        if not scales:
            raise ValueError("scales must name at least one token grid size")
        return scales

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def n_codes(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def stream_every(self) -> int:
        """Tokens between streamed updates unless the caller says otherwise: every step of the loop."""
        return 1

    @property
    def n_scale_ids(self) -> int:
        """The largest `scale_ids` value the order feeds (the decoder needs that many scale embeddings)."""
        return 0

    def legal_tokens(self) -> LegalTokens:
        """Only this order's mask codes."""
        return LegalTokens(self.layout.vocab_size, range(self.mask_slice.start, self.mask_slice.stop))

    def header(self) -> list[int]:
        """`[SOV] [ORDER] [Gm] [Gm] [SOT]`: forced once the model has chosen [SOV]."""
        g = self.layout.grid_token(self.grid)
        return [SOV, self.order_token, g, g, SOT]

    def placement(self, prefix_length: int, n_text: int, text_slots: int) -> Placement:
        return Placement(prefix_length, position_shift(n_text, text_slots), self.cells)

    def ids(self, codes: torch.Tensor) -> torch.Tensor:
        return self.layout.mask_ids(self.name, codes)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layout.mask_codes(self.name, ids)

    def greedy_rule(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Scores [..., K] of the mask codes -> codes [...] (None: argmax)."""
        return self.tokenizer.greedy_rule()

    def code_grids(self, mask_codes: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Validated flat code grids, one per scale."""
        if isinstance(mask_codes, torch.Tensor):
            mask_codes = [mask_codes] if len(self.scales) == 1 else list(mask_codes)
        codes = [torch.as_tensor(c).reshape(-1) for c in mask_codes]
        if len(codes) != len(self.scales):
            raise ValueError(f"{self.name} mask: {len(codes)} code grids for {len(self.scales)} scales {self.scales}")
        for c, s in zip(codes, self.scales, strict=True):
            if c.numel() != s * s:
                raise ValueError(f"{self.name} mask: {c.numel()} codes for a {s}x{s} scale ({s * s} expected)")
        return codes

    # -- what each order defines

    @property
    def block_length(self) -> int:
        """Tokens after the header in a present-target training sequence."""
        raise NotImplementedError

    def block(self, mask_codes: Sequence[torch.Tensor] | torch.Tensor) -> MaskBlock:
        raise NotImplementedError

    def no_codes(self) -> Any:
        """The codes of a `[REJ]` answer, in this order's `DecodeStep.codes` form."""
        raise NotImplementedError

    def write(self, feed: Feed, logits: torch.Tensor, hidden: torch.Tensor, pick: Picker) -> Iterator[Any]:
        """The decode loop after the header: yields (codes so far in `DecodeStep.codes` form, tokens done)."""
        raise NotImplementedError

    def preview_grids(self, codes: Any) -> list[torch.Tensor]:
        """Complete code grids (one per decoded scale) for the mask tokenizer to draw a partial result."""
        raise NotImplementedError

    def preview_mark(self, codes: Any, tokens_done: int) -> int:
        """A count that grows when a partial result is worth drawing (a new scale, a new raster row)."""
        raise NotImplementedError


class RasterOrder(DecodingOrder):
    name = "raster"
    one_code_per_step = True

    @classmethod
    def check_scales(cls, scales: tuple[int, ...]) -> tuple[int, ...]:
        if len(scales) != 1:
            raise ValueError(f"raster order uses a single-scale mask tokenizer, got scales {scales}")
        return scales

    @property
    def stream_every(self) -> int:
        return self.grid  # one token row

    @property
    def block_length(self) -> int:
        return self.n_codes + 2  # the codes, [EOV] [EOS]

    def block(self, mask_codes) -> MaskBlock:
        targets = self.ids(self.code_grids(mask_codes)[0])
        inputs = torch.cat([targets, torch.tensor([EOV, EOS])])
        labels = torch.cat([targets, torch.tensor([EOV, IGNORE, IGNORE])])
        return MaskBlock(inputs, labels, torch.zeros_like(inputs), torch.arange(len(inputs)))

    def no_codes(self) -> torch.Tensor:
        return torch.empty(1, 0, dtype=torch.long)

    def write(self, feed: Feed, logits: torch.Tensor, hidden: torch.Tensor, pick: Picker) -> Iterator[Any]:
        if pick.beam > 1:
            tokens = (best for best, _ in raster_beam_search(feed, pick, logits, self.n_codes))
        elif pick.speculative and pick.temperature == 0 and feed.decoder.config.nktp_k > 1:
            tokens = raster_speculative(feed, pick, logits, hidden[:, -1], self.n_codes)
        else:
            tokens = raster_tokens(feed, pick, logits, self.n_codes)
        for ids in tokens:
            yield self.codes(ids), ids.shape[1]

    def preview_grids(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """The codes so far (B, n), the rest of the grid filled with the tokenizer's empty code."""
        padded = torch.full((codes.shape[0], self.n_codes), self.tokenizer.empty_code, dtype=torch.long)
        padded[:, : codes.shape[1]] = codes[:, : self.n_codes].to(padded.device)
        return [padded]

    def preview_mark(self, codes: torch.Tensor, tokens_done: int) -> int:
        return tokens_done // self.grid


class ScaleOrder(DecodingOrder):
    name = "scale"

    @classmethod
    def check_scales(cls, scales: tuple[int, ...]) -> tuple[int, ...]:
        if not scales or scales[0] != 1:
            raise ValueError(f"next-scale order must start at a 1x1 scale (predicted by [SOT]), got scales {scales}")
        if any(b <= a for a, b in zip(scales, scales[1:], strict=False)):
            raise ValueError(f"next-scale sizes must increase strictly, got {scales}")
        return scales

    @property
    def n_scale_ids(self) -> int:
        return len(self.scales)

    @property
    def block_length(self) -> int:
        return self.n_codes - 1  # a slot per code of scales 2.. (the [SOT] predicts scale 1)

    def slots(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        """The input ids [B, s_k^2] of scale k (0-based, k >= 1): scale k-1's codes [B, s^2] brought to s_k x s_k."""
        previous = self.scales[k - 1]
        if codes.dim() != 2 or codes.shape[1] != previous * previous:
            raise ValueError(
                f"previous-scale codes must be [B, {previous * previous}] for a {previous}x{previous} scale, "
                f"got {tuple(codes.shape)}"
            )
        return self.ids(self.tokenizer.next_scale_inputs(codes, self.scales[k]))

    def block(self, mask_codes) -> MaskBlock:
        codes = self.code_grids(mask_codes)
        slots = [self.slots(codes[k - 1][None], k)[0] for k in range(1, len(self.scales))]
        inputs = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
        labels = torch.cat([self.ids(c) for c in codes])
        scale_ids = torch.cat([torch.full((len(s),), k + 1) for k, s in enumerate(slots, start=1)] or [inputs])
        starts = torch.cumsum(torch.tensor([0] + [len(s) for s in slots[:-1]]), 0)
        blocks = torch.cat([torch.full((len(s),), int(a)) for s, a in zip(slots, starts, strict=True)] or [inputs])
        return MaskBlock(inputs, labels, scale_ids, blocks)

    def no_codes(self) -> list[torch.Tensor]:
        return []

    def write(self, feed: Feed, logits: torch.Tensor, hidden: torch.Tensor, pick: Picker) -> Iterator[Any]:
        """One forward pass per scale over all of its slots."""
        logits = logits[:, None]  # the [SOT] output predicts the 1x1 scale
        codes: list[torch.Tensor] = []
        for k in range(len(self.scales)):
            if k > 0:
                slots = self.slots(codes[-1], k)
                logits = feed(slots, scale_ids=torch.full_like(slots, k + 1), block=True).logits
            codes.append(self.codes(pick(logits)))
            yield list(codes), sum(s * s for s in self.scales[: k + 1])

    def preview_grids(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c.detach().cpu() for c in codes]

    def preview_mark(self, codes: list[torch.Tensor], tokens_done: int) -> int:
        return len(codes)


@dataclass
class PlainCodes:
    """Mask codes without a trained tokenizer (a random-weights decoder in a benchmark, hand-built sequences
    in tests): argmax greedy, an empty code of 0 and nearest-upsampled next-scale inputs."""

    scales: tuple[int, ...]
    empty_code: int = 0

    def greedy_rule(self) -> None:
        return None

    def next_scale_inputs(self, codes: torch.Tensor, size: int) -> torch.Tensor:
        return upsample_codes(codes, size)


ORDER_CLASSES: dict[str, type[DecodingOrder]] = {cls.name: cls for cls in (RasterOrder, ScaleOrder)}


def decoding_order(name: str, layout: VocabLayout, tokenizer: MaskCodes) -> DecodingOrder:
    """The order object for `name` (a model directory's order) on its mask tokenizer."""
    if name not in ORDER_CLASSES:
        raise ValueError(f"unknown decoding order {name!r}; known: {', '.join(ORDER_CLASSES)}")
    return ORDER_CLASSES[name](layout, tokenizer)


# --------------------------------------------------------------------------- the decode loop's parts


class Feed:
    """Feeds tokens after the prefix to the decoder on one KV cache, each with the RoPE position and the
    cell feature training gave it (`Placement`): the decode loops only say which ids come next.

    `key_valid` [B, P] marks the entries among the first P of the cache a row may see: not the padding of a
    shorter text (several findings decoded together), not a draft that row rejected (`forget`); entries
    after P are seen. None = every entry. `gap` [B] counts each row's forgotten entries, so the row's next
    tokens get the positions and cells of its own sequence (cache index - gap).
    `vocab_slice`: the ids the logits cover (the order's mask codes: nothing else may be emitted, and the
    rest of the head would cost as much as the transformer on a whole next-scale block). None = all.
    """

    def __init__(
        self,
        decoder,
        cache,
        placement: Placement,
        cell_table: torch.Tensor | None,
        key_valid: torch.Tensor | None = None,
        vocab_slice: slice | None = None,
    ) -> None:
        self.decoder, self.cache, self.placement, self.cell_table = decoder, cache, placement, cell_table
        self.key_valid, self.vocab_slice = key_valid, vocab_slice
        self.gap: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, *, scale_ids: torch.Tensor | None = None, block: bool = False):
        """Run ids [B, n] after the cache; `block=True` lets them see each other (one next-scale block)."""
        batch, n = ids.shape
        past = self.cache.get_seq_length()
        index = torch.arange(past, past + n, device=ids.device)
        own = index if self.gap is None else index - self.gap[:, None]  # each row's index in its own sequence
        extra: dict[str, Any] = {}
        if self.cell_table is not None:
            extra.update(slot_cells=self.placement.slot_cells(own).expand(batch, -1), cell_table=self.cell_table)
        if self.key_valid is not None:
            extra["attention_mask"] = self.attention(index, block)
        elif block:
            extra["attention_mask"] = torch.zeros(batch, 1, n, past + n, device=ids.device)
        return self.decoder(
            ids,
            past_key_values=self.cache,
            use_cache=True,
            position_ids=self.placement.position_ids(own).expand(batch, -1),
            scale_ids=scale_ids,
            vocab_slice=self.vocab_slice,
            **extra,
        )

    def attention(self, index: torch.Tensor, block: bool) -> torch.Tensor:
        """Additive [B, 1, n, past + n] mask for queries at cache `index`: causal (or the whole block), never
        a padded key."""
        keys = torch.arange(int(index[-1]) + 1, device=index.device)
        allowed = keys[None, :] <= (index[-1] if block else index)[..., None]  # [n, K] (or [1, K] for a block)
        valid = torch.ones(self.key_valid.shape[0], len(keys), dtype=torch.bool, device=index.device)
        valid[:, : self.key_valid.shape[1]] = self.key_valid
        allowed = allowed[None] & valid[:, None, :]  # [B, n, K]
        mask = torch.zeros(allowed.shape, device=index.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return mask[:, None].expand(-1, -1, len(index), -1)

    def forget(self, unseen: torch.Tensor) -> None:
        """Hide the last n cache entries from the rows where `unseen` [B, n] is True (their rejected drafts)
        from every later query, and move those rows' later positions back by as many."""
        past, n = self.cache.get_seq_length(), unseen.shape[1]
        valid = torch.ones(unseen.shape[0], past, dtype=torch.bool, device=unseen.device)
        if self.key_valid is not None:
            valid[:, : self.key_valid.shape[1]] = self.key_valid
        valid[:, past - n :] &= ~unseen
        self.key_valid = valid
        gap = unseen.sum(1)
        self.gap = gap if self.gap is None else self.gap + gap

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (findings answered "not present", or finished, leave the decode)."""
        self.cache.batch_select_indices(rows)
        self.key_valid = self.key_valid[rows] if self.key_valid is not None else None
        self.gap = self.gap[rows] if self.gap is not None else None
        if isinstance(self.placement.shift, torch.Tensor):
            self.placement = Placement(self.placement.prefix_length, self.placement.shift[rows], self.placement.cells)


class LegalTokens(LogitsProcessor):
    """Sets the logits of every token outside `allowed` to -inf (works on [..., V] scores); a transformers
    `LogitsProcessor`, so the same rule also plugs into `generate()`."""

    def __init__(self, vocab_size: int, allowed: Sequence[int] | range) -> None:
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool)
        self.allowed[list(allowed)] = True

    def __call__(self, input_ids: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        if self.allowed.device != scores.device:
            self.allowed = self.allowed.to(scores.device)
        return scores.masked_fill(~self.allowed, float("-inf"))


@dataclass
class Picker:
    """How a mask code is chosen from the logits of the order's mask codes (`Feed.vocab_slice`, so every
    code it can pick is legal): greedy (the tokenizer's greedy rule, or argmax) or temperature / top-k
    sampling; `beam` > 1 = beam search (raster only). Returns vocabulary ids."""

    mask_slice: slice  # the vocabulary ids of the scores' last dimension
    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = None
    greedy: Callable[[torch.Tensor], torch.Tensor] | None = None
    beam: int = 1
    speculative: bool = True  # greedy raster decoding may let the NkTP heads draft (same output, fewer passes)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores [..., K] of the mask codes -> vocabulary ids [...]."""
        return self.choose(scores) + self.mask_slice.start

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return scores.max(-1).indices if self.greedy is None else self.greedy(scores)  # argmax, faster
        scores = scores.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(-1).reshape(-1, scores.shape[-1])
        return torch.multinomial(probs, 1, generator=self.generator).reshape(scores.shape[:-1])


def raster_tokens(feed: Feed, pick: Picker, logits: torch.Tensor, n_tokens: int) -> Iterator[torch.Tensor]:
    """Plain decoding: choose, feed, repeat. Yields the vocabulary ids so far, [B, n]."""
    tokens = torch.empty(logits.shape[0], n_tokens, dtype=torch.long, device=logits.device)
    for i in range(n_tokens):
        tokens[:, i] = pick(logits)
        yield tokens[:, : i + 1].clone()
        if i + 1 < n_tokens:
            logits = feed(tokens[:, i : i + 1]).logits[:, -1]


def raster_speculative(
    feed: Feed, pick: Picker, logits: torch.Tensor, hidden: torch.Tensor, n_tokens: int
) -> Iterator[torch.Tensor]:
    """Greedy decoding where the NkTP heads draft the next tokens and one forward pass checks them all.

    From the hidden state h that predicts token t (greedy `nxt`), head j drafts token t+j-1. Feeding
    [nxt, d_2, ..., d_k] gives the greedy token after each; drafts are kept while they equal it, and the
    greedy token after the last kept one comes for free. Every kept token is the greedy token, so the
    output is the plain greedy output; only the number of forward passes changes. The drafts are the
    heads' argmax guesses whatever the greedy rule.

    With several rows (findings decoded together) each row keeps its own accepted drafts: the drafts no row
    kept leave the cache, the ones only some rows kept are hidden from the others (`Feed.forget`), and a
    row that is done leaves the batch. Yields the ids [B, n] that every row has so far.
    """
    decoder, mask_slice = feed.decoder, pick.mask_slice
    batch = logits.shape[0]
    tokens = torch.empty(batch, n_tokens, dtype=torch.long, device=logits.device)
    tokens[:, 0] = pick(logits)
    done = torch.ones(batch, dtype=torch.long, device=logits.device)  # tokens each row has
    rows = torch.arange(batch, device=logits.device)[done < n_tokens]  # rows still decoding (indices into tokens)
    yield tokens[:, :1].clone()
    while len(rows):
        # `hidden` [len(rows), H] is the state that predicted each row's last token, which is not in the cache yet
        n_draft = min(decoder.config.nktp_k - 1, int((n_tokens - done[rows]).max()))
        drafts = torch.stack(
            [decoder.nktp_logits(hidden, j, mask_slice).argmax(-1) + mask_slice.start for j in range(2, n_draft + 2)],
            dim=-1,
        )  # [R, n_draft]: guesses for each row's next tokens
        last = tokens[rows, done[rows] - 1]
        out = feed(torch.cat([last[:, None], drafts], 1))
        chosen = pick(out.logits)  # [R, n_draft + 1]: the greedy token after each fed token
        accepted = (drafts == chosen[:, :n_draft]).long().cumprod(-1).sum(-1)  # [R]
        for k, row in enumerate(rows.tolist()):  # the kept drafts (== greedy) and one more
            new = chosen[k, : int(accepted[k]) + 1][: n_tokens - int(done[row])]
            tokens[row, done[row] : done[row] + len(new)] = new
            done[row] += len(new)
        kept = int(accepted.max())
        if kept < n_draft:  # (older transformers read crop(0) as "keep nothing")
            feed.cache.crop(-(n_draft - kept))  # the drafts no row kept
        if len(rows) > 1 and bool((accepted < kept).any()):
            feed.forget(torch.arange(1, kept + 1, device=accepted.device)[None, :] > accepted[:, None])
        hidden = out.hidden_states[torch.arange(len(rows)), accepted]
        going = done[rows] < n_tokens
        if not bool(going.all()):
            feed.select(torch.nonzero(going)[:, 0])
            rows, hidden = rows[going], hidden[going]
        yield tokens[:, : int(done.min())].clone()


def raster_beam_search(
    feed: Feed, pick: Picker, logits: torch.Tensor, n_tokens: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Beam search over the KV cache (all sequences have the same length, so no length penalty).

    Yields (best beam's ids [1, n], beam log-probabilities [beam], best first) after every token.
    """
    beam = pick.beam
    scores = torch.full((beam,), float("-inf"), device=logits.device)
    scores[0] = 0.0  # the beams start identical: expand only one of them
    tokens = torch.empty(beam, 0, dtype=torch.long, device=logits.device)
    for i in range(n_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)  # over the mask codes, the only legal tokens
        top = (scores[:, None] + logp).flatten().topk(beam)
        origin, token = top.indices // logp.shape[-1], top.indices % logp.shape[-1] + pick.mask_slice.start
        scores = top.values
        tokens = torch.cat([tokens[origin], token[:, None]], dim=1)
        yield tokens[:1].clone(), scores.clone()
        if i + 1 < n_tokens:
            feed.cache.reorder_cache(origin)
            logits = feed(token[:, None]).logits[:, -1]
