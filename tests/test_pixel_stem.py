"""The pixel stem: features land on the image tokens only, are required where a sequence starts, survive
save/load, and the cached decoding path agrees with teacher forcing when the stem is on."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _orders import legal_codes, order_for
from _tiny_decoder import TINY_LAYOUT, one_torch_thread, tiny_decoder_config  # noqa: F401

from napari_mris.model.decoder import DecoderConfig, MRISDecoder
from napari_mris.model.decoder_files import load_decoder, save_decoder
from napari_mris.model.generate import autoregressive_infer
from napari_mris.model.orders import cell_offset, code_cells, grid_of_cell
from napari_mris.model.pixel_stem import PixelStem
from napari_mris.model.sequence import IMAGE_START, build_training_sequence, collate, prefix_ids
from napari_mris.model.vocab import SOV

LAYOUT = TINY_LAYOUT
pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGE = torch.tensor([1, 5, 2, 7])  # a 2x2 image grid
TEXT = [3, 9, 4]
PREFIX = prefix_ids(LAYOUT, IMAGE, TEXT, 2)
SCALES = (1, 2, 4)


def stem_decoder(seed: int = 0, channels=(4, 8, 8), cell_features: bool = False, decoder_channels=()) -> MRISDecoder:
    """16 px slices -> three stride-2 stages -> the 2x2 image grid (and, with `decoder_channels`, a lesion map)."""
    torch.manual_seed(seed)
    config = tiny_decoder_config(
        n_scales=len(SCALES),
        pixel_channels=list(channels),
        cell_features=cell_features,
        pixel_decoder_channels=list(decoder_channels),
    )
    decoder = MRISDecoder(config).eval()
    with torch.no_grad():  # large features, so that pixels visibly change the output of a random model
        decoder.pixel_stem.proj.weight.normal_(std=1.0)
        decoder.llama.lm_head.weight.normal_(std=1.0)
    return decoder


def pixels(seed: int) -> torch.Tensor:
    return torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_stem_maps_a_slice_to_one_feature_per_image_token():
    stem = PixelStem([8, 16, 16, 32], hidden_size=24)
    features, lesion_map = stem(torch.rand(3, 1, 224, 224))
    assert features.shape == (3, 14 * 14, 24) and lesion_map is None
    with pytest.raises(ValueError, match="grayscale"):
        stem(torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match="at least one stage"):
        PixelStem([], hidden_size=24)


def test_unet_stem_climbs_back_through_its_skips_to_a_lesion_map():
    """Three up-stages on a four-stage encoder: a 112 x 112 map from 224 px, 8 map pixels per token cell;
    the map depends on the fine skips (a change in one 4 x 4 corner moves the map there most)."""
    torch.manual_seed(0)
    stem = PixelStem([8, 16, 16, 32], hidden_size=24, decoder_channels=[16, 8, 8]).eval()
    x = torch.rand(1, 1, 224, 224)
    features, lesion_map = stem(x)
    assert features.shape == (1, 196, 24) and lesion_map.shape == (1, 1, 112, 112) and stem.map_upsample == 8
    y = x.clone()
    y[..., :4, :4] = 1 - y[..., :4, :4]
    with torch.no_grad():
        change = (stem(y)[1] - stem(x)[1]).abs()[0, 0]
    assert change[:4, :4].mean() > 5 * change[56:, 56:].mean()
    with pytest.raises(ValueError, match="at least 4 encoder stages"):
        PixelStem([8, 16, 16], hidden_size=24, decoder_channels=[16, 8, 8])


def test_pixels_change_only_positions_from_the_image_tokens_on():
    decoder = stem_decoder()
    ids = PREFIX[None]
    with torch.no_grad():
        a = decoder(ids, pixel_values=pixels(0)[None]).hidden_states[0]
        b = decoder(ids, pixel_values=pixels(1)[None]).hidden_states[0]
    assert torch.allclose(a[:IMAGE_START], b[:IMAGE_START])  # causal: the header never sees the image
    assert not torch.allclose(a[IMAGE_START:], b[IMAGE_START:], atol=1e-4)


def test_a_stem_decoder_refuses_a_sequence_start_without_pixels_and_a_misplaced_image():
    decoder = stem_decoder()
    with pytest.raises(ValueError, match="pass pixel_values"):
        decoder(PREFIX[None])
    with pytest.raises(ValueError, match="do not fit"):
        decoder(PREFIX[None, :6], pixel_values=pixels(0)[None])  # the image tokens are cut off
    with pytest.raises(ValueError, match="grayscale"):
        decoder(PREFIX[None], pixel_values=torch.rand(1, 3, 16, 16))


def test_a_token_only_decoder_ignores_pixels():
    decoder = stem_decoder()
    plain = MRISDecoder(DecoderConfig(**{**decoder.config.to_dict(), "pixel_channels": []})).eval()
    assert plain.pixel_stem is None
    with torch.no_grad():
        assert torch.equal(plain(PREFIX[None]).logits, plain(PREFIX[None], pixel_values=pixels(0)[None]).logits)


def test_collate_stacks_pixels_all_or_none():
    codes = [torch.tensor([2]), torch.tensor([0, 1, 2, 3]), torch.arange(16) % 6]
    with_px = build_training_sequence(order_for(LAYOUT, "scale", SCALES), IMAGE, TEXT, 2, codes, pixels=pixels(0))
    without = build_training_sequence(order_for(LAYOUT, "scale", SCALES), IMAGE, TEXT, 2, codes)
    batch = collate([with_px, with_px])
    assert batch["pixel_values"].shape == (2, 1, 16, 16)
    assert "pixel_values" not in collate([without])
    with pytest.raises(ValueError, match="all or none"):
        collate([with_px, without])


@pytest.mark.parametrize("order, scales", [("raster", (4,)), ("scale", SCALES)])
def test_cached_decoding_with_pixels_agrees_with_teacher_forcing(order, scales):
    decoder = stem_decoder(seed=3)
    with torch.no_grad():  # make sure the model decides "present", so there is a mask to compare
        hidden = decoder(PREFIX[None], pixel_values=pixels(5)[None]).hidden_states[0, -1]
        decoder.llama.lm_head.weight[SOV] = hidden * 10
    steps = list(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), PREFIX, pixels=pixels(5)))
    assert steps[-1].finished and not steps[-1].rejected
    codes = steps[-1].codes
    codes = [codes[0]] if order == "raster" else [c[0] for c in codes]
    seq = build_training_sequence(order_for(LAYOUT, order, scales), IMAGE, TEXT, 2, codes, pixels=pixels(5))
    batch = collate([seq])
    with torch.no_grad():
        logits = decoder(
            batch["input_ids"], batch["scale_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits[0]
    predicted = legal_codes(LAYOUT, order)(None, logits[seq.mask_positions]).argmax(-1)
    assert torch.equal(predicted, seq.labels[seq.mask_positions])
    with pytest.raises(ValueError, match="pass pixel_values"):
        list(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), PREFIX))


def test_stem_weights_and_config_survive_save_and_load(tmp_path):
    decoder = stem_decoder(seed=7)
    save_decoder(decoder, LAYOUT, tmp_path)
    loaded, _ = load_decoder(tmp_path)
    assert loaded.config.pixel_channels == [4, 8, 8]
    with torch.no_grad():
        expected = decoder(PREFIX[None], pixel_values=pixels(2)[None]).logits
        assert torch.allclose(loaded(PREFIX[None], pixel_values=pixels(2)[None]).logits, expected, atol=1e-6)


def test_lesion_target_trains_the_stem_directly():
    """The auxiliary lesion term is `lesion_loss` of the U-Net stem's lesion map against the whole mask, and
    its gradient reaches the stem; without targets (or with weight 0) it is absent. A stem without a U-Net
    has no lesion read-out at all (the linear per-patch head is gone: no recipe used it)."""
    from napari_mris_train.losses import LossConfig, compute_losses, lesion_loss

    decoder = stem_decoder(decoder_channels=(8,))
    codes = [torch.tensor([2]), torch.tensor([0, 1, 2, 3]), torch.arange(16) % 6]
    seq = build_training_sequence(order_for(LAYOUT, "scale", SCALES), IMAGE, TEXT, 2, codes, pixels=pixels(0))
    batch = collate([seq])
    batch["lesion"] = torch.zeros(1, 1, 16, 16)
    batch["lesion"][0, 0, :2, 8:] = 1.0
    batch["lesion"][0, 0, 8:, :8] = 1.0
    output = decoder(
        batch["input_ids"], batch["scale_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    assert output.lesion_logits.shape == (1, 1, 4, 4)  # the 2x2 grid, two map pixels per cell side
    terms = compute_losses(decoder, output, batch, ["scale"], LAYOUT, LossConfig(het=False, lesion_weight=2.0))
    torch.testing.assert_close(terms["lesion"], lesion_loss(output.lesion_logits, batch["lesion"]))
    decoder.zero_grad()
    terms["lesion"].backward()
    assert decoder.pixel_stem.stages[0][0].weight.grad.abs().sum() > 0
    off = compute_losses(decoder, output, batch, ["scale"], LAYOUT, LossConfig(het=False, lesion_weight=0.0))
    assert "lesion" not in off
    torch.testing.assert_close(terms["loss"] - off["loss"], 2.0 * terms["lesion"])
    plain = stem_decoder()
    assert plain(PREFIX[None], pixel_values=pixels(0)[None]).lesion_logits is None
    with pytest.raises(ValueError, match="no lesion map"):
        plain.lesion_logits(pixels(0)[None])


def test_a_lesion_map_gets_bce_plus_dice_against_the_pooled_mask():
    """A U-Net stem's (B, 1, h, w) map is scored against the mask area-pooled to h x w: BCE + soft Dice,
    the U-Net peer's loss; a perfect, confident map scores near zero, its negation high."""
    from napari_mris_train.losses import lesion_loss

    mask = torch.zeros(2, 1, 16, 16)
    mask[0, 0, 4:12, 4:12] = 1.0
    mask[1, 0, :8] = 1.0
    target = torch.nn.functional.avg_pool2d(mask, 2)
    good, bad = 20 * (2 * target - 1), -20 * (2 * target - 1)
    assert float(lesion_loss(good, mask)) < 1e-3
    assert float(lesion_loss(bad, mask)) > 10
    logits = torch.randn(2, 1, 8, 8)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(lesion_loss(logits, mask), bce + (1 - dice).mean())


