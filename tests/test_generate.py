"""Decoding: legal tokens only, greedy determinism, [REJ], samples, beam search, speculative == greedy, and
agreement between the cached decoding path and the training layout (teacher forcing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _orders import legal_codes, order_for
from _tiny_decoder import TINY_LAYOUT, one_torch_thread, tiny_decoder_config  # noqa: F401

from napari_mris.model.decoder import DecoderConfig, MRISDecoder
from napari_mris.model.generate import (
    autoregressive_infer,
    image_block_length,
    infer_findings,
    prefill_image,
    presence_probabilities,
)
from napari_mris.model.orders import Feed, Picker, raster_beam_search, raster_tokens
from napari_mris.model.sequence import build_training_sequence, collate, prefix_ids
from napari_mris.model.vocab import REJ, SOV, VocabLayout

LAYOUT = TINY_LAYOUT
pytestmark = pytest.mark.usefixtures("one_torch_thread")
RASTER = (4,)
SCALES = (1, 2, 4)
IMAGE = torch.tensor([1, 5, 2, 7])
TEXT = [3, 9, 4]


def tiny_decoder(seed: int = 0, nktp_k: int = 4) -> MRISDecoder:
    torch.manual_seed(seed)
    config = tiny_decoder_config(nktp_k=nktp_k, n_scales=len(SCALES))
    decoder = MRISDecoder(config).eval()
    with torch.no_grad():  # a livelier random model than the 0.02 init: more varied greedy sequences
        decoder.llama.lm_head.weight.normal_(std=1.0)
    return decoder


def force_decision(decoder: MRISDecoder, token: int) -> None:
    """Point the lm_head rows of [SOV]/[REJ] along (or against) the decision hidden state, so `token` wins."""
    with torch.no_grad():
        hidden = decoder(PREFIX[None]).hidden_states[0, -1]
        other = REJ if token == SOV else SOV
        decoder.llama.lm_head.weight[token] = hidden
        decoder.llama.lm_head.weight[other] = -hidden


PREFIX = prefix_ids(LAYOUT, IMAGE, TEXT, 2)


def final(decoder, order, scales=None, **kwargs):
    steps = list(
        autoregressive_infer(
            decoder, order_for(LAYOUT, order, scales or (RASTER if order == "raster" else SCALES)), PREFIX, **kwargs
        )
    )
    assert steps[-1].finished and all(not s.finished for s in steps[:-1])
    return steps


@pytest.fixture(scope="module")
def decoder() -> MRISDecoder:
    model = tiny_decoder()
    force_decision(model, SOV)
    return model


def test_raster_streams_rows_and_only_legal_codes(decoder):
    saved = decoder.llama.lm_head.weight.detach().clone()
    scale_start, scale_stop = LAYOUT.mask_range("scale")
    with torch.no_grad():  # make illegal tokens (text, the other order's codes) far more likely than legal ones
        decoder.llama.lm_head.weight[LAYOUT.text_start : LAYOUT.image_start] *= 50
        decoder.llama.lm_head.weight[scale_start:scale_stop] *= 50
        out, _ = _decode_start(decoder)
        premise = decoder.unembed(out.hidden_states[0, -1]).argmax()  # over the whole vocabulary
        assert LAYOUT.token_name(int(premise)).startswith(("text", "scale"))
    try:
        for kwargs in ({}, {"speculative": False}, {"temperature": 1.5, "samples": 3}, {"beam": 3}):
            steps = final(decoder, "raster", **kwargs)
            assert [s.tokens_done for s in steps] == [4, 8, 12, 16]  # one grid row per update
            codes = steps[-1].codes
            assert codes.shape == (kwargs.get("samples", 1), 16)
            assert codes.min() >= 0 and codes.max() < 6 and not steps[-1].rejected
        scale_steps = final(decoder, "scale")
        assert [s.tokens_done for s in scale_steps] == [1, 5, 21]
        assert [c.shape for c in scale_steps[-1].codes] == [(1, 1), (1, 4), (1, 16)]
        assert all(int(c.max()) < 6 and int(c.min()) >= 0 for c in scale_steps[-1].codes)
        assert [s.tokens_done for s in final(decoder, "raster", update_every=5)] == [5, 10, 15, 16]
    finally:
        with torch.no_grad():
            decoder.llama.lm_head.weight.copy_(saved)


def test_greedy_is_deterministic_and_sampling_is_seeded(decoder):
    for order in ("raster", "scale"):
        first, second = final(decoder, order)[-1], final(decoder, order)[-1]
        assert torch.equal(_flat(first), _flat(second))
        a = final(decoder, order, temperature=1.0, samples=4, generator=torch.Generator().manual_seed(3))[-1]
        b = final(decoder, order, temperature=1.0, samples=4, generator=torch.Generator().manual_seed(3))[-1]
        c = final(decoder, order, temperature=1.0, samples=4, generator=torch.Generator().manual_seed(4))[-1]
        assert torch.equal(_flat(a), _flat(b))
        assert _flat(a).shape[0] == 4 and not torch.equal(_flat(a), _flat(c))


def _flat(step) -> torch.Tensor:
    return torch.cat(step.codes, dim=1) if isinstance(step.codes, list) else step.codes


def test_rejection_path():
    model = tiny_decoder(seed=1)
    force_decision(model, REJ)
    for order, scales in (("raster", RASTER), ("scale", SCALES)):
        steps = list(autoregressive_infer(model, order_for(LAYOUT, order, scales), PREFIX, samples=3, temperature=1.0))
        assert len(steps) == 1
        assert steps[0].rejected and steps[0].finished and steps[0].tokens_done == 0
        assert steps[0].reject_probability > 0.5


def test_cached_decoding_agrees_with_the_training_layout(decoder):
    """Teacher-forcing the greedy result through the training sequence reproduces it token for token."""
    for order, scales in (("raster", RASTER), ("scale", SCALES)):
        codes = final(decoder, order, scales)[-1].codes
        codes = [codes[0]] if order == "raster" else [c[0] for c in codes]
        seq = build_training_sequence(order_for(LAYOUT, order, scales), IMAGE, TEXT, 2, codes)
        batch = collate([seq])
        with torch.no_grad():
            logits = decoder(batch["input_ids"], batch["scale_ids"], batch["attention_mask"]).logits[0]
        legal = legal_codes(LAYOUT, order)
        predicted = legal(None, logits[seq.mask_positions]).argmax(-1)
        assert torch.equal(predicted, seq.labels[seq.mask_positions]), order


def test_speculative_decoding_equals_greedy():
    for seed, head_std in ((0, 0.0), (1, 0.5), (2, 3.0)):
        model = tiny_decoder(seed=seed, nktp_k=5)
        force_decision(model, SOV)
        with torch.no_grad():
            for head in model.nktp_heads:
                head.linear.weight.normal_(std=head_std)
        calls = _count_forward_calls(model)
        greedy = final(model, "raster", speculative=False)[-1].codes
        plain_calls = calls.pop()
        fast = final(model, "raster", speculative=True)[-1].codes
        fast_calls = calls.pop()
        assert torch.equal(fast, greedy), f"seed {seed}"
        assert plain_calls == 3 + 15  # image block, text, header, then one pass per token after the first
        assert fast_calls <= plain_calls


@pytest.mark.parametrize("correct", [0, 2, 4])
def test_speculative_accepts_exactly_the_right_drafts(correct):
    """Heads that draft the true greedy tokens for the first `correct` offsets and a wrong one after."""
    model = tiny_decoder(seed=3, nktp_k=5)
    force_decision(model, SOV)
    calls = _count_forward_calls(model)
    truth = final(model, "raster", speculative=False)[-1].codes[0]
    calls.pop()
    state = {"done": 1, "drafts": None}

    def oracle(hidden, offset, vocab_slice=None):
        if offset == 2 and state["drafts"] is not None:  # a new round: the last one kept its drafts + 1
            state["done"] += min(correct, state["drafts"]) + 1
        state["drafts"] = offset - 1
        code = int(truth[state["done"] + offset - 2])
        if offset - 2 >= correct:
            code = (code + 1) % 6
        return F.one_hot(torch.tensor([code]), 6).float()

    model.nktp_logits = oracle
    fast = final(model, "raster", speculative=True)[-1].codes[0]
    assert torch.equal(fast, truth)
    done, passes = 1, 0
    while done < 16:
        n_draft = min(4, 16 - done)
        passes += 1
        done += min(min(correct, n_draft) + 1, 16 - done)
    assert calls.pop() == 3 + passes
    assert passes == {0: 15, 2: 5, 4: 3}[correct]


def _count_forward_calls(model: MRISDecoder) -> list[int]:
    """Record how many forward passes each decode run makes (one entry per finished run)."""
    counts: list[int] = []
    original = model.forward

    def counting(*args, **kwargs):
        if kwargs.get("past_key_values") is None:  # the image block's pass starts a run
            counts.append(0)
        counts[-1] += 1
        return original(*args, **kwargs)

    model.forward = counting
    return counts


def _decode_start(model):
    """The feed (cache after the header) and the header's output, as autoregressive_infer has them."""
    order = order_for(LAYOUT, "raster", (4,))
    cache = model(PREFIX[None], use_cache=True).past_key_values
    feed = Feed(model, cache, order.placement(len(PREFIX), 0, 0), None, vocab_slice=order.mask_slice)
    return feed(torch.tensor([order.header()])), feed


