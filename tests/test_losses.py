"""Each NTP-MRISeg loss against numbers worked out by hand from its formula."""

from __future__ import annotations

import math

import pytest
import torch
from _orders import order_for
from _tiny_decoder import TINY_LAYOUT, tiny_decoder_config

from napari_mris.model.decoder import MRISDecoder
from napari_mris.model.sequence import build_training_sequence, collate
from napari_mris.model.vocab import REJ, SOV, VocabLayout
from napari_mris_train.het_memory import HETMemory, sample_key
from napari_mris_train.losses import (
    LossConfig,
    MaskTargets,
    compute_losses,
    focal_loss,
    het_loss,
    het_select,
    nktp_loss,
    preceding_negatives,
    tcl_loss,
)


def softmax_p(row: list[float], index: int) -> float:
    return math.exp(row[index]) / sum(math.exp(v) for v in row)


def test_focal_matches_formula_per_token():
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
    targets = [0, 1]
    alpha, gamma = 0.75, 2.0
    expected = []
    for row, y in zip(logits, targets, strict=True):
        p = softmax_p(row, y)
        expected.append(-alpha * (1 - p) ** gamma * math.log(p))
    got = focal_loss(torch.tensor(logits), torch.tensor(targets), alpha, gamma)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # gamma = 0 is plain cross-entropy; a confident right token costs far less than a wrong one
    ce = focal_loss(torch.tensor(logits), torch.tensor(targets), 1.0, 0.0)
    assert ce.tolist() == pytest.approx([-math.log(softmax_p(r, y)) for r, y in zip(logits, targets, strict=True)])
    assert got[0] < got[1]


def test_preceding_negatives_are_distinct_and_exclude_the_target():
    targets = torch.tensor([4, 7, 4, 4, 9, 7])
    neg = preceding_negatives(targets, m=3)
    as_sets = [sorted(v for v in row if v >= 0) for row in neg.tolist()]
    assert as_sets == [[], [4], [7], [7], [4, 7], [4, 9]]
    # position 5 (target 7): preceding 4, 4, 9 -> {4, 9}; only one copy of 4 survives
    assert sorted(neg[5].tolist()) == [-1, 4, 9]


def test_tcl_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 1.5, 2.5], [3.0, 1.0, 1.0, 0.0]])
    targets = torch.tensor([1, 2, 0])
    negatives = torch.tensor([[-1, -1], [1, -1], [1, 2]])  # row 0 has none and is skipped
    alpha, gamma = 1.0, 2.0
    expected = []
    for row, y, negs in [(logits[1].tolist(), 2, [1]), (logits[2].tolist(), 0, [1, 2])]:
        p_ct = math.exp(row[y]) / (math.exp(row[y]) + sum(math.exp(row[j]) for j in negs))
        expected.append(-alpha * (1 - p_ct) ** gamma * math.log(p_ct))
    got = tcl_loss(logits, targets, negatives, alpha, gamma)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_tcl_without_negatives_is_zero_and_differentiable():
    logits = torch.randn(2, 5, requires_grad=True)
    loss = tcl_loss(logits, torch.tensor([0, 1]), torch.full((2, 3), -1), 1.0, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_het_select_keeps_extremes_of_z_minus_zy():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0, -1.0, 0.5]])
    targets = torch.tensor([0])
    remembered = torch.tensor([[1, 2, 3, 4, 5, 6, 0, -1]])  # 0 is the target itself: never a negative
    chosen = het_select(logits, targets, remembered, keep=4)
    # ranking of z[j] - z[y] over {1..6}: 1 (5.0), 2, 3, 4, 5, 6 (-1.0) -> keep 1, 2 and 5, 6
    assert sorted(v for v in chosen[0].tolist() if v >= 0) == [1, 2, 5, 6]
    # with l at least the number remembered, all of them are kept
    everything = het_select(logits, targets, remembered, keep=50)[0].tolist()
    assert sorted(v for v in everything if v >= 0) == [1, 2, 3, 4, 5, 6]


