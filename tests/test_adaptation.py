"""The prompt-and-correct loop: save corrections, adapt with LoRA in a child process, switch, switch back."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from _model_fixtures import force_drawing
from qtpy.QtCore import Qt

from napari_mris._widget import LABELS_NAME, MRISWidget
from napari_mris.adaptation import (
    MAX_HELD_OUT,
    AdaptationError,
    AdaptationJob,
    HeldOutComparison,
    adapter_name,
    compare_on_held_out,
    held_out_names,
    mask_dice,
)
from napari_mris.adapters import adapter_evaluation, adapters_folder, list_adapters
from napari_mris.corrections import CorrectionsStore
from napari_mris.errors import MRISError
from napari_mris.model.modeldir import model_hash
from napari_mris.pipeline import MRISPipeline

WAIT_MS = 240_000  # a child Python imports torch, transformers and peft on a shared 2-core CPU

needs_display = pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run the widget tests under xvfb-run (offscreen Qt has no GL here)",
)


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the tiny model, with a private per-user adapters folder (the copy has the tiny
    model's hash, so a shared folder would show other tests' adapters)."""
    monkeypatch.setenv("NAPARI_MRIS_ADAPTERS", str(tmp_path / "user_adapters"))
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_adapting_needs_saved_examples(model_copy: Path, tmp_path: Path) -> None:
    job = AdaptationJob(model_copy, tmp_path / "empty", adapter_name())
    with pytest.raises(AdaptationError, match="No training examples"):
        list(job.run())
    with pytest.raises(AdaptationError, match="no trained decoder"):
        list(AdaptationJob(tmp_path, tmp_path, "x").run())


def test_adapter_names_sort_by_time() -> None:
    from datetime import datetime, timezone

    assert adapter_name(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "corrections-20260102-030405"


@needs_display
def test_save_adapt_switch_and_switch_back(make_napari_viewer, qtbot, model_copy: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.random((32, 32)).astype(np.float32), name="slice")
    widget = MRISWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MRIS")
    widget.set_pipeline(MRISPipeline.from_pretrained(model_copy, device="cpu"))
    widget.corrections.root = tmp_path / "corrections"
    widget.corrections.steps = 3
    base_hash = model_hash(model_copy)

    for value, prompt in enumerate(("Unilateral pulmonary infection, lower left lung.", "upper right lung"), 1):
        widget.set_prompt(prompt)
        with force_drawing(widget.pipeline):  # the tiny model must draw something to be corrected
            widget.segment()
            qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
        labels = viewer.layers[LABELS_NAME]
        assert labels.metadata["mris_segment_labels"][value] == prompt
        corrected = np.zeros(image.data.shape, bool)
        corrected[20:28, 4 * value : 14 * value] = True
        labels.data_setitem(np.nonzero(corrected), value)  # the radiologist's correction
        labels.selected_label = value
        assert widget.save_example() is not None
    assert len(CorrectionsStore(widget.corrections.root)) == 2

    widget.adapt()
    assert widget.is_running and not widget.segment_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    new = widget.new_adapter
    assert new is not None and new.startswith("corrections-"), widget.status_label.text()
    assert widget.adapter is None  # listed with its effect; the user switches to it
    assert (adapters_folder(model_copy) / new / "adapter_model.safetensors").is_file()
    assert not (model_copy / "adapters").exists()  # the model directory is never written
    index = widget.adapter_combo.findData(new)
    assert index >= 0  # the widget lists this model's adapters
    assert "not compared with the base model" in widget.adapter_effect.text()  # two corrections: none held back
    widget.adapter_combo.setCurrentIndex(index)
    widget.adapter_combo.activated.emit(index)  # the user picks it
    assert widget.adapter == new and new in widget.model_label.text()
    assert model_hash(model_copy) == base_hash  # the base weights were not touched

    widget.set_prompt("lower left lung")
    widget.segment()  # loads base + adapter in a worker, then streams
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert widget.pipeline is not None and widget.pipeline.adapter == widget.adapter
    assert widget.status_label.text().startswith(("Done", "Not present")), widget.status_label.text()

    none_index = widget.adapter_combo.findData(None)
    widget.adapter_combo.setCurrentIndex(none_index)
    widget.adapter_combo.activated.emit(none_index)  # the user picks "none": back to the base model
    assert widget.adapter is None and widget.pipeline is None


@needs_display
def test_stopping_an_adaptation_leaves_the_model_unchanged(make_napari_viewer, qtbot, model_copy, tmp_path) -> None:
    viewer = make_napari_viewer()
    widget = MRISWidget(viewer, model=model_copy)
    store = CorrectionsStore(tmp_path / "corrections")
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    store.add(np.arange(32 * 32, dtype=np.float32).reshape(32, 32), "lower left lung", mask)
    widget.corrections.root = store.root
    widget.corrections.steps = 100_000
    widget.adapt()
    qtbot.waitUntil(lambda: widget.status_label.text().startswith("Adapting: step"), timeout=WAIT_MS)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=WAIT_MS)
    assert "stopped" in widget.status_label.text() and widget.adapter is None
    assert not list_adapters(model_copy) and not (model_copy / "adapters").exists()