def _sequence_logprob(model, ids: torch.Tensor) -> float:
    """log p(ids) under the model, restricted to the legal codes, without a cache."""
    full = torch.cat([PREFIX, torch.tensor(order_for(LAYOUT, "raster", (4,)).header()), ids])[None]
    logits = legal_codes(LAYOUT, "raster")(None, model(full).logits[0, -len(ids) - 1 : -1])
    return float(F.log_softmax(logits, -1).gather(-1, ids[:, None]).sum())


def test_decode_logits_cover_the_mask_codes_only_and_match_the_whole_head(decoder):
    """The decode loop projects onto the order's mask codes only (`Feed.vocab_slice`): the same numbers as
    the whole head's logits at those ids, also when an adapter wraps the head."""
    with torch.no_grad():
        out, feed = _decode_start(decoder)
        whole = decoder.unembed(out.hidden_states)
        assert out.logits.shape[-1] == feed.vocab_slice.stop - feed.vocab_slice.start
        torch.testing.assert_close(out.logits, whole[..., feed.vocab_slice], rtol=1e-5, atol=1e-5)
        ids = torch.tensor([3, 7, feed.vocab_slice.start])
        torch.testing.assert_close(decoder.unembed(out.hidden_states, ids), whole[..., ids], rtol=1e-5, atol=1e-5)

        class Wrapped(torch.nn.Module):  # stands for a peft LoRA layer: not an nn.Linear, its own forward
            def __init__(self, head):
                super().__init__()
                self.head = head

            def forward(self, x):
                return self.head(x) + 1.0

        head = decoder.llama.lm_head
        decoder.llama.lm_head = Wrapped(head)
        try:
            sliced = decoder.unembed(out.hidden_states, feed.vocab_slice)
        finally:
            decoder.llama.lm_head = head
        torch.testing.assert_close(sliced, whole[..., feed.vocab_slice] + 1.0, rtol=1e-5, atol=1e-5)
        handle = head.register_forward_hook(lambda module, inputs, output: output + 2.0)  # a hook is honoured
        try:
            sliced = decoder.unembed(out.hidden_states, feed.vocab_slice)
        finally:
            handle.remove()
        torch.testing.assert_close(sliced, whole[..., feed.vocab_slice] + 2.0, rtol=1e-5, atol=1e-5)