def test_unet_stem_cells_read_their_patch_of_the_lesion_map():
    """With a lesion map, each cell of an s x s grid also gets its u x u patch of map probabilities,
    projected: a change in the map's top-left quarter reaches the 2x2 grid's first cell and no other."""
    decoder = stem_decoder(channels=(4, 8, 8), cell_features=True, decoder_channels=(8,))
    assert decoder.pixel_stem.map_upsample == 2
    features = torch.zeros(1, 4, decoder.config.hidden_size)
    lesion_map = torch.zeros(1, 1, 4, 4)
    moved = lesion_map.clone()
    moved[..., :2, :2] = 5.0
    with torch.no_grad():
        a, b = decoder.cell_table(features, 2, lesion_map), decoder.cell_table(features, 2, moved)
    changed = (a - b).abs().sum(-1)[0]
    assert changed[0] > 0 and changed[1] > 0 and torch.all(changed[2:] == 0)  # 1x1 cell, 2x2 cell 0
    with pytest.raises(ValueError, match="lesion_map"):
        decoder.cell_table(features, 2)
    with pytest.raises(ValueError, match="climb back"):
        tiny_decoder_config(pixel_channels=[4, 8], pixel_decoder_channels=[8, 8])


def test_code_cells_index_one_table_of_every_grid():
    assert [cell_offset(s) for s in (1, 2, 3, 4)] == [0, 1, 5, 14]
    assert code_cells((1, 2)).tolist() == [0, 1, 2, 3, 4]
    assert code_cells((3,)).tolist() == list(range(5, 14))
    assert [grid_of_cell(i) for i in (0, 1, 4, 5, 13, 14)] == [1, 2, 2, 3, 3, 4]
    decoder = stem_decoder(cell_features=True)
    features = torch.arange(8.0).reshape(1, 4, 2).repeat(2, 1, 1)  # a 2x2 grid of 2-channel features
    table = decoder.cell_table(features, 4)
    assert table.shape == (2, 1 + 4 + 9 + 16, 2)
    torch.testing.assert_close(table[0, 0], features[0].mean(0))  # the 1x1 grid: the mean
    torch.testing.assert_close(table[0, 1:5], features[0])  # the 2x2 grid: the features themselves


