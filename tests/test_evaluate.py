"""Metrics by hand, and the eval command's JSON on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_mris_train.cli import main
from napari_mris_train.metrics import dice_iou
from napari_mris_train.tiny import build_tiny_model


def _benchmark(name: str):
    """A script of benchmarks/ (not a package) loaded as a module, for its functions."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dice_and_iou_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], bool)
    gt = np.array([[1, 0, 0], [0, 1, 1]], bool)
    dice, iou = dice_iou(pred, gt)  # |P|=3, |G|=3, |P&G|=2 -> Dice 4/6, IoU 2/4
    assert dice == pytest.approx(4 / 6) and iou == pytest.approx(0.5)
    assert dice_iou(np.zeros((4, 4)), np.zeros((4, 4))) == (1.0, 1.0)  # empty vs empty is a perfect answer
    assert dice_iou(np.zeros((4, 4)), np.eye(4)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        dice_iou(np.zeros((4, 4)), np.zeros((4, 5)))


def test_eval_writes_every_metric(tmp_path):
    data = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt is")
        model = build_tiny_model(tmp_path / "model", data_root=data, tokenizer_steps=0, decoder_steps=1)
        out = tmp_path / "eval.json"
        rc = main(
            [
                "eval",
                "--model",
                str(model),
                "--data",
                str(data / "Val_Folder"),
                "--json",
                str(out),
                "--order",
                "raster",
                "--limit",
                "2",
                "--device",
                "cpu",
            ]
        )
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("dice", "miou", "false_rejection_rate", "n_acc", "other_text_drop", "selection", "model_hash"):
        assert key in report
    assert report["n_images"] == 2
    rows = report["per_prompt"]
    full = [r for r in rows if r["set"] == "full"]
    assert len(full) == 2 and {r["set"] for r in rows} <= {"full", "side", "zone", "absent", "other"}
    assert report["dice"] == pytest.approx(np.mean([r["dice"] for r in full]))
    assert report["miou"] == pytest.approx(np.mean([r["iou"] for r in full]))
    assert report["false_rejection_rate"] == pytest.approx(np.mean([r["not_present"] for r in full]))
    assert report["sets"]["absent"]["n"] == sum(r["set"] == "absent" for r in rows) > 0
    assert report["n_acc"] == pytest.approx(np.mean([r["not_present"] for r in rows if r["set"] == "absent"]))
    for name in ("full", "other"):
        assert 0.0 <= report["sets"][name]["dice"] <= 1.0 and 0.0 <= report["sets"][name]["pooled_dice"] <= 1.0
    assert all(0.0 <= r["reject_probability"] <= 1.0 and r["rejected"] == (r["reject_probability"] > 0.5) for r in rows)
    with pytest.raises(SystemExit):  # a misspelt set is an argparse error, before the model loads
        main(["eval", "--model", str(model), "--data", str(data / "Val_Folder"), "--sets", "full,sides"])
    with pytest.raises(SystemExit):  # a wording without its one '{}'
        main(["eval", "--model", str(model), "--data", str(data / "Val_Folder"), "--wording", "no place"])


def test_eval_puts_every_prompt_into_the_wording(tmp_path, monkeypatch):
    """--wording: the model is asked the sentence, the rows keep the plain prompt (so runs pair)."""
    from napari_mris.pipeline import MRISPipeline

    data = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt is")
        model = build_tiny_model(tmp_path / "model", data_root=data, tokenizer_steps=0, decoder_steps=1)
    asked = []
    segment_findings = MRISPipeline.segment_findings

    def recording(self, image, prompts, **kwargs):
        asked.extend(prompts)
        return segment_findings(self, image, prompts, **kwargs)

    monkeypatch.setattr(MRISPipeline, "segment_findings", recording)
    out = tmp_path / "worded.json"
    wording = "x: {} ok"  # short: the tiny model's tokenizer spends a token on about every letter
    args = ["eval", "--model", str(model), "--data", str(data / "Val_Folder"), "--json", str(out)]
    assert main([*args, "--order", "raster", "--limit", "1", "--device", "cpu", "--wording", wording]) == 0
    report = json.loads(out.read_text())
    texts = {r["prompt"] for r in report["per_prompt"]}
    assert report["wording"] == wording and len(texts) >= 2
    assert asked and all(a.startswith("x: ") and a.endswith(" ok") for a in asked)
    assert {wording.replace("{}", t) for t in texts} <= set(asked)


def test_compare_evals_pairs_the_same_prompts(tmp_path):
    """benchmarks/compare_evals.py: B - A per set over the prompts both runs asked."""
    compare = _benchmark("compare_evals")

    def row(name, kind, dice, p_reject, drawn=True):
        rejected = p_reject > 0.5
        return {"name": name, "set": kind, "prompt": f"{kind} {name}", "dice": dice, "rejected": rejected,
                "not_present": rejected or not drawn, "reject_probability": p_reject}  # fmt: skip

    a = [row("x", "full", 0.5, 0.1), row("y", "full", 0.7, 0.3), row("x", "absent", 0.0, 0.45)]
    b = [row("x", "full", 0.6, 0.2), row("y", "full", 0.9, 0.6), row("x", "absent", 0.0, 0.9), row("z", "full", 1, 0)]
    for path, rows in (("a.json", a), ("b.json", b)):
        (tmp_path / path).write_text(json.dumps({"per_prompt": rows}))
    first, second = compare.load_rows(tmp_path / "a.json"), compare.load_rows(tmp_path / "b.json")
    table = compare.paired_table(first, second)
    full = next(line for line in table if line.startswith("full "))
    assert full.split()[1:] == ["2", "60.00", "75.00", "+15.00", "5.00"]  # z is only in B: left out
    absent = next(line for line in table if line.startswith("absent"))
    assert absent.split()[1:] == ["1", "0.00", "100.00", "+100.00", "0.00"]  # N-Acc, not Dice


def test_stem_readout_measures_marks_on_the_lesion_free_half():
    """benchmarks/stem_readout.py: a one-sided mask's other half is the lesion-free one (none for a
    bilateral or an empty mask), and the marks there are counted and sized."""
    readout = _benchmark("stem_readout")

    truth = np.zeros((64, 64), bool)
    truth[20:30, 5:15] = True  # one lesion, in the first half's columns
    half = readout.lesion_free_half(truth)
    assert half == (slice(None), slice(32, 64))
    both = truth.copy()
    both[20:30, 40:50] = True
    assert readout.lesion_free_half(both) is None and readout.lesion_free_half(np.zeros_like(truth)) is None
    clean, faint, marked = np.zeros_like(truth), np.zeros_like(truth), np.ones_like(truth)
    faint[0, 63] = True
    figures = readout.half_marks([(clean, half), (faint, half), (marked, half)])
    assert figures["marked"] == pytest.approx(2 / 3)
    assert figures["marked_500"] == pytest.approx(1 / 3)  # 64 x 32 = 2,048 px >= MARKED_PIXELS; one px is not
    assert figures["mean_pixels"] == pytest.approx((0 + 1 + 64 * 32) / 3)
    assert readout.half_peaks(np.where(truth, 0.9, 0.2), truth) == [(0.9, False), (0.2, True)]


def test_stem_readout_separation_of_lesion_free_halves():
    """The peak test: AUC 1 and every lesion-free half caught when all their peaks lie below the lesion
    halves'; a lesion-free half that peaks like the lowest lesion halves is not caught (the 3 % cut)."""
    readout = _benchmark("stem_readout")

    lesion = [(0.5 + 0.005 * k, False) for k in range(100)]  # peaks 0.5 .. 0.995
    clean = readout.lesion_free_separation(lesion + [(0.1, True), (0.2, True)])
    assert clean == {"auc": pytest.approx(1.0), "caught": pytest.approx(1.0)}
    mixed = readout.lesion_free_separation(lesion + [(0.1, True), (0.52, True), (0.9, True)])
    assert mixed["caught"] == pytest.approx(1 / 3)  # 0.52 is above the 3 % quantile (0.515)
    assert mixed["auc"] == pytest.approx((100 + 95 + 20) / 300)  # lesion halves ranked above each free one
    with pytest.raises(ValueError, match="with and without"):
        readout.lesion_free_separation(lesion)


def test_adaptation_benchmark_simulated_annotator(tmp_path):
    """benchmarks/adaptation_loop.py --annotator: dilate:K / erode:K redraw every val mask K px wider /
    tighter, in the corrections and the scored truths alike; erosion never empties a present finding."""
    import argparse

    from napari_mris.phantom import write_lvit_dataset
    from napari_mris_train.data import load_split

    loop = _benchmark("adaptation_loop")
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    assert loop.annotator_style("as-is") is None
    wider, tighter = loop.annotator_style("dilate:2")(mask), loop.annotator_style("erode:2")(mask)
    assert wider[8:22, 10:20].all() and not wider[7, 15] and wider.sum() > mask.sum()
    assert tighter[12:18, 12:18].all() and tighter.sum() == 36 and (tighter <= mask).all()
    assert (loop.annotator_style("erode:6")(mask) == mask).all()  # emptied: the drawing stays
    for bad in ("grow:2", "erode:0", "dilate:x", "dilate"):
        with pytest.raises(argparse.ArgumentTypeError, match="annotator style"):
            loop.annotator_style(bad)

    root = write_lvit_dataset(tmp_path / "lvit", n_train=2, n_val=4, size=64, seed=3)
    val = load_split(root, split="val")
    styled = loop.Picked(val, [1, 3], loop.annotator_style("dilate:1"))
    for k, index in enumerate((1, 3)):
        original = val[index].mask
        assert styled[k].image is not None and styled[k].description == val[index].description
        assert styled[k].mask.sum() > original.sum() and (styled[k].mask >= original).all()
    assert (loop.Picked(val, [1])[0].mask == val[1].mask).all()


def test_presence_threshold_is_chosen_on_the_selection_score():
    """answered_at turns findings above the threshold into empty "not present" answers; the choice is the
    threshold with the best selection score (here one that rejects the absent prompt and no present one)."""
    from napari_mris_train.presence import answered_at, choose, false_rejection_ceiling, threshold_table

    def row(kind, p_reject, dice, truth_pixels):
        counts = [round(dice * truth_pixels), truth_pixels, truth_pixels]  # a drawn mask as large as the truth
        found = {"name": kind, "set": kind, "prompt": kind, "dice": dice, "iou": 0.0, "rejected": False}
        found |= {"not_present": False, "reject_probability": p_reject, "counts": counts}
        return found | ({"text_ignored_counts": counts, "oracle_counts": counts} if kind == "side" else {})

    rows = [row("full", 0.2, 0.8, 100), row("side", 0.3, 0.5, 40), row("absent", 0.45, 0.0, 0)]
    turned = answered_at(rows, 0.25)
    assert [r["not_present"] for r in turned] == [False, True, True] and turned[1]["counts"] == [0, 0, 40]
    assert rows[1]["not_present"] is False  # the rows themselves are left alone
    table = threshold_table(rows, thresholds=(0.1, 0.25, 0.35, 0.4, 0.5))
    assert [round(line["n_acc"], 2) for line in table] == [1.0, 1.0, 1.0, 1.0, 0.0]
    best = choose(table, ceiling=0.0)
    assert best["threshold"] == 0.4  # 0.35 and 0.4 tie (full 0.8, side 0.5, N-Acc 1): nearer 0.5 wins
    assert best["false_rejection_rate"] == 0.0 and best["side_dice"] == pytest.approx(0.5)
    # a ceiling on false "not present": a cut that rejects the full description is not allowed, however good
    rows = [row("full", 0.3, 0.1, 100), row("absent", 0.2, 0.0, 0)]
    table = threshold_table(rows, thresholds=(0.1, 0.5))
    assert choose(table, ceiling=1.0)["threshold"] == 0.1  # both "not present": N-Acc 1 outweighs Dice 0.1
    assert false_rejection_ceiling(rows, 0.03) == 0.03  # 0.5 rejects no full description
    assert choose(table, ceiling=false_rejection_ceiling(rows, 0.03))["threshold"] == 0.5


def test_presence_command_writes_the_threshold(tmp_path):
    data = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt is")
        model = build_tiny_model(tmp_path / "model", data_root=data, tokenizer_steps=0, decoder_steps=1)
        out = tmp_path / "presence.json"
        args = ["presence", "--model", str(model), "--data", str(data / "Val_Folder"), "--start", "1", "--limit", "2"]
        assert main([*args, "--device", "cpu", "--json", str(out), "--write"]) == 0
    report = json.loads(out.read_text())
    assert report["start"] == 1 and report["n_images"] == 2 and len(report["table"]) > 50
    chosen, allowed = report["chosen"], [t for t in report["table"] if t["false_rejection_rate"] <= report["ceiling"]]
    assert chosen in allowed and chosen["selection"] == max(line["selection"] for line in allowed)
    assert json.loads((model / "config.json").read_text())["reject_threshold"] == chosen["threshold"]
    assert all(not row["rejected"] for row in report["per_prompt"])  # calibration decodes every finding
