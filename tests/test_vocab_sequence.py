"""Vocabulary layout and the unified token sequence (both orders, the [REJ] form, labels, attention mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _orders import order_for

from napari_mris.errors import PromptError
from napari_mris.model.orders import IGNORE
from napari_mris.model.sequence import build_training_sequence, collate, prefix_ids
from napari_mris.model.vocab import BOS, EOS, EOV, PAD, RASTER, REJ, SCALE, SOT, SOV, VocabLayout

LAYOUT = VocabLayout(n_text=10, n_image=6, n_mask={"scale": 5, "raster": 4})
IMAGE = torch.tensor([0, 1, 2, 3])  # a 2x2 image grid
TEXT = [7, 8]


def names(ids: torch.Tensor) -> list[str]:
    return [LAYOUT.token_name(int(i)) for i in ids]


def test_layout_ranges_are_contiguous_in_the_documented_order():
    assert tuple(range(9)) == (PAD, BOS, EOS, SOV, SOT, EOV, REJ, RASTER, SCALE)
    assert LAYOUT.grid_token(1) == 9 and LAYOUT.grid_token(64) == 72
    assert LAYOUT.text_start == 73 and LAYOUT.image_start == 83
    # raster codes come before scale codes whatever order the dict was given in
    assert LAYOUT.mask_range("raster") == (89, 93)
    assert LAYOUT.mask_range("scale") == (93, 98)
    assert LAYOUT.vocab_size == 98
    assert LAYOUT.order_token("raster") == RASTER and LAYOUT.order_token("scale") == SCALE


def test_layout_with_one_order_and_round_trip():
    only_raster = VocabLayout(n_text=10, n_image=6, n_mask={"raster": 4})
    assert only_raster.vocab_size == 93
    with pytest.raises(ValueError, match="'scale' is not in this model"):
        only_raster.mask_range("scale")
    assert VocabLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    bad = {**LAYOUT.to_dict(), "vocab_size": 97}
    with pytest.raises(ValueError, match="vocab_size 97"):
        VocabLayout.from_dict(bad)
    with pytest.raises(ValueError, match="unknown decoding orders"):
        VocabLayout(n_text=1, n_image=1, n_mask={"zigzag": 3})


def test_code_conversions_check_their_ranges():
    ids = LAYOUT.mask_ids("scale", torch.tensor([0, 4]))
    assert ids.tolist() == [93, 97]
    assert LAYOUT.mask_codes("scale", ids).tolist() == [0, 4]
    with pytest.raises(ValueError, match="scale mask codes out of range: expected 0..4"):
        LAYOUT.mask_ids("scale", torch.tensor([5]))
    with pytest.raises(ValueError, match="raster mask token ids must lie in 89..92"):
        LAYOUT.mask_codes("raster", torch.tensor([93]))
    with pytest.raises(ValueError, match="image codes out of range"):
        LAYOUT.image_ids([6])
    with pytest.raises(ValueError, match="grid size"):
        LAYOUT.grid_token(65)


def test_prefix_and_header():
    prefix = prefix_ids(LAYOUT, IMAGE, TEXT, 2)
    assert names(prefix) == [
        "[BOS]", "[SOV]", "[G2]", "[G2]", "[SOT]", "img:0", "img:1", "img:2", "img:3", "[EOV]", "text:7", "text:8",
    ]  # fmt: skip
    grid = LAYOUT.grid_token(4)
    assert order_for(LAYOUT, "scale", (1, 2, 4)).header() == [SOV, SCALE, grid, grid, SOT]
    with pytest.raises(ValueError, match="4 codes for a 3x3 grid"):
        prefix_ids(LAYOUT, IMAGE, TEXT, 3)
    with pytest.raises(PromptError):
        prefix_ids(LAYOUT, IMAGE, [], 2)


def test_raster_sequence_and_labels():
    mask = torch.tensor([3, 0, 1, 2])
    seq = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, TEXT, 2, [mask])
    assert names(seq.input_ids)[12:] == [
        "[SOV]", "[RASTER]", "[G2]", "[G2]", "[SOT]", "raster:3", "raster:0", "raster:1", "raster:2", "[EOV]", "[EOS]",
    ]  # fmt: skip
    expected = torch.full_like(seq.input_ids, IGNORE)
    expected[11] = SOV  # the last text token decides present/absent
    expected[16:20] = LAYOUT.mask_ids("raster", mask)  # [SOT] predicts code 0, code i predicts code i+1
    expected[20] = EOV
    assert torch.equal(seq.labels, expected)
    assert seq.mask_positions.tolist() == [16, 17, 18, 19]
    assert torch.equal(seq.block_ids, torch.arange(len(seq)))  # plain causal
    assert not seq.scale_ids.any()


def test_rejection_sequence():
    seq = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, TEXT, 2, None)
    assert names(seq.input_ids)[-3:] == ["text:8", "[REJ]", "[EOS]"]
    assert (seq.labels != IGNORE).nonzero().flatten().tolist() == [11]
    assert int(seq.labels[11]) == REJ
    assert seq.mask_positions.numel() == 0


def test_next_scale_sequence_slots_labels_and_blocks():
    codes = [torch.tensor([4]), torch.tensor([0, 1, 2, 3]), torch.arange(16) % 5]
    seq = build_training_sequence(order_for(LAYOUT, "scale", (1, 2, 4)), IMAGE, TEXT, 2, codes)
    sot = 16
    assert names(seq.input_ids)[12:17] == ["[SOV]", "[SCALE]", "[G4]", "[G4]", "[SOT]"]
    # scale-2 slots hold scale 1's code upsampled; scale-3 slots hold scale 2's codes upsampled 2x
    assert names(seq.input_ids[17:21]) == ["scale:4"] * 4
    assert LAYOUT.mask_codes("scale", seq.input_ids[21:37]).reshape(4, 4).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3],
    ]  # fmt: skip
    assert len(seq) == 37  # no [EOV]/[EOS] after the last scale
    assert int(seq.labels[sot]) == LAYOUT.mask_ids("scale", [4])[0]
    assert torch.equal(seq.labels[17:21], LAYOUT.mask_ids("scale", codes[1]))
    assert torch.equal(seq.labels[21:37], LAYOUT.mask_ids("scale", codes[2]))
    assert int(seq.labels[11]) == SOV and (seq.labels[:11] == IGNORE).all() and (seq.labels[12:sot] == IGNORE).all()
    assert seq.scale_ids[17:21].tolist() == [2] * 4 and seq.scale_ids[21:].tolist() == [3] * 16
    assert not seq.scale_ids[:17].any()
    assert seq.block_ids[17:21].tolist() == [17] * 4 and seq.block_ids[21:].tolist() == [21] * 16
    assert seq.mask_positions.tolist() == list(range(sot, 37))


def test_scale_slots_match_torch_nearest_interpolation():
    order = order_for(LAYOUT, "scale", (1, 3, 8))
    prev = torch.randint(0, 5, (2, 9))
    ours = LAYOUT.mask_codes("scale", order.slots(prev, 2))
    ref = F.interpolate(prev.reshape(2, 1, 3, 3).float(), size=(8, 8), mode="nearest").long().reshape(2, 64)
    assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match=r"must be \[B, 9\]"):
        order.slots(prev[:, :4], 2)


@pytest.mark.parametrize(
    ("order", "codes", "scales", "message"),
    [
        ("raster", [torch.zeros(3, dtype=torch.long)], (2,), "3 codes for a 2x2 scale"),
        ("raster", [torch.full((4,), 4)], (2,), "raster mask codes out of range"),
        ("scale", [torch.zeros(1), torch.zeros(4)], (1, 2, 4), "2 code grids for 3 scales"),
        ("scale", [torch.zeros(4), torch.zeros(16)], (2, 4), "must start at a 1x1 scale"),
        ("raster", [torch.zeros(4), torch.zeros(4)], (2, 2), "single-scale"),
    ],
)
def test_bad_mask_codes_are_refused(order, codes, scales, message):
    codes = [c.long() for c in codes]
    with pytest.raises(ValueError, match=message):
        build_training_sequence(order_for(LAYOUT, order, scales), IMAGE, TEXT, 2, codes)


def test_collate_pads_and_builds_the_block_causal_mask():
    scale_seq = build_training_sequence(
        order_for(LAYOUT, "scale", (1, 2)), IMAGE, TEXT, 2, [torch.tensor([1]), torch.tensor([0, 1, 2, 3])]
    )
    rej_seq = build_training_sequence(order_for(LAYOUT, "scale", (1, 2)), IMAGE, TEXT, 2, None)
    batch = collate([scale_seq, rej_seq])
    length = len(scale_seq)
    assert length == 21 and len(rej_seq) == 14
    assert batch["input_ids"].shape == (2, length) and batch["attention_mask"].shape == (2, 1, length, length)
    assert (batch["input_ids"][1, 14:] == PAD).all() and (batch["labels"][1, 14:] == IGNORE).all()
    assert [p.tolist() for p in batch["sample_positions"]] == [list(range(16, 21)), []]

    allowed = batch["attention_mask"][:, 0] == 0
    blocked = batch["attention_mask"][:, 0] == torch.finfo(torch.float32).min
    assert (allowed | blocked).all()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    # the prefix, header and scale 1 are causal; the four scale-2 slots (17..20) see each other
    expected = causal.clone()
    expected[17:21, 17:21] = True
    assert torch.equal(allowed[0], expected)
    # padding keys are never seen by real tokens; every row keeps at least one visible key (no NaN)
    assert not allowed[1, :14, 14:].any()
    assert torch.equal(allowed[1, :14, :14], causal[:14, :14])
    assert allowed.any(dim=-1).all()


def test_text_slots_put_the_mask_at_the_same_positions_for_any_prompt_length():
    mask = torch.tensor([1, 0, 2, 3])
    short = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, [3], 2, [mask], text_slots=6)
    long = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, [3, 4, 5, 6], 2, [mask], text_slots=6)
    for seq, n_text in ((short, 1), (long, 4)):
        n = 5 + 4 + 1 + n_text  # the prefix
        assert torch.equal(seq.position_ids[:n], torch.arange(n))  # image and text keep plain positions
        assert int(seq.position_ids[n]) == 5 + 4 + 1 + 6  # [SOV] always right after the 6 text slots
    assert torch.equal(short.position_ids[-4:], long.position_ids[-4:])
    plain = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, [3], 2, [mask])
    assert torch.equal(plain.position_ids, torch.arange(len(plain)))
    rejected = build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, [3], 2, None, text_slots=6)
    assert rejected.position_ids.tolist()[-2:] == [16, 17]
    batch = collate([short, long])
    assert torch.equal(batch["position_ids"][1, : len(long)], long.position_ids)
    assert batch["position_ids"][0, len(short) :].min() > short.position_ids.max()  # padding, past the end
    with pytest.raises(ValueError, match="do not fit"):
        build_training_sequence(order_for(LAYOUT, "raster", (2,)), IMAGE, [3] * 7, 2, [mask], text_slots=6)
