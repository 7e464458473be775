"""The decoder trainer on phantoms with untrained (0-step) tokenizers: mixing, learning, exact resume, NaN stop."""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from napari_mris.model.decoder import DecoderConfig
from napari_mris.model.sequence import count_text_tokens
from napari_mris.model.vocab import REJ, SOV
from napari_mris.phantom import write_lvit_dataset
from napari_mris.tokenizers import load_tokenizers
from napari_mris_train import objective, trainer
from napari_mris_train.checkpoint import load_checkpoint, part
from napari_mris_train.config import DERIVED_DECODER_FIELDS, ConfigError, decoder_settings, load_recipe
from napari_mris_train.data import load_split
from napari_mris_train.encode_cache import cached_encoding, load_encoded
from napari_mris_train.losses import compute_losses, lesion_loss
from napari_mris_train.mixing import SequenceMixer
from napari_mris_train.prompts import swap_left_right
from napari_mris_train.tokenizer_training import recipe_from_sections, train_tokenizers

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(LViT phantom root, model dir holding 0-step tokenizers)."""
    root = write_lvit_dataset(tmp_path_factory.mktemp("data"), 16, 3, size=32, seed=1)
    tokenizers = tmp_path_factory.mktemp("tokenizers")
    recipe = recipe_from_sections(load_recipe(TINY).sections)
    train_tokenizers(recipe, load_split(root, split="train"), tokenizers, steps=0, progress=False)
    return root, tokenizers


def fresh_model_dir(tokenizers: Path, tmp_path: Path, name: str = "model") -> Path:
    out = tmp_path / name
    out.mkdir()
    for file in trainer.TOKENIZER_FILES:
        shutil.copy2(tokenizers / file, out / file)
    return out


def tiny_recipe(**train):
    recipe = load_recipe(TINY)
    defaults = {"eval_every": 1000, "val_images": 1, "checkpoint_every": 1000}
    return replace(recipe, train=replace(recipe.train, **{**defaults, **train}))


@pytest.fixture(autouse=True)
def quiet_truncation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt is")
        yield


def test_mixing_builds_every_kind_of_sequence(tiny_data, tmp_path):
    root, tokenizers_dir = tiny_data
    tokenizers = load_tokenizers(tokenizers_dir)
    layout = trainer.vocab_layout(tokenizers)
    data = cached_encoding(tmp_path, load_split(root, split="train"), tokenizers, 32, progress=False)
    cache = next((tmp_path / "cache").glob("encoded_*.safetensors"))
    again = load_encoded(cache)
    assert again.names == data.names and torch.equal(again.masks, data.masks) and again.text_ids == data.text_ids
    assert torch.equal(again.images, data.images) and data.images.dtype == torch.uint8
    recipe = replace(tiny_recipe().train, absent_fraction=0.3, zone_fraction=0.3, foreign_fraction=0.2)
    mixer = SequenceMixer(data, tokenizers, layout, recipe)
    batches = [mixer.batch(step, 8) for step in range(12)]
    samples = [s for batch in batches for s in batch]
    # one decoding order per batch (no raster sequence padded to next-scale length), both orders over steps
    assert all(len({s.sequence.order for s in batch}) == 1 for batch in batches)
    assert {batch[0].sequence.order for batch in batches} == set(recipe.orders) == {"raster", "scale"}
    kinds = {s.kind for s in samples}
    assert {"full", "zone", "absent"} <= kinds
    for s in samples:  # pixels, mask and lesion target are flipped together (or not at all)
        image = data.images[s.index].float()[None] / 255
        flipped = not torch.equal(s.sequence.pixels, image)
        assert torch.equal(s.sequence.pixels, image.flip(-1) if flipped else image)
        mask = data.masks[s.index].float()
        mask = mask.flip(-1) if flipped else mask
        torch.testing.assert_close(s.lesion, mask[None])
    for s in samples:
        decision = (
            s.sequence.labels[s.sequence.labels == REJ].numel() + s.sequence.labels[s.sequence.labels == SOV].numel()
        )
        assert decision == 1
        rejected = bool((s.sequence.labels == REJ).any())
        assert rejected == (s.kind in ("absent", "foreign")), s.kind
        if s.kind == "zone":  # a proper part of the mask: re-encoded codes differ from the full mask's
            full = data.mask_codes[s.sequence.order][-1][s.index]
            codes = s.sequence.labels[s.sequence.mask_positions][-full.shape[-1] :]
            start, _ = layout.mask_range(s.sequence.order)
            assert not any(torch.equal(codes - start, full[f]) for f in (0, 1))
    flipped_full = [s for s in samples if s.kind == "full" and s.text != data.descriptions[s.index]]
    assert flipped_full and all(s.text == swap_left_right(data.descriptions[s.index]) for s in flipped_full)
    # the same (seed, step) gives the same batch: what exact resume relies on
    again_batch = SequenceMixer(data, tokenizers, layout, recipe).batch(5, 8)
    assert [s.key for s in again_batch] == [s.key for s in mixer.batch(5, 8)]


def test_wording_puts_prompts_into_sentences_and_keeps_their_targets(tiny_data, tmp_path):
    """train.wording_fraction: the same sample (kind, flip, target) with its prompt inside a radiology
    sentence, encoded whole; a sentence longer than the model reads is not cut (the zone words could go)
    but left plain."""
    from napari_mris_train.prompts import WORDING_CLOSINGS, WORDING_OPENINGS

    root, tokenizers_dir = tiny_data
    tokenizers = load_tokenizers(tokenizers_dir)
    layout = trainer.vocab_layout(tokenizers)
    data = cached_encoding(tmp_path, load_split(root, split="train"), tokenizers, 32, progress=False)
    plain = replace(tiny_recipe().train, absent_fraction=0.3, zone_fraction=0.3)
    mixers = [SequenceMixer(data, tokenizers, layout, replace(plain, wording_fraction=f)) for f in (0.0, 1.0)]
    worded_count = 0
    for index in range(len(data)):
        for seed in range(6):
            before, after = (m.sample(index, np.random.default_rng(seed), "raster") for m in mixers)
            assert after.kind == before.kind and before.text in after.text
            targets = [s.sequence.labels[s.sequence.labels >= 0] for s in (before, after)]  # decision and mask
            assert torch.equal(*targets)
            if after.text != before.text:
                worded_count += 1
                assert after.text.startswith(WORDING_OPENINGS) or after.text.endswith(WORDING_CLOSINGS)
                ids = tokenizers.text.encode(after.text)  # raises if it were longer than the model reads
                assert count_text_tokens(layout, after.sequence.input_ids) == len(ids)
    assert worded_count > 0
    with pytest.raises(ConfigError, match="wording_fraction"):
        replace(plain, wording_fraction=1.5)


def test_loss_decreases_on_a_fixed_batch(tiny_data, tmp_path):
    root, tokenizers_dir = tiny_data
    tokenizers = load_tokenizers(tokenizers_dir)
    layout = trainer.vocab_layout(tokenizers)
    recipe = tiny_recipe()
    data = cached_encoding(tmp_path, load_split(root, split="train"), tokenizers, 32, progress=False)
    samples = SequenceMixer(data, tokenizers, layout, recipe.train).batch(0, 4)
    torch.manual_seed(0)
    decoder = trainer.build_decoder(recipe, tokenizers, layout)
    from napari_mris.model.sequence import collate

    batch = collate([s.sequence for s in samples])
    orders = [s.sequence.order for s in samples]
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        terms = compute_losses(
            decoder,
            decoder(
                batch["input_ids"], batch["scale_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]
            ),
            batch,
            orders,
            layout,
            recipe.train.losses,
        )
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return part(load_checkpoint(run_dir / "checkpoints" / "last")[0], "model")


def test_resume_continues_exactly(tiny_data, tmp_path):
    root, tokenizers_dir = tiny_data
    recipe = tiny_recipe(steps=4, checkpoint_every=2, warmup_steps=1)
    recipe = replace(recipe, train=replace(recipe.train, losses=replace(recipe.train.losses, het_start=0.25)))
    straight = trainer.train(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "a"), progress=False)
    halves = fresh_model_dir(tokenizers_dir, tmp_path, "b")
    trainer.train(recipe, root, halves, stop_after=2, progress=False)
    assert load_checkpoint(halves / "checkpoints" / "last")[1]["step"] == 2
    with pytest.raises(trainer.CheckpointError, match="--resume"):
        trainer.train(recipe, root, halves, progress=False)
    trainer.train(recipe, root, halves, resume=True, progress=False)
    a, b = model_state(straight), model_state(halves)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    het_a = part(load_checkpoint(straight / "checkpoints" / "last")[0], "het")
    het_b = part(load_checkpoint(halves / "checkpoints" / "last")[0], "het")
    assert het_a["keys"].shape[0] > 0 and all(torch.equal(het_a[k], het_b[k]) for k in het_a)
    log = [json.loads(line) for line in (halves / trainer.LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert any("val_selection" in r for r in log) and (halves / "model.safetensors").is_file()
    assert {"ntp", "tcl", "nktp", "het", "tokens_per_s"} <= set(log[0])


def test_stem_warmup_trains_only_the_stem_and_resume_skips_it(tiny_data, tmp_path, monkeypatch):
    root, tokenizers_dir = tiny_data
    recipe = tiny_recipe(steps=2, checkpoint_every=1, warmup_steps=1, stem_warmup_steps=30, stem_warmup_lr=3e-3)
    assert recipe.decoder["pixel_decoder_channels"]  # the tiny recipe's U-Net stem: its lesion map is warmed up
    init = {}
    real_warm_up = trainer.warm_up_stem

    def spy(run, progress):
        init.update({k: v.clone() for k, v in run.decoder.state_dict().items()})
        real_warm_up(run, progress)

    monkeypatch.setattr(trainer, "warm_up_stem", spy)
    straight = trainer.train(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "a"), progress=False)
    log = [json.loads(line) for line in (straight / trainer.LOG_NAME).read_text().splitlines()]
    assert [r["stem_warmup_step"] for r in log if "stem_warmup_step" in r] == [30]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]

    # the warm-up alone (a run stopped right after it) moved the stem and nothing else
    only = fresh_model_dir(tokenizers_dir, tmp_path, "b")
    trainer.train(recipe, root, only, stop_after=0, progress=False)
    warmed = model_state(only)
    changed = {k for k in warmed if not torch.equal(warmed[k], init[k])}
    assert changed and all(k.startswith("pixel_stem.") for k in changed), changed

    # resuming skips the warm-up and ends where the straight run did
    first = trainer.warm_up_stem
    calls = []
    monkeypatch.setattr(trainer, "warm_up_stem", lambda run, progress: calls.append(1) or first(run, progress))
    trainer.train(recipe, root, only, resume=True, progress=False)
    assert not calls
    a, b = model_state(straight), model_state(only)
    assert all(torch.equal(a[k], b[k]) for k in a)
    run = trainer.setup(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "c"), None, False, False)
    pixels, target = run.mixer.stem_batch(0, 16)
    assert pixels.shape == target.shape == (16, 1, 32, 32) and set(target.unique().tolist()) == {0.0, 1.0}

    def loss_with(state):
        run.decoder.load_state_dict(state)
        with torch.no_grad():
            return float(lesion_loss(run.decoder.lesion_logits(pixels), target))

    assert loss_with(warmed) < 0.95 * loss_with(init)  # BCE + soft Dice of the lesion map, 30 steps


def test_second_stage_starts_from_a_model_and_keeps_its_stem(tiny_data, tmp_path, monkeypatch):
    """--init-from + train.freeze_stem (the referring stage): the stem stays bit-identical, the rest moves."""
    root, tokenizers_dir = tiny_data
    recipe = tiny_recipe(steps=2, checkpoint_every=1, warmup_steps=1)
    recipe = replace(recipe, decoder={**recipe.decoder, "pixel_decoder_channels": [8]})
    first = trainer.train(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "first"), progress=False)
    start = {k: v.clone() for k, v in part(load_checkpoint(first / "checkpoints" / "last")[0], "model").items()}
    second_recipe = replace(recipe, train=replace(recipe.train, freeze_stem=True, stem_warmup_steps=5))
    monkeypatch.setattr(trainer, "warm_up_stem", lambda run, progress: pytest.fail("a loaded stem is not warmed up"))
    second = fresh_model_dir(tokenizers_dir, tmp_path, "second")
    trainer.train(second_recipe, root, second, init_from=first, progress=False)
    after = part(load_checkpoint(second / "checkpoints" / "last")[0], "model")
    stem = [k for k in after if k.startswith("pixel_stem.")]
    assert stem and all(torch.equal(after[k], start[k]) for k in stem)
    assert any(not torch.equal(after[k], start[k]) for k in after if k.startswith("llama."))
    with pytest.raises(trainer.MRISError, match="incomplete"):  # not a model directory: named, not a traceback
        trainer.train(second_recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "x"), init_from=tmp_path)
    # a decoder that adds the zero-initialised (row, column) cell codes still starts from the source's weights
    positions = replace(second_recipe, decoder={**second_recipe.decoder, "cell_positions": True})
    run = trainer.setup(positions, root, fresh_model_dir(tokenizers_dir, tmp_path, "p"), None, False, False, (), first)
    loaded = run.decoder.state_dict()
    assert all(torch.equal(loaded[k], start[k]) for k in start)
    assert not loaded["cell_position_proj.weight"].any()


def test_map_pass_retrains_only_the_lesion_map_of_a_loaded_stem(tiny_data, tmp_path):
    """--init-from + stem_warmup_parts: map + freeze_stem (a map pass): the warm-up moves the up-stages and the
    lesion head only; the encoder (the decoder's image features, the domain guard's statistics) stays
    bit-identical, and the decoder steps after it leave the whole stem as the warm-up left it."""
    root, tokenizers_dir = tiny_data
    recipe = tiny_recipe(steps=2, checkpoint_every=1, warmup_steps=1)
    first = trainer.train(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path, "first"), progress=False)
    start = {k: v.clone() for k, v in part(load_checkpoint(first / "checkpoints" / "last")[0], "model").items()}
    map_pass = replace(
        recipe,
        train=replace(
            recipe.train, freeze_stem=True, stem_warmup_steps=6, stem_warmup_lr=3e-3, stem_warmup_parts="map"
        ),
    )
    second = fresh_model_dir(tokenizers_dir, tmp_path, "second")
    trainer.train(map_pass, root, second, init_from=first, stop_after=0, progress=False)  # the warm-up alone
    warmed = part(load_checkpoint(second / "checkpoints" / "last")[0], "model")
    changed = {k for k in warmed if not torch.equal(warmed[k], start[k])}
    map_keys = {k for k in warmed if k.startswith(("pixel_stem.up.", "pixel_stem.lesion_map."))}
    assert changed and changed <= map_keys, changed - map_keys
    trainer.train(map_pass, root, second, resume=True, progress=False)  # the decoder steps
    after = part(load_checkpoint(second / "checkpoints" / "last")[0], "model")
    assert all(torch.equal(after[k], warmed[k]) for k in after if k.startswith("pixel_stem."))
    assert any(not torch.equal(after[k], warmed[k]) for k in after if k.startswith("llama."))
    log = [json.loads(line) for line in (second / trainer.LOG_NAME).read_text().splitlines()]
    assert [r["stem_warmup_step"] for r in log if "stem_warmup_step" in r] == [6]  # once: --resume skips it


def test_stem_warmup_needs_a_stem(tiny_data, tmp_path):
    root, tokenizers_dir = tiny_data
    recipe = tiny_recipe(steps=1, stem_warmup_steps=2)
    no_stem = {"pixel_channels": [], "cell_features": False, "pixel_decoder_channels": []}
    recipe = replace(recipe, decoder={**recipe.decoder, **no_stem})
    with pytest.raises(trainer.ConfigError, match="pixel stem"):
        trainer.train(recipe, root, fresh_model_dir(tokenizers_dir, tmp_path), progress=False)


def test_nan_loss_stops_and_keeps_good_weights(tiny_data, tmp_path, monkeypatch):
    root, tokenizers_dir = tiny_data
    out = fresh_model_dir(tokenizers_dir, tmp_path)
    recipe = tiny_recipe(steps=4, checkpoint_every=2, eval_every=2)
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = compute_losses(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(objective, "compute_losses", poisoned)
    with pytest.raises(trainer.TrainingDiverged, match="step 3"):
        trainer.train(recipe, root, out, progress=False)
    tensors, info = load_checkpoint(out / "checkpoints" / "last")
    assert info["step"] == 2
    saved = load_file(str(out / "model.safetensors"))
    good = part(tensors, "model")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], good[k]) for k in saved)  # best = the step-2 weights, untouched


def test_cli_switches_and_bad_recipe(tiny_data, tmp_path):
    root, tokenizers_dir = tiny_data
    from napari_mris_train.cli import main

    out = fresh_model_dir(tokenizers_dir, tmp_path)
    rc = main(
        [
            "train",
            "--config",
            str(TINY),
            "--data",
            str(root),
            "--out",
            str(out),
            "--steps",
            "1",
            "--no-tcl",
            "--no-nktp",
            "--no-het",
            "--tag",
            "baseline",
            "--seed",
            "7",
            "--quiet",
        ]
    )
    assert rc == 0
    run_dir = out / "runs" / "baseline"
    args = argparse.Namespace(config=TINY, no_tcl=False, no_nktp=False, no_het=False, steps=None, seed=7)
    assert trainer.recipe_from_args(args).train.seed == 7 != load_recipe(TINY).train.seed
    record = json.loads((run_dir / trainer.LOG_NAME).read_text().splitlines()[0])
    assert record["tcl"] == 0.0 and record["nktp"] == 0.0 and record["het"] == 0.0
    assert (run_dir / "model.safetensors").is_file() and not (out / "model.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("het_start:", "het_strat:"))
    with pytest.raises(ConfigError, match="het_strat"):
        load_recipe(bad)


def test_weight_decay_only_on_matrices_and_embeddings(tiny_data):
    """nanoGPT's rule: >= 2-D weights decay, biases and norm gains do not; frozen weights are left out."""
    tokenizers = load_tokenizers(tiny_data[1])
    decoder = trainer.build_decoder(tiny_recipe(), tokenizers, trainer.vocab_layout(tokenizers))
    decoder.pixel_stem.requires_grad_(False)
    optimizer = objective.adamw(decoder.parameters(), lr=0.1, weight_decay=0.5)
    decay, plain = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} >= {2} and all(p.dim() >= 2 for p in decay["params"])
    assert plain["params"] and all(p.dim() == 1 for p in plain["params"])
    trainable = [p for p in decoder.parameters() if p.requires_grad]
    assert len(decay["params"]) + len(plain["params"]) == len(trainable) < len(list(decoder.parameters()))
    embedding, norm = decoder.llama.get_input_embeddings().weight, decoder.llama.model.norm.weight
    assert any(p is embedding for p in decay["params"]) and any(p is norm for p in plain["params"])
    before = {id(p): p.detach().clone() for p in trainable}
    for p in trainable:
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    optimizer.step()
    assert all(torch.allclose(p, before[id(p)] * (1 - 0.1 * 0.5)) for p in decay["params"])
    assert all(torch.equal(p, before[id(p)]) for p in plain["params"])


