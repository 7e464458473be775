"""`napari-mris predict | info | demo` on the tiny model, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_mris import model_location
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
        assert rows[i]["answer"] == ("present" if mask.any() else "not present")  # an empty mask is "not present"
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
        (["predict", "{image}", "--prompt", "lung " * 80, "--out", "o", "--model", "{model}"], "reads at most"),
        (["predict", "{image}", "--prompt", "lung", "--prompt", "Lung ", "--out", "o"], "Finding 2 repeats finding 1"),
        (["predict", "{image}", "--prompt", "lung", "--prompt", "", "--out", "o"], "Finding 2 of 2 is empty"),
        (["predict", "{image}", *[a for i in range(9) for a in ("--prompt", f"zone {i}")], "--out", "o"], "than the 8"),
        (["predict", "{image}", "--prompts", "{tmp}/twice.csv", "--out", "o"], "x.png in the --prompts table: Fin"),
        (["info", "--model", "{tmp}/nowhere"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, capsys, monkeypatch, args, message) -> None:  # noqa: F811
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(image)
    (tmp_path / "twice.csv").write_text("Image,Description\nx.png,upper lung\nx.png,upper lung\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    filled = [a.format(image=image, tmp=tmp_path, model=tiny_model_dir) for a in args]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("napari-mris: error:") and message in err, err
    assert "Traceback" not in err


def test_missing_default_model_is_reported(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(model_location, "DEFAULT_MODEL_DIR", tmp_path / "default")
    monkeypatch.delenv(model_location.ENV_MODEL, raising=False)
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert "default model is not installed" in captured.err
    assert "torch" in captured.out  # versions are printed before the model is looked for


def test_info_prints_model_device_and_versions(tiny_model_dir, capsys) -> None:  # noqa: F811
    from napari_mris.model.modeldir import model_hash

    assert main(["info", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert model_hash(tiny_model_dir) in out and "cpu" in out and "transformers" in out


def test_predict_on_a_plain_folder_of_png_jpeg_tiff(tmp_path, tiny_model_dir, capsys) -> None:  # noqa: F811
    import tifffile

    from napari_mris.model.modeldir import model_hash

    folder = tmp_path / "scans"
    folder.mkdir()
    for i, suffix in enumerate((".png", ".jpg", ".tif")):
        image = make_phantom(i, size=48).image
        if suffix == ".tif":
            tifffile.imwrite(folder / f"case_{i}{suffix}", image)
        else:
            Image.fromarray(image).save(folder / f"case_{i}{suffix}")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = ["predict", str(folder), "--prompt", "lower left lung", "--out", str(out), "--order", "raster"]
    assert main([*args, "--model", str(tiny_model_dir), "--device", "cpu"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("loading the model") and "3 image(s) to segment" in printed[1]
    rows = read_predictions(out)
    assert [r["image"] for r in rows] == ["case_0.png", "case_1.jpg", "case_2.tif"]
    assert sorted(p.name for p in out.glob("mask_*.png")) == ["mask_case_0.png", "mask_case_1.png", "mask_case_2.png"]
    # every row says what produced it: the model (hash over all its files), adapter, order, domain score
    assert list(rows[0]) == [
        "image", "prompt", "answer", "rejected", "seconds", "model_id", "model_hash", "adapter", "order",
        "domain_score", "label", "lesions", "stated_lesions", "reject_probability",
    ]  # fmt: skip
    assert all(0.0 <= float(r["reject_probability"]) <= 1.0 for r in rows)  # how sure a "not present" is
    assert all((r["rejected"] == "true") == (float(r["reject_probability"]) > 0.5) for r in rows)
    assert {r["label"] for r in rows} == {"255"}  # one finding per image: its value in mask_<stem>.png
    assert {r["model_hash"] for r in rows} == {model_hash(tiny_model_dir)} and {r["order"] for r in rows} == {"raster"}
    assert all(r["model_id"] and r["adapter"] == "" for r in rows)


def _one_line_error(capsys, *expected: str) -> str:
    """The captured stdout, after checking that stderr is one `napari-mris: error:` line holding `expected`."""
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("napari-mris: error:") and "Traceback" not in err, err
    assert all(text in err for text in expected), err
    return captured.out


def test_out_is_checked_before_the_model_loads(tmp_path, tiny_model_dir, capsys) -> None:  # noqa: F811
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(image)
    (tmp_path / "taken").write_text("a file")
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    for out, message in ((tmp_path / "taken", "is a file, not a folder"), (tmp_path / "taken" / "below", "")):
        assert main(["predict", str(image), "--prompt", "lung", "--out", str(out), *model]) == 2
        assert "loading the model" not in _one_line_error(capsys, str(out), message)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["predict", str(image), "--prompt", "lung", "--out", str(locked), *model]) == 2
        assert "loading the model" not in _one_line_error(capsys, "not a writable folder")


def test_bad_inputs_print_one_line_and_write_no_mask(tmp_path, tiny_model_dir, capsys) -> None:  # noqa: F811
    import shutil

    import SimpleITK as sitk

    from napari_mris.model.modeldir import write_manifest

    nan_slice = np.ones((32, 32), np.float32)
    nan_slice[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan_slice), str(tmp_path / "nan.nii.gz"))
    good = tmp_path / "x.png"
    Image.fromarray(make_phantom(0, size=32).image).save(good)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(good, mixed / "x.png")
    (mixed / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    damaged = tmp_path / "damaged_model"
    shutil.copytree(tiny_model_dir, damaged, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    write_manifest(damaged)
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    cases = [
        ([str(tmp_path / "nan.nii.gz")], str(tiny_model_dir), "nan.nii.gz: 1 of 1024 pixels are NaN or infinite"),
        ([str(mixed)], str(tiny_model_dir), "holds both DICOM files and PNG/JPEG/TIFF images"),
        ([str(good)], str(damaged), "model.safetensors is damaged or was changed"),
    ]
    for number, (inputs, model, message) in enumerate(cases):
        out = tmp_path / f"out{number}"
        code = main(["predict", *inputs, "--prompt", "lung", "--out", str(out), "--model", model, "--device", "cpu"])
        assert code == 2
        _one_line_error(capsys, message)
        assert not out.exists() or not list(out.glob("mask_*"))


def test_demo_without_a_display_says_so_in_one_line(monkeypatch, capsys) -> None:
    from napari_mris import cli

    monkeypatch.setattr(cli.sys, "platform", "linux")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    assert main(["demo"]) == 2  # not Qt's abort (exit 134 with a core dump)
    _one_line_error(capsys, "no display", "xvfb-run")
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    assert main(["demo"]) == 2
    _one_line_error(capsys, "no display")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")  # the user chose a platform that needs no display
    cli.check_display()
    monkeypatch.delenv("QT_QPA_PLATFORM")
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    cli.check_display()


def test_prompt_table_reader_accepts_lvit_conventions(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("Image,Description\nmask_A.png,first\nb.PNG,second\n,orphan\n", encoding="utf-8")
    assert read_prompt_table(path) == {"a": ["first"], "b": ["second"]}
    path.write_text("Image,Description\na.png,first\nb.png,second\nmask_a.png,third\n", encoding="utf-8")
    assert read_prompt_table(path) == {"a": ["first", "third"], "b": ["second"]}  # several findings, in order


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


def test_demo_zooms_to_the_canvas_left_beside_the_dock(tiny_model_dir, qtbot) -> None:  # noqa: F811
    """napari zooms when the image is added; the dock then narrows the canvas and cropped the image."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_mris._widget import MRISWidget
    from napari_mris.cli import fit_after_docking

    image = make_phantom(7).image
    viewer = napari.Viewer(title="zoom test")
    try:
        viewer.window.resize(1200, 800)  # a desktop-sized window (the virtual X screen of the tests is small)
        QApplication.processEvents()
        viewer.add_image(image)
        widget = MRISWidget(viewer, model=tiny_model_dir)
        viewer.window.add_dock_widget(widget, name="MRIS", area="right")
        widget.set_prompt(make_phantom(7).description)
        fit_after_docking(viewer, widget)
        zoom, canvas_width = viewer.camera.zoom, viewer.window._qt_viewer.canvas.size[1]
        assert zoom * image.shape[1] <= canvas_width  # the whole width is visible
        for _ in range(5):  # the layout had settled: more events do not change the canvas
            QApplication.processEvents()
        viewer.reset_view()
        assert viewer.camera.zoom == pytest.approx(zoom)
    finally:
        viewer.close()


