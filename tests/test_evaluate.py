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
    for key in ("dice", "miou", "false_rejection_rate", "shuffled_dice", "n_acc", "n_absent", "model_hash"):
        assert key in report
    assert report["n_images"] == 2 and len(report["per_image"]) == 2
    assert report["dice"] == pytest.approx(np.mean([r["dice"] for r in report["per_image"]]))
    assert report["miou"] == pytest.approx(np.mean([r["iou"] for r in report["per_image"]]))
    assert report["false_rejection_rate"] == pytest.approx(np.mean([r["rejected"] for r in report["per_image"]]))
    assert report["n_absent"] == sum("absent_rejected" in r for r in report["per_image"]) > 0
    assert 0.0 <= report["dice"] <= 1.0