def test_decoder_section_is_the_runtime_decoder_config(tiny_data, tmp_path):
    """The recipe's decoder keys are DecoderConfig's (less what the tokenizers fix), checked on load and build."""
    recipe = load_recipe(TINY)
    settable = {f.name for f in fields(DecoderConfig)} - set(DERIVED_DECODER_FIELDS)
    assert set(recipe.decoder) == settable and recipe.decoder["rope_theta"] == DecoderConfig(1).rope_theta
    older = {k: v for k, v in recipe.decoder.items() if k not in ("rope_theta", "rms_norm_eps")}
    assert decoder_settings(older, "snapshot") == recipe.decoder  # an older checkpoint's snapshot still matches
    data = yaml.safe_load(TINY.read_text())
    for key, message in (("hidden_sise", "hidden_sise"), ("vocab_size", "tokenizers")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**data, "decoder": {**data["decoder"], key: 8}}))
        with pytest.raises(ConfigError, match=message):
            load_recipe(bad)
    tokenizers = load_tokenizers(tiny_data[1])
    no_stem = replace(recipe, decoder={**recipe.decoder, "pixel_channels": [], "pixel_decoder_channels": []})
    with pytest.raises(ConfigError, match="cell_features"):
        trainer.build_decoder(no_stem, tokenizers, trainer.vocab_layout(tokenizers))