def test_het_loss_matches_formula_over_mispredicted_positions():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 4.0]])
    targets = torch.tensor([0, 0, 2])  # rows 0 and 2 are mispredicted (argmax 1 and 3), row 1 is right
    remembered = torch.tensor([[1, 3, -1], [1, 2, 3], [-1, -1, -1]])
    row0 = logits[0].tolist()
    l0 = -math.log(math.exp(row0[0]) / (math.exp(row0[0]) + math.exp(row0[1]) + math.exp(row0[3])))
    l2 = 0.0  # mispredicted but nothing remembered: -log(1)
    got = het_loss(logits, targets, remembered, keep=50)
    assert got.item() == pytest.approx((l0 + l2) / 2, rel=1e-5)


def test_het_memory_bounds_recency_and_round_trip():
    memory = HETMemory(per_key=3, max_keys=2)
    memory.update([(1, 0)] * 5, [10, 11, 12, 10, 13])
    assert memory.lookup([(1, 0)]).tolist() == [[13, 10, 12]]  # most recent first, no duplicates, 3 at most
    memory.update([(2, 0), (3, 5)], [7, 8])
    assert len(memory) == 2 and memory.lookup([(1, 0)]).tolist() == [[-1, -1, -1]]  # oldest key dropped
    restored = HETMemory(per_key=3, max_keys=2)
    restored.load_state_dict(memory.state_dict())
    assert restored.lookup([(2, 0), (3, 5)]).tolist() == [[7, -1, -1], [8, -1, -1]]
    assert list(restored.state_dict()["keys"].tolist()) == [[2, 0], [3, 5]]
    with pytest.raises(ValueError, match="bounds"):
        HETMemory(per_key=4, max_keys=2).load_state_dict(memory.state_dict())


def test_sample_key_is_stable():
    assert sample_key(3, "raster", "upper left lung") == sample_key(3, "raster", "upper left lung")
    assert sample_key(3, "raster", "a") != sample_key(3, "scale", "a")
    assert 0 <= sample_key("x") < 2**63


class StubHeads:
    """A decoder stand-in whose head j maps hidden h to logits h * j (so every number is known)."""

    class config:  # noqa: N801 - mimics DecoderConfig's attribute access
        nktp_k = 3

    def nktp_logits(self, hidden, offset, vocab_slice=None):
        return hidden * offset


def test_nktp_matches_formula_and_masks_past_the_block():
    # one example, raster block of 4 codes at positions 10..13; hidden states are 3-way logit seeds
    hidden = torch.zeros(1, 16, 3)
    seeds = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.5, 0.5, 1.0], [1.0, -1.0, 0.0]]
    hidden[0, 10:14] = torch.tensor(seeds)
    codes = [0, 1, 2, 1]
    targets = MaskTargets(
        order="raster",
        rows=torch.zeros(4, dtype=torch.long),
        positions=torch.arange(10, 14),
        codes=torch.tensor(codes),
        index=torch.arange(4),
        negatives=torch.full((4, 2), -1),
    )
    cfg = LossConfig(focal_alpha=1.0, focal_gamma=2.0)

    def focal(row, y):
        p = softmax_p(row, y)
        return -((1 - p) ** 2) * math.log(p)

    heads = []
    for j in (2, 3):  # head j at block index i predicts codes[i + j - 1]; i + j - 1 >= 4 is past the block
        terms = [focal([v * j for v in seeds[i]], codes[i + j - 1]) for i in range(4) if i + j - 1 < 4]
        heads.append(sum(terms) / len(terms))
    got = nktp_loss(StubHeads(), hidden, targets, (0, 3), cfg)
    assert got.item() == pytest.approx(sum(heads) / 2, rel=1e-5)


def test_compute_losses_restricts_the_softmax_to_legal_tokens():
    layout = VocabLayout(n_text=4, n_image=4, n_mask={"raster": 3})
    start, _ = layout.mask_range("raster")
    vocab = layout.vocab_size
    labels = torch.full((1, 6), -100)
    labels[0, 1] = SOV  # decision
    labels[0, 2:5] = torch.tensor([start + 0, start + 2, start + 2])  # three mask codes
    logits = torch.randn(1, 6, vocab, generator=torch.Generator().manual_seed(0))
    output = type("Out", (), {"logits": logits, "hidden_states": torch.zeros(1, 6, 2)})()
    batch = {"labels": labels, "sample_positions": [torch.tensor([2, 3, 4])]}
    cfg = LossConfig(focal_alpha=1.0, focal_gamma=0.0, tcl=True, tcl_negatives=2, nktp=False, het=False)
    terms = compute_losses(None, output, batch, ["raster"], layout, cfg)
    z = logits[0].tolist()
    decision = -math.log(softmax_p([z[1][SOV], z[1][REJ]], 0))
    masks = [-math.log(softmax_p(z[t][start : start + 3], c)) for t, c in ((2, 0), (3, 2), (4, 2))]
    assert terms["ntp"].item() == pytest.approx((decision + sum(masks)) / 4, rel=1e-5)
    # TCL: position 3 (target 2) has negative {0}; position 4 (target 2) has {0} too (its copy of 2 is dropped)
    tcl = []
    for t in (3, 4):
        row = z[t][start : start + 3]
        p_ct = math.exp(row[2]) / (math.exp(row[2]) + math.exp(row[0]))
        tcl.append(-math.log(p_ct))
    assert terms["tcl"].item() == pytest.approx(sum(tcl) / 2, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["ntp"].item() + 0.5 * terms["tcl"].item(), rel=1e-6)