def test_cell_features_reach_mask_positions_only_and_need_a_stem():
    codes = [torch.tensor([2]), torch.tensor([0, 1, 2, 3]), torch.arange(16) % 6]
    seq = build_training_sequence(order_for(LAYOUT, "scale", SCALES), IMAGE, TEXT, 2, codes, pixels=pixels(0))
    assert torch.equal(seq.slot_cells[seq.mask_positions], code_cells(SCALES))
    assert (seq.slot_cells >= 0).sum() == seq.mask_positions.numel()
    batch = collate([seq])
    args = (batch["input_ids"], batch["scale_ids"], batch["attention_mask"])
    with torch.no_grad():
        on = stem_decoder(cell_features=True)(*args, pixel_values=batch["pixel_values"], slot_cells=batch["slot_cells"])
        off = stem_decoder(cell_features=True)(*args, pixel_values=batch["pixel_values"])
    first = int(seq.mask_positions[0])
    assert torch.allclose(on.hidden_states[0, :first], off.hidden_states[0, :first])
    assert not torch.allclose(on.hidden_states[0, first:], off.hidden_states[0, first:], atol=1e-4)
    with pytest.raises(ValueError, match="needs pixel_channels"):
        tiny_decoder_config(cell_features=True)


def teacher_forced(decoder, order, scales, codes):
    """(the training sequence of `codes`, its logits with pixels and cells as training computes them)."""
    seq = build_training_sequence(order_for(LAYOUT, order, scales), IMAGE, TEXT, 2, codes, pixels=pixels(6))
    batch = collate([seq])
    with torch.no_grad():
        logits = decoder(
            batch["input_ids"],
            batch["scale_ids"],
            batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            slot_cells=batch["slot_cells"],
        ).logits[0]
    return seq, legal_codes(LAYOUT, order)(None, logits[seq.mask_positions])