def test_demo_opens_napari_and_segments_the_phantom(tiny_model_dir, qtbot, monkeypatch) -> None:  # noqa: F811
    widget = _run_demo(["--model", str(tiny_model_dir)], qtbot, monkeypatch)
    assert widget.status_label.text().startswith(("Done", "Not present")), widget.status_label.text()
    widget.viewer.close()


def test_demo_with_the_bundled_model_draws_a_mask(qtbot, monkeypatch) -> None:
    widget = _run_demo([], qtbot, monkeypatch)  # README's first command: no --model, the packaged default
    assert widget.status_label.text().startswith("Done: label 1"), widget.status_label.text()
    assert (widget.viewer.layers["MRIS"].data == 1).any()
    widget.viewer.close()


def test_several_findings_give_one_label_image_and_a_row_each(tmp_path, tiny_pipeline, monkeypatch) -> None:  # noqa: F811
    """--prompt repeated (none replaces another) and a --prompts table with two rows for one image: a label PNG
    whose label k is the k-th finding, as findings.label_map makes it from the pipeline's own results."""
    from _model_fixtures import force_drawing

    from napari_mris.findings import label_map
    from napari_mris.io import read_slice

    split = write_split(tmp_path / "split", n=2)
    images = sorted((split / "img").iterdir())
    monkeypatch.setattr(
        pipeline_module.MRISPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_pipeline)
    )
    findings = ["lower left lung", "Bilateral pulmonary infection, two infected areas"]
    out = tmp_path / "repeated"
    with force_drawing(tiny_pipeline):
        args = ["predict", str(images[0]), "--prompt", findings[0], "--prompt", findings[1], "--out", str(out)]
        assert main([*args, "--order", "scale", "--instances"]) == 0
        image = read_slice(images[0], expect_2d=True)
        results = tiny_pipeline.segment_findings(image.pixels, findings, window=image.window, order="scale")
    rows = read_predictions(out)
    assert [(r["prompt"], r["label"]) for r in rows] == [(findings[0], "1"), (findings[1], "2")]
    assert not (out / "mask_case_0.png").exists()
    labels = np.asarray(Image.open(out / "labels_case_0.png"))
    np.testing.assert_array_equal(labels, label_map([r.mask for r in results], [r.probability for r in results]))
    assert labels.any() and set(np.unique(labels)) <= {0, 1, 2}
    assert [r["stated_lesions"] for r in rows] == ["", "2"] and all(r["lesions"].isdigit() for r in rows)
    for k, result in enumerate(results, start=1):
        lesions = np.asarray(Image.open(out / f"instances_case_0_{k}.png"))
        assert np.array_equal(lesions > 0, result.mask) and int(lesions.max()) == int(rows[k - 1]["lesions"])

    (tmp_path / "table.csv").write_text(
        f"Image,Description\ncase_0.png,{findings[0]}\ncase_1.png,upper right lung\nmask_case_0.png,middle left lung\n",
        encoding="utf-8",
    )
    out = tmp_path / "table"
    assert main(["predict", *map(str, images), "--prompts", str(tmp_path / "table.csv"), "--out", str(out)]) == 0
    rows = read_predictions(out)
    assert [(r["image"], r["prompt"], r["label"]) for r in rows] == [
        ("case_0.png", findings[0], "1"),
        ("case_0.png", "middle left lung", "2"),
        ("case_1.png", "upper right lung", "255"),  # one finding: today's 0/255 mask_<stem>.png
    ]
    assert (out / "labels_case_0.png").is_file() and (out / "mask_case_1.png").is_file()
    assert not (out / "labels_case_1.png").exists() and rows[0]["lesions"] == ""  # no --instances: no counts