def test_forgotten_entries_are_as_if_never_fed(decoder):
    """`Feed.forget`: a row that hides its last drafts continues exactly like a row that never fed them (the
    same positions after them, nothing seen of them), while the other row of the batch still sees its own."""
    start = LAYOUT.mask_range("raster")[0]
    ids = torch.tensor([[start + 1, start + 2, start + 3], [start + 4, start + 5, start + 0]])
    with torch.no_grad():
        _, feed = _decode_start(decoder)
        feed.cache.batch_repeat_interleave(2)
        feed(ids)
        feed.forget(torch.tensor([[False, True], [False, False]]))  # row 0 keeps only its first two tokens
        after = feed(torch.tensor([[start + 5], [start + 5]])).logits
        for row, kept in ((0, 2), (1, 3)):
            _, alone = _decode_start(decoder)
            alone(ids[row : row + 1, :kept])
            expected = alone(torch.tensor([[start + 5]])).logits
            torch.testing.assert_close(after[row : row + 1], expected, rtol=1e-4, atol=1e-5)


def test_beam_search(decoder):
    codes = order_for(LAYOUT, "raster", (4,)).mask_slice
    with torch.no_grad():
        out, feed = _decode_start(decoder)
        greedy = list(raster_tokens(feed, Picker(codes), out.logits[:, -1], 5))[-1]
        out, feed = _decode_start(decoder)
        width_one = list(raster_beam_search(feed, Picker(codes, beam=1), out.logits[:, -1], 5))[-1][0]
        assert torch.equal(width_one, greedy)

        # two tokens, six codes: a beam of 6 keeps every first token, so it finds the exact best pair
        out, feed = _decode_start(decoder)
        best, scores = list(raster_beam_search(feed, Picker(codes, beam=6), out.logits[:, -1], 2))[-1]
        start = LAYOUT.mask_range("raster")[0]
        pairs = torch.cartesian_prod(torch.arange(6), torch.arange(6)) + start
        exact = max(pairs, key=lambda p: _sequence_logprob(decoder, p))
        assert torch.equal(best[0], exact)

        # the reported score of the best beam of a longer search is its true log-probability (cache reordering)
        out, feed = _decode_start(decoder)
        best, scores = list(raster_beam_search(feed, Picker(codes, beam=4), out.logits[:, -1], 6))[-1]
        assert scores[0] == pytest.approx(_sequence_logprob(decoder, best[0]), abs=1e-4)
        assert scores[0] >= scores[1:].max()