def test_export_writes_the_last_weights_and_nothing_else(tiny_model_dir, tmp_path) -> None:  # noqa: F811
    from napari_mris.model.modeldir import read_config
    from napari_mris_train.cli import main

    out = tmp_path / "shipped"
    assert main(["export", "--run", str(tiny_model_dir), "--out", str(out), "--model-id", "x-v1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "config.json",
            "image_tokenizer.safetensors",
            "mask_tokenizer.safetensors",
            "tokenizer.json",
            "model.safetensors",
            "SHA256SUMS",  # the manifest every load verifies the files against
        ]
    )
    assert read_config(out)["model_id"] == "x-v1" and read_config(out)["trained_steps"] > 0
    assert main(["export", "--run", str(tmp_path / "missing"), "--out", str(out), "--model-id", "x"]) == 1
    # the preferred decoding order travels with the model and is what the pipeline uses unasked
    from napari_mris.pipeline import MRISPipeline

    assert MRISPipeline.from_pretrained(out).default_order == "scale"
    args = ["export", "--run", str(tiny_model_dir), "--out", str(out), "--model-id", "x-v1"]
    assert main([*args, "--default-order", "raster"]) == 0
    pipeline = MRISPipeline.from_pretrained(out)  # a re-export over an exported model writes a fresh manifest
    assert pipeline.weights_verified and pipeline.default_order == "raster" and pipeline.settings().order == "raster"
    assert pipeline.settings(order="scale").order == "scale"