def test_decision_weight_zero_leaves_the_decision_out_of_the_loss():
    """finetune's default: the [SOV]/[REJ] token adds nothing, and a batch of decisions alone gives a finite 0."""
    layout = VocabLayout(n_text=4, n_image=4, n_mask={"raster": 3})
    start, _ = layout.mask_range("raster")
    logits = torch.randn(1, 6, layout.vocab_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    output = type("Out", (), {"logits": logits, "hidden_states": torch.zeros(1, 6, 2)})()
    cfg = LossConfig(focal_alpha=1.0, focal_gamma=0.0, tcl=False, nktp=False, het=False, decision_weight=0.0)
    labels = torch.full((1, 6), -100)
    labels[0, 1] = SOV
    labels[0, 2:5] = torch.tensor([start + 0, start + 2, start + 1])
    batch = {"labels": labels, "sample_positions": [torch.tensor([2, 3, 4])]}
    terms = compute_losses(None, output, batch, ["raster"], layout, cfg)
    z = logits[0].tolist()
    masks = [-math.log(softmax_p(z[t][start : start + 3], c)) for t, c in ((2, 0), (3, 2), (4, 1))]
    assert terms["ntp"].item() == pytest.approx(sum(masks) / 3, rel=1e-5)
    terms["loss"].backward()
    assert logits.grad[0, 1].abs().sum().item() == 0.0  # no gradient reaches the decision position

    only_decision = torch.full((1, 6), -100)
    only_decision[0, 1] = REJ
    batch = {"labels": only_decision, "sample_positions": [torch.tensor([], dtype=torch.long)]}
    terms = compute_losses(None, output, batch, ["raster"], layout, cfg)
    assert torch.isfinite(terms["loss"]) and terms["loss"].item() == 0.0


def test_losses_from_hidden_states_equal_losses_from_full_logits():
    """Training skips the full logits (compute_logits=False): every term and gradient must be unchanged."""
    torch.manual_seed(0)
    decoder = MRISDecoder(tiny_decoder_config(nktp_k=3)).eval()
    seqs = [
        build_training_sequence(
            order_for(TINY_LAYOUT, "raster", (2,)), torch.arange(4), [3, 4, 5], 2, [torch.tensor([1, 0, 5, 2])]
        ),
        build_training_sequence(
            order_for(TINY_LAYOUT, "scale", (1, 2)),
            torch.arange(4),
            [6],
            2,
            [torch.tensor([2]), torch.tensor([0, 1, 2, 3])],
        ),
    ]
    batch = collate(seqs)
    cfg = LossConfig(tcl=True, tcl_negatives=2, nktp=True, het=False)

    def terms_and_grad(compute_logits: bool):
        decoder.zero_grad()
        out = decoder(batch["input_ids"], batch["scale_ids"], batch["attention_mask"], compute_logits=compute_logits)
        assert (out.logits is None) != compute_logits
        terms = compute_losses(decoder, out, batch, ["raster", "scale"], TINY_LAYOUT, cfg)
        terms["loss"].backward()
        return {k: v.item() for k, v in terms.items()}, decoder.lm_head.weight.grad.clone()

    full, grad_full = terms_and_grad(True)
    sliced, grad_sliced = terms_and_grad(False)
    assert sliced == pytest.approx(full, rel=1e-5) and full["loss"] > 0
    torch.testing.assert_close(grad_sliced, grad_full)