def test_decoding_runs_in_eval_mode_and_restores_the_callers_mode(decoder):
    decoder.train()
    try:
        stream = autoregressive_infer(decoder, order_for(LAYOUT, "raster", RASTER), PREFIX)
        next(stream)
        assert not decoder.training  # no dropout while decoding
        stream.close()  # the user pressed Stop
        assert decoder.training
    finally:
        decoder.eval()


def test_invalid_arguments_are_refused(decoder):
    def run(order="raster", scales=RASTER, **kwargs):
        return list(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), PREFIX, **kwargs))

    with pytest.raises(ValueError, match="beam search is for raster order"):
        run("scale", SCALES, beam=2)
    with pytest.raises(ValueError, match="deterministic"):
        run(beam=2, temperature=1.0)
    with pytest.raises(ValueError, match="wider than the 6 mask codes"):
        run(beam=7)
    with pytest.raises(ValueError, match="single-scale"):
        run(scales=(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        run(temperature=-1)
    with pytest.raises(ValueError, match="more than the decoder's 128"):
        run(scales=(12,))
    with pytest.raises(ValueError, match="prefix ids must lie in"):
        list(autoregressive_infer(decoder, order_for(LAYOUT, "raster", RASTER), PREFIX + 1000))
    only_raster = VocabLayout(n_text=12, n_image=8, n_mask={"raster": 6})
    with pytest.raises(ValueError, match="ids but the vocabulary"):
        list(autoregressive_infer(decoder, order_for(only_raster, "raster", RASTER), PREFIX))


def test_expected_patch_decides_on_pixels_not_on_the_single_likeliest_code() -> None:
    from napari_mris.tokenizers.patch import ExpectedPatch

    patches = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    choose = ExpectedPatch(patches)
    scores = torch.empty(2, 4)
    # "empty" is the likeliest single code, but 60 % of the mass says "lesion": expected patch [.6 .6 .6 .3]
    scores[0] = torch.tensor([0.4, 0.3, 0.3, 0.0]).log()
    scores[1] = torch.tensor([0.9, 0.0, 0.05, 0.05]).log()  # clearly empty stays empty
    assert scores[0].argmax().item() == 0
    assert choose(scores).tolist() == [2, 0]  # the code nearest the expected patch


@pytest.mark.parametrize("speculative", [True, False])
def test_cached_decoding_with_fixed_text_positions_agrees_with_the_training_layout(speculative):
    """With text_slots the decoding path shifts the RoPE positions after the text exactly as training does."""
    torch.manual_seed(0)
    config = DecoderConfig(**{**tiny_decoder().config.to_dict(), "text_slots": 8})
    decoder = MRISDecoder(config).eval()
    with torch.no_grad():
        decoder.llama.lm_head.weight.normal_(std=1.0)
        for head in decoder.nktp_heads:  # heads that guess differently from lm_head: some drafts rejected
            head.linear.weight.normal_(std=0.5)
    force_decision(decoder, SOV)
    for order, scales in (("raster", RASTER), ("scale", SCALES)):
        steps = list(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), PREFIX, speculative=speculative))
        codes = steps[-1].codes
        codes = [codes[0]] if order == "raster" else [c[0] for c in codes]
        seq = build_training_sequence(order_for(LAYOUT, order, scales), IMAGE, TEXT, 2, codes, text_slots=8)
        batch = collate([seq])
        with torch.no_grad():
            shifted = decoder(
                batch["input_ids"], batch["scale_ids"], batch["attention_mask"], position_ids=batch["position_ids"]
            ).logits[0]
            plain = decoder(batch["input_ids"], batch["scale_ids"], batch["attention_mask"]).logits[0]
        legal = legal_codes(LAYOUT, order)
        predicted = legal(None, shifted[seq.mask_positions]).argmax(-1)
        assert torch.equal(predicted, seq.labels[seq.mask_positions]), order
        assert not torch.allclose(shifted[seq.mask_positions], plain[seq.mask_positions])  # the shift matters


