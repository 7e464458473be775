"""`napari-mris predict | info | demo` on the tiny model, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_mris import pipeline as pipeline_module
from napari_mris.cli import main, read_prompt_table
from napari_mris.phantom import make_phantom


def write_split(root: Path, n: int = 3, table: str = "Test_text.csv") -> Path:
    """An LViT split folder of phantoms with different sizes (the masks must come back at each size)."""
    (root / "img").mkdir(parents=True)
    (root / "labelcol").mkdir()
    rows = []
    for i in range(n):
        phantom = make_phantom(i, size=40 + 8 * i)
        Image.fromarray(phantom.image).save(root / "img" / f"case_{i}.png")
        Image.fromarray(phantom.mask.astype(np.uint8) * 255).save(root / "labelcol" / f"mask_case_{i}.png")
        rows.append((f"mask_case_{i}.png", phantom.description))
    with open(root / table, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(["Image", "Description"])
        writer.writerows(rows)
    return root


def read_predictions(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_on_an_lvit_split(tmp_path, tiny_model_dir, capsys) -> None:  # noqa: F811
    split = write_split(tmp_path / "Test_Folder")
    out = tmp_path / "out"
    code = main(["predict", str(split), "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rows = read_predictions(out)
    assert [r["image"] for r in rows] == ["case_0.png", "case_1.png", "case_2.png"]
    assert rows[0]["prompt"] == make_phantom(0, size=40).description  # prompts come from the split's table
    assert {r["rejected"] for r in rows} <= {"true", "false"} and all(float(r["seconds"]) > 0 for r in rows)
    for i in range(3):
        mask = np.asarray(Image.open(out / f"mask_case_{i}.png"))
        assert mask.shape == (40 + 8 * i,) * 2 and set(np.unique(mask)) <= {0, 255}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_predict_files_with_one_prompt_and_with_a_prompt_table(tmp_path, tiny_model_dir) -> None:  # noqa: F811
    split = write_split(tmp_path / "split", n=2)
    images = [str(p) for p in sorted((split / "img").iterdir())]
    out = tmp_path / "one"
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    assert (
        main(["predict", *images, "--prompt", "lower left lung", "--out", str(out), "--order", "raster", *model]) == 0
    )
    assert [r["prompt"] for r in read_predictions(out)] == ["lower left lung"] * 2

    import openpyxl

    book = openpyxl.Workbook()
    book.active.append(["Image", "Description"])
    book.active.append(["case_0.png", "upper right lung"])
    book.active.append(["mask_case_1.png", "middle left lung"])
    book.save(tmp_path / "prompts.xlsx")
    out = tmp_path / "table"
    assert main(["predict", *images, "--prompts", str(tmp_path / "prompts.xlsx"), "--out", str(out), *model]) == 0
    assert [r["prompt"] for r in read_predictions(out)] == ["upper right lung", "middle left lung"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "missing.png", "--prompt", "lung", "--out", "o"], "no such file"),
        (["predict", "{image}", "--prompt", "  ", "--out", "o"], "--prompt is empty"),
        (["predict", "{image}", "--out", "o"], "No prompt for"),
        (["predict", "{image}", "--prompt", "lung"], "required: --out"),
        (["predict", "{image}", "--prompt", "lung", "--out", "o", "--model", "{tmp}/nowhere"], "not found"),
        (["predict", "{image}", "--prompts", "{tmp}/none.csv", "--out", "o"], "description table not found"),
        (["predict", "{image}", "--prompt", "lung", "--out", "o", "--samples", "0", "--model", "{model}"], "samples"),
        (["info", "--model", "{tmp}/nowhere"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, capsys, monkeypatch, args, message) -> None:  # noqa: F811
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(image)
    monkeypatch.chdir(tmp_path)
    filled = [a.format(image=image, tmp=tmp_path, model=tiny_model_dir) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("napari-mris: error:") and message in err, err
    assert "Traceback" not in err


def test_missing_default_model_is_reported(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(pipeline_module, "DEFAULT_MODEL_DIR", tmp_path / "default")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert "default model is not installed" in captured.err
    assert "torch" in captured.out  # versions are printed before the model is looked for


def test_info_prints_model_device_and_versions(tiny_model_dir, capsys) -> None:  # noqa: F811
    from napari_mris.model.modeldir import model_hash

    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert model_hash(tiny_model_dir) in out and "cpu" in out and "transformers" in out


def test_prompt_table_reader_accepts_lvit_conventions(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("Image,Description\nmask_A.png,first\nb.PNG,second\n,orphan\n", encoding="utf-8")
    assert read_prompt_table(path) == {"a": "first", "b": "second"}


@pytest.mark.skipif(
    os.environ.get("QT_QPA_PLATFORM") == "offscreen" and not os.environ.get("DISPLAY"),
    reason="napari's canvas needs OpenGL: run under xvfb-run",
)
def _run_demo(argv: list[str], qtbot, monkeypatch):
    """`napari-mris demo` with napari.run replaced by "wait until the segmentation ends"; returns the widget."""
    import napari

    from napari_mris._widget import MRISWidget

    widgets: list[MRISWidget] = []
    original = MRISWidget.segment

    def segment(self):
        widgets.append(self)
        original(self)

    def run_until_done() -> None:
        qtbot.waitUntil(lambda: widgets and not widgets[0].is_running, timeout=60_000)
        assert widgets[0].prompt() == make_phantom(7).description

    monkeypatch.setattr(MRISWidget, "segment", segment)
    monkeypatch.setattr(napari, "run", run_until_done)
    assert main(["demo", *argv]) == 0
    return widgets[0]


def test_demo_opens_napari_and_segments_the_phantom(tiny_model_dir, qtbot, monkeypatch) -> None:  # noqa: F811
    widget = _run_demo(["--model", str(tiny_model_dir)], qtbot, monkeypatch)
    assert widget.status_label.text().startswith(("Done", "Target not found")), widget.status_label.text()
    widget.viewer.close()


def test_demo_with_the_bundled_model_draws_a_mask(qtbot, monkeypatch) -> None:
    widget = _run_demo([], qtbot, monkeypatch)  # README's first command: no --model, the packaged default
    assert widget.status_label.text().startswith("Done: label 1"), widget.status_label.text()
    assert (widget.viewer.layers["MRIS"].data == 1).any()
    widget.viewer.close()