def test_export_of_the_best_weights_in_half_precision(tiny_model_dir, tmp_path) -> None:  # noqa: F811
    """--weights best ships model.safetensors (kept by the selection score) and --float16 halves it."""
    from napari_mris.model.decoder_files import load_decoder
    from napari_mris.model.modeldir import read_config
    from napari_mris_train.cli import main

    out = tmp_path / "half"
    args = ["export", "--run", str(tiny_model_dir), "--out", str(out), "--model-id", "x-v2", "--weights", "best"]
    assert main([*args, "--float16"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    best = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(saved[k], best[k].half()) for k in best)  # the best weights, not the last step
    log = [json.loads(line) for line in (tiny_model_dir / trainer.LOG_NAME).read_text().splitlines()]
    config = read_config(out)
    assert config["weights_dtype"] == "float16"
    assert config["trained_steps"] == [r["step"] for r in log if r.get("saved_best")][-1]
    half, _ = load_decoder(out)
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # computed in float32 as before
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tiny_model_dir / "model.safetensors").stat().st_size


def test_a_missing_or_damaged_checkpoint_is_named_plainly(tmp_path):
    """load_checkpoint names the missing files, and a damaged tensor file is a CheckpointError (safetensors'
    own error is neither an OSError nor a ValueError)."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    with pytest.raises(trainer.CheckpointError, match="state.safetensors and state.json missing"):
        load_checkpoint(folder)
    (folder / "state.safetensors").write_bytes(b"junk")
    (folder / "state.json").write_text("{}")
    with pytest.raises(trainer.CheckpointError, match="is damaged"):
        load_checkpoint(folder)