def test_decoding_uses_the_current_cache_api_without_deprecation_warnings(decoder):
    """Every decoding path passes the KV cache under the name the installed transformers expects, so no
    `past_key_values is deprecated` FutureWarning is printed by every `napari-mris predict` run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        final(decoder, "raster")
        seeded = torch.Generator().manual_seed(0)
        final(decoder, "raster", speculative=False, samples=2, temperature=1.0, generator=seeded)
        final(decoder, "raster", beam=2)
        final(decoder, "scale")


@pytest.mark.parametrize("order", ["raster", "scale"])
def test_a_shared_image_prefill_gives_each_text_its_own_answer(decoder, order):
    """Two texts decoded on one prefill of their image block, in turn, equal two separate runs; the texts get
    different decisions, so a cache that kept the first text (not copied) would show."""
    scales = RASTER if order == "raster" else SCALES
    other = prefix_ids(LAYOUT, IMAGE, [8, 2, 2, 6, 1], 2)
    image = prefill_image(decoder, PREFIX[: image_block_length(PREFIX)])
    length = image.cache.get_seq_length()
    shared = [
        _outcome(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), p, image=image))
        for p in (PREFIX, other, PREFIX)
    ]
    assert image.cache.get_seq_length() == length  # decoding worked on copies
    separate = [_outcome(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), p)) for p in (PREFIX, other)]
    assert shared[:2] == separate and shared[2] == shared[0]
    assert shared[0][1] != shared[1][1]  # p([REJ]) differs: the texts are told apart
    with pytest.raises(ValueError, match="image block"):
        next(
            autoregressive_infer(
                decoder, order_for(LAYOUT, order, scales), prefix_ids(LAYOUT, IMAGE.flip(0), TEXT, 2), image=image
            )
        )


def _outcome(steps) -> tuple[bool, float, list[list[int]]]:
    """A run's answer, its p([REJ]) and its final codes, comparable with ==."""
    last = list(steps)[-1]
    codes = last.codes if isinstance(last.codes, list) else [last.codes]
    return last.rejected, last.reject_probability, [c.tolist() for c in codes]


