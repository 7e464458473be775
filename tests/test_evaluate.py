"""Metrics by hand, and the eval command's JSON on a tiny model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from napari_mris_train.cli import main
from napari_mris_train.metrics import dice_iou
from napari_mris_train.tiny import build_tiny_model


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
    with pytest.raises(SystemExit):  # a misspelt set is an argparse error, before the model loads
        main(["eval", "--model", str(model), "--data", str(data / "Val_Folder"), "--sets", "full,sides"])