@pytest.mark.parametrize("decoder_channels", [(), (8,)], ids=["linear", "unet"])
@pytest.mark.parametrize(
    "order, scales, options",
    [("raster", (4,), {"speculative": True}), ("raster", (4,), {"speculative": False}), ("scale", SCALES, {})],
)
def test_cached_decoding_with_cell_features_agrees_with_teacher_forcing(order, scales, options, decoder_channels):
    """Every decoding loop hands each fed token the cell of the code it predicts, as training does (also
    the patch of a U-Net stem's lesion map, which only the prefill computes)."""
    decoder = cell_decoder(decoder_channels)
    steps = list(autoregressive_infer(decoder, order_for(LAYOUT, order, scales), PREFIX, pixels=pixels(6), **options))
    assert steps[-1].finished and not steps[-1].rejected
    codes = steps[-1].codes
    codes = [codes[0]] if order == "raster" else [c[0] for c in codes]
    seq, logits = teacher_forced(decoder, order, scales, codes)
    assert torch.equal(logits.argmax(-1), seq.labels[seq.mask_positions])


def test_beam_search_with_cell_features_scores_as_teacher_forcing():
    decoder = cell_decoder()

    def log_prob(codes):
        seq, logits = teacher_forced(decoder, "raster", (4,), [codes])
        return float(logits.log_softmax(-1).gather(1, seq.labels[seq.mask_positions][:, None]).sum())

    greedy = list(autoregressive_infer(decoder, order_for(LAYOUT, "raster", (4,)), PREFIX, pixels=pixels(6)))[-1].codes[
        0
    ]
    beam = list(autoregressive_infer(decoder, order_for(LAYOUT, "raster", (4,)), PREFIX, pixels=pixels(6), beam=4))[
        -1
    ].codes[0]
    assert log_prob(beam) >= log_prob(greedy) - 1e-4