@pytest.mark.parametrize("text_slots", [0, 8])
@pytest.mark.parametrize("order", ["raster", "scale"])
def test_findings_decoded_together_equal_each_decoded_alone(order, text_slots, monkeypatch):
    """One batch row per finding: texts of different lengths (left-padded, the padding masked), some answered
    "not present" (they leave the batch), the rest drawn with the positions each has alone; in raster order
    each row keeps its own accepted drafts (the others' hidden from it) and leaves the batch when done."""
    torch.manual_seed(0)
    decoder = MRISDecoder(DecoderConfig(**{**tiny_decoder().config.to_dict(), "text_slots": text_slots})).eval()
    with torch.no_grad():
        decoder.llama.lm_head.weight.normal_(std=1.0)
        for head in decoder.nktp_heads:  # drafts that some rows keep and others reject
            head.linear.weight.normal_(std=0.5)
    hidden = []
    forget = Feed.forget
    monkeypatch.setattr(Feed, "forget", lambda feed, unseen: (hidden.append(int(unseen.sum())), forget(feed, unseen)))
    scales = RASTER if order == "raster" else SCALES
    texts = [[3, 9, 4], [8, 2, 2, 6, 1], [5], [9, 3, 8], [2, 6], [9, 9, 9, 4, 4, 1]]
    prefixes = [prefix_ids(LAYOUT, IMAGE, text, 2) for text in texts]
    alone = [_outcome(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), p)) for p in prefixes]
    assert {rejected for rejected, _, _ in alone} == {True, False}  # both answers occur among the findings

    image = prefill_image(decoder, PREFIX[: image_block_length(PREFIX)])
    steps = list(
        infer_findings(decoder, order_for(LAYOUT, order, scales), image, [p[len(image.ids) :] for p in prefixes])
    )
    together = [_outcome([step]) for step in steps[-1]]
    assert all(step.finished for step in steps[-1])
    for (rej_a, p_a, codes_a), (rej_b, p_b, codes_b) in zip(alone, together, strict=True):
        assert rej_a == rej_b and p_a == pytest.approx(p_b, abs=1e-5) and codes_a == codes_b
    assert (sum(hidden) > 0) == (order == "raster")  # the premise: rows kept different drafts


@pytest.mark.parametrize("order", ["raster", "scale"])
def test_a_decision_taken_elsewhere_replaces_the_decoders_own(order):
    """`presence_probabilities` reads each finding's p([REJ]) as decoding would, drawing nothing; `decided`
    (an adapter's base model's p([REJ]), pipeline.MRISPipeline) overrides the decoder's own decision both
    ways, alone and together, and the mask drawn is still the decoder's own."""
    scales = RASTER if order == "raster" else SCALES
    model = tiny_decoder(seed=1)
    force_decision(model, REJ)  # on its own this decoder answers "not present"
    decoding = order_for(LAYOUT, order, scales)
    start = image_block_length(PREFIX)
    texts = [PREFIX[start:], prefix_ids(LAYOUT, IMAGE, [8, 2, 2], 2)[start:]]
    image = prefill_image(model, PREFIX[:start])
    own = [_outcome([step]) for step in next(infer_findings(model, decoding, image, texts))]
    assert presence_probabilities(model, decoding, image, texts) == pytest.approx([p for _, p, _ in own], abs=1e-6)
    assert own[0][0]  # rejected by its own decision

    drawn = _outcome(autoregressive_infer(model, decoding, PREFIX, image=image, decided=0.1))
    assert not drawn[0] and drawn[1] == pytest.approx(0.1)
    reference = tiny_decoder(seed=1)  # the same weights with the decision pointed at [SOV]: the same mask
    force_decision(reference, SOV)
    assert drawn[2] == _outcome(autoregressive_infer(reference, decoding, PREFIX))[2]
    together = list(infer_findings(model, decoding, image, texts, decided=[0.1, 0.9]))[-1]
    assert [step.rejected for step in together] == [False, True]
    assert _outcome([together[0]])[2] == drawn[2] and together[1].reject_probability == pytest.approx(0.9)
    refused = list(autoregressive_infer(reference, decoding, PREFIX, decided=0.9))
    assert len(refused) == 1 and refused[0].rejected