# ---------------------------------------------------------------------- held-back corrections (issue 19, item 4)


def test_held_back_corrections_are_chosen_by_name_not_by_order() -> None:
    names = [f"mris_{i:016x}" for i in range(50)]
    held = held_out_names(names)
    assert len(held) == 10 and set(held) < set(names)
    assert held_out_names(list(reversed(names))) == held  # the saving order does not matter
    assert held_out_names(names + names[:5]) == held  # nor a name listed twice
    assert held_out_names(names[:4]) == []  # too few to hold any back
    assert len(held_out_names(names[:5])) == 1
    assert len(held_out_names([f"n{i}" for i in range(400)])) == MAX_HELD_OUT
    assert held_out_names(names, 0.0) == []
    with pytest.raises(AdaptationError, match="fraction"):
        held_out_names(names, 1.0)


class _FixedAnswer:
    """A stand-in pipeline whose answer to every prompt is one fixed mask."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask, self.calls = mask, []

    def segment(self, image, prompt, **decoding):
        self.calls.append((prompt, decoding))
        return type("Result", (), {"mask": self.mask})()


def test_held_out_comparison_scores_both_models_against_the_corrections() -> None:
    truth = np.zeros((8, 8), bool)
    truth[:4] = True  # 32 pixels
    half = np.zeros((8, 8), bool)
    half[:2] = True  # 16 pixels, all inside: Dice 2 * 16 / 48
    base, adapted = _FixedAnswer(half), _FixedAnswer(truth)
    examples = [("a", np.zeros((8, 8)), "lower left lung", truth), ("b", np.zeros((8, 8)), "upper right lung", truth)]
    seen = []
    comparison = compare_on_held_out(base, adapted, examples, lambda done, total: seen.append((done, total)), order="x")
    assert comparison.names == ["a", "b"] and seen == [(1, 2), (2, 2)]
    assert comparison.base_dice == pytest.approx([2 / 3, 2 / 3]) and comparison.adapter_dice == [1.0, 1.0]
    assert base.calls == [("lower left lung", {"order": "x"}), ("upper right lung", {"order": "x"})]
    assert "Dice 100.0 % with this adapter, 66.7 % with the base model (+33.3 points)" in comparison.summary()
    assert HeldOutComparison.from_json(comparison.to_json()) == comparison
    assert mask_dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="one base and one adapter Dice"):
        HeldOutComparison.from_json({"names": ["a"], "base_dice": [], "adapter_dice": [1.0]})


def _store_of(root: Path, count: int) -> CorrectionsStore:
    store = CorrectionsStore(root)
    rng = np.random.default_rng(1)
    for i in range(count):
        mask = np.zeros((32, 32), bool)
        mask[4 + i : 16 + i, 3:13] = True
        store.add(rng.random((32, 32)).astype(np.float32), f"Unilateral pulmonary infection, lower left lung {i}", mask)
    return store


def test_finetune_holds_back_corrections_and_stores_the_comparison(model_copy: Path, tmp_path: Path, monkeypatch):
    import napari_mris_train.finetune as finetune_module
    from napari_mris_train.data import load_split

    store = _store_of(tmp_path / "corrections", 6)
    names = [r.name for r in store.records()]
    held = held_out_names(names, 0.34)
    assert len(held) == 2
    trained_on = []
    original = finetune_module.train_adapter

    def recording(model_dir, dataset, steps, **options):
        trained_on.extend(load_split(dataset).names)
        return original(model_dir, dataset, steps, **options)

    monkeypatch.setattr(finetune_module, "train_adapter", recording)
    folder = finetune_module.finetune(model_copy, store.root, "held", steps=2, batch_size=2, held_out_fraction=0.34)
    assert sorted(trained_on) == sorted(set(names) - set(held))  # the held-back cases were not trained on
    stored = adapter_evaluation(model_copy, "held")
    assert stored is not None and (folder / "evaluation.json").is_file()
    comparison = HeldOutComparison.from_json(stored)
    assert sorted(comparison.names) == sorted(held)
    base = MRISPipeline.from_pretrained(model_copy, device="cpu")
    records = {r.name: r for r in store.records()}
    for name, dice in zip(comparison.names, comparison.base_dice, strict=True):  # the base column is the base model's
        example = load_split(store.root)[load_split(store.root).names.index(name)]
        assert dice == pytest.approx(mask_dice(base.segment(example.image, records[name].prompt).mask, example.mask))
    adapted = MRISPipeline.from_pretrained(model_copy, device="cpu", adapter="held")
    example = load_split(store.root)[load_split(store.root).names.index(comparison.names[0])]
    assert comparison.adapter_dice[0] == pytest.approx(
        mask_dice(adapted.segment(example.image, example.description).mask, example.mask)
    )  # the adapter column is the saved adapter's, as the widget would load it

    finetune_module.finetune(model_copy, store.root, "all", steps=1, batch_size=2)
    assert adapter_evaluation(model_copy, "all") is None  # nothing held back, nothing claimed
    (adapters_folder(model_copy) / "all" / "evaluation.json").write_text("{not json")
    assert adapter_evaluation(model_copy, "all") is None


def test_the_job_asks_for_held_back_cases_and_reports_their_scoring(model_copy: Path, tmp_path: Path) -> None:
    store = _store_of(tmp_path / "corrections", 1)
    job = AdaptationJob(model_copy, store.root, "x", steps=2, held_out_fraction=0.25)
    command = job.command()
    assert command[command.index("--hold-out") + 1] == "0.25"
    lines = ["step 1/2 loss 0.5", "step 2/2 loss 0.25", "held-back 1/2", "held-back 2/2", "adapter saved: /a/x"]
    job.command = lambda: [sys.executable, "-c", f"print({chr(10).join(lines)!r})"]
    progress = []
    runner = job.run()
    with pytest.raises(StopIteration) as done:
        while True:
            progress.append(next(runner))
    assert done.value.value == "x"
    assert [(p.step, p.total, p.loss, p.phase) for p in progress] == [
        (1, 2, 0.5, "training"),
        (2, 2, 0.25, "training"),
        (1, 2, 0.25, "held-back"),
        (2, 2, 0.25, "held-back"),
    ]


def _fake_adapter(
    model_dir: Path, name: str, comparison: HeldOutComparison | None, calibration: str | None = None
) -> None:
    """An adapter folder as list_adapters sees it (the widget only lists it and reads its comparison and
    its border calibration)."""
    folder = adapters_folder(model_dir) / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    if comparison is not None:
        (folder / "evaluation.json").write_text(json.dumps(comparison.to_json()))
    if calibration is not None:
        (folder / "calibration.json").write_text(calibration)


@needs_display
def test_the_widget_shows_an_adapters_effect_before_the_user_switches(make_napari_viewer, model_copy: Path) -> None:
    better = HeldOutComparison(["a", "b"], base_dice=[0.5, 0.6], adapter_dice=[0.7, 0.8])
    _fake_adapter(model_copy, "corrections-1", better)
    _fake_adapter(model_copy, "corrections-2", None, calibration='{"lesion_threshold": 0.9}')
    _fake_adapter(model_copy, "corrections-3", better, calibration='{"lesion_threshold": 0.5}')
    _fake_adapter(model_copy, "corrections-4", None, calibration='{"lesion_threshold": "wide"}')
    widget = MRISWidget(make_napari_viewer(), model=model_copy)
    assert widget.adapter is None and not widget.adapter_effect.isVisibleTo(widget)  # base model: nothing to show
    first, second = (widget.adapter_combo.findData(n) for n in ("corrections-1", "corrections-2"))
    expected = "On 2 held-back corrections: Dice 75.0 % with this adapter, 55.0 % with the base model (+20.0 points)"
    assert widget.adapter_combo.itemData(first, Qt.ToolTipRole) == f"corrections-1: {expected}"
    assert "not compared with the base model" in widget.adapter_combo.itemData(second, Qt.ToolTipRole)
    assert "outline lesions tighter than the model did" in widget.adapter_combo.itemData(second, Qt.ToolTipRole)
    third, fourth = (widget.adapter_combo.findData(n) for n in ("corrections-3", "corrections-4"))
    assert widget.adapter_combo.itemData(third, Qt.ToolTipRole) == f"corrections-3: {expected}"  # the default cut
    assert "cannot be loaded" in widget.adapter_combo.itemData(fourth, Qt.ToolTipRole)

    widget.adapter_combo.highlighted.emit(first)  # the pointer on it in the open list: not switched yet
    assert widget.adapter is None and widget.adapter_effect.text() == f"corrections-1: {expected}"
    assert widget.adapter_effect.isVisibleTo(widget)
    widget.adapter_combo.highlighted.emit(second)
    assert "corrections-2: not compared" in widget.adapter_effect.text()

    widget.corrections.adapted.emit("corrections-1")  # as when an adaptation has just saved it
    assert widget.adapter is None and widget.new_adapter == "corrections-1"
    assert widget.adapter_effect.text() == f"corrections-1: {expected}"
    assert "choose it under Adapter" in widget.status_label.text()
    widget.adapter_combo.setCurrentIndex(first)
    widget.adapter_combo.activated.emit(first)
    assert widget.adapter == "corrections-1" and widget.adapter_effect.text() == f"corrections-1: {expected}"
    none = widget.adapter_combo.findData(None)
    widget.adapter_combo.setCurrentIndex(none)
    widget.adapter_combo.activated.emit(none)  # back to the base model: no adapter, no figure
    assert widget.adapter is None and not widget.adapter_effect.isVisibleTo(widget)


# ---------------------------------------------------------------------- the fine-tuning recipe (issue 19, item 3)


def test_the_recipe_adapts_the_models_default_order_with_corrections_as_given(model_copy: Path, tmp_path: Path):
    import argparse

    from napari_mris.model.decoder_files import load_decoder
    from napari_mris.model_location import peek_config
    from napari_mris.tokenizers import load_tokenizers
    from napari_mris_train.finetune import (
        NO_MIX,
        OWN_MIX,
        TRAINING_MIX,
        adaptation_mixers,
        mix_recipe,
        parse_mix,
        training_orders,
    )

    tokenizers = load_tokenizers(model_copy)
    _, layout = load_decoder(model_copy)
    every = tuple(o for o in layout.orders if o in tokenizers.masks)
    assert len(every) == 2 and training_orders(layout, tokenizers, None, model_copy) == every
    config = json.loads((model_copy / "config.json").read_text())
    config["default_order"] = every[1]
    (model_copy / "config.json").write_text(json.dumps(config))
    assert peek_config(model_copy)["default_order"] == every[1]
    assert training_orders(layout, tokenizers, "default", model_copy) == (every[1],)
    assert training_orders(layout, tokenizers, (every[0],), model_copy) == (every[0],)
    with pytest.raises(MRISError, match="this model decodes in"):
        training_orders(layout, tokenizers, ("diagonal",), model_copy)

    store = _store_of(tmp_path / "corrections", 3)
    own, replayed = adaptation_mixers(tokenizers, layout, store.root, store.root, 0.25, 4, 0, False, orders=(every[1],))
    assert own[1] == 3 and replayed[1] == 1  # a quarter of each batch replayed
    assert own[0].orders == replayed[0].orders == (every[1],)
    recipe = own[0].recipe  # by default a quarter of one-side / one-zone prompts made from the corrections
    assert OWN_MIX == (0.0, 0.25, 0.0) and recipe.flip
    assert (recipe.absent_fraction, recipe.zone_fraction, recipe.foreign_fraction) == OWN_MIX
    own, _ = adaptation_mixers(
        tokenizers, layout, store.root, store.root, 0.25, 4, 0, False, orders=(every[1],), own_mix=NO_MIX
    )
    assert (own[0].recipe.absent_fraction, own[0].recipe.zone_fraction, own[0].recipe.flip) == (0.0, 0.0, False)
    assert replayed[0].recipe.zone_fraction == TRAINING_MIX[1] and replayed[0].recipe.flip
    batch = own[0].batch(0, 3)  # one epoch of the three corrections, each with its own prompt, unflipped
    assert {s.kind for s in batch} == {"full"} and {s.text for s in batch} == {r.prompt for r in store.records()}
    assert not mix_recipe(every, NO_MIX, 0).flip and mix_recipe(every, (0.0, 0.2, 0.0), 0).flip
    assert parse_mix("0.1,0.2,0") == (0.1, 0.2, 0.0)
    for bad in ("0.5,0.6,0", "1,2", "a,b,c", "-0.1,0,0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)


def test_the_job_leaves_the_number_of_steps_to_the_recipe(model_copy: Path, tmp_path: Path) -> None:
    from napari_mris_train.finetune import DEFAULT_STEPS

    assert "--steps" not in AdaptationJob(model_copy, tmp_path, "x").command()
    command = AdaptationJob(model_copy, tmp_path, "x", steps=7).command()
    assert command[command.index("--steps") + 1] == "7"
    assert DEFAULT_STEPS == 150


def test_few_corrections_get_fewer_steps(model_copy: Path, tmp_path: Path) -> None:
    from napari_mris_train.finetune import DEFAULT_STEPS, MAX_PASSES, capped_steps, train_adapter

    assert capped_steps(DEFAULT_STEPS, MAX_PASSES, 50, 3) == DEFAULT_STEPS  # where the recipe was chosen
    assert capped_steps(DEFAULT_STEPS, MAX_PASSES, 10, 3) == 30  # each correction seen 9 times, not 45
    assert capped_steps(DEFAULT_STEPS, MAX_PASSES, 200, 3) == DEFAULT_STEPS
    assert capped_steps(DEFAULT_STEPS, 0, 10, 3) == DEFAULT_STEPS  # no cap
    assert capped_steps(5, MAX_PASSES, 1, 3) == 3 and capped_steps(5, 0.1, 1, 3) == 1
    store = _store_of(tmp_path / "corrections", 2)
    calls = []
    train_adapter(model_copy, store.root, 100, batch_size=2, max_passes=2, progress_callback=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]  # two passes over two corrections, two per step