def cell_decoder(decoder_channels=()) -> MRISDecoder:
    decoder = stem_decoder(seed=4, cell_features=True, decoder_channels=decoder_channels)
    with torch.no_grad():
        if decoder.cell_patch_proj is not None:  # map patches that visibly move the mask positions
            decoder.cell_patch_proj.weight.normal_(std=1.0)
        hidden = decoder(PREFIX[None], pixel_values=pixels(6)[None]).hidden_states[0, -1]
        decoder.llama.lm_head.weight[SOV] = hidden * 10
        for head in decoder.nktp_heads:  # drafts that are sometimes wrong: the cache gets cropped
            head.linear.weight.normal_(std=0.5)
    return decoder


def test_cell_positions_start_at_zero_and_reach_the_mask_positions_in_every_decoding_loop():
    """The (row, column) code of each cell: zero-initialised (a decoder gains it without changing), then,
    once trained, a left and a right cell differ, and cached decoding still agrees with teacher forcing."""
    from napari_mris.model.decoder import cell_position_codes

    codes = cell_position_codes(range(1, 5))
    assert codes.shape == (1 + 4 + 9 + 16, 16)
    left, right = codes[1 + 0], codes[1 + 1]  # the 2x2 grid's upper left and upper right cells
    assert not torch.allclose(left, right) and torch.equal(codes[1 + 2][8:], left[8:])  # same column
    torch.manual_seed(4)
    base = cell_decoder((8,))
    with_positions = stem_decoder(seed=4, cell_features=True, decoder_channels=(8,))
    config = replace(with_positions.config, cell_positions=True)
    positioned = MRISDecoder(config).eval()
    state = base.state_dict()
    positioned.load_state_dict({**positioned.state_dict(), **state})
    mask_codes = [torch.arange(16) % 5]  # a raster mask with several different codes
    _, before = teacher_forced(base, "raster", (4,), mask_codes)
    _, unchanged = teacher_forced(positioned, "raster", (4,), mask_codes)
    assert torch.equal(unchanged, before)  # zero at initialisation: exactly the decoder it was loaded from
    with torch.no_grad():
        positioned.cell_position_proj.weight.normal_(std=1.0)
    assert not torch.allclose(teacher_forced(positioned, "raster", (4,), mask_codes)[1], before)
    for order, scales in (("raster", (4,)), ("scale", SCALES)):
        steps = list(autoregressive_infer(positioned, order_for(LAYOUT, order, scales), PREFIX, pixels=pixels(6)))
        codes_out = steps[-1].codes
        codes_out = [codes_out[0]] if order == "raster" else [c[0] for c in codes_out]
        seq, logits = teacher_forced(positioned, order, scales, codes_out)
        assert torch.equal(logits.argmax(-1), seq.labels[seq.mask_positions])
    with pytest.raises(ValueError, match="needs cell_features"):
        tiny_decoder_config(cell_positions=True)
