"""`napari-mris`: predict masks for files or LViT folders, open the demo, print model information.

    napari-mris predict INPUT... (--prompt TEXT | --prompts FILE.csv|.xlsx) --out DIR [--model DIR]
                        [--order scale|raster] [--samples N] [--allow-out-of-domain] [--device auto|cpu|cuda]
    napari-mris demo [--model DIR]
    napari-mris info [--model DIR] [--device auto|cpu|cuda]

Every problem a user can cause (missing file, bad table, empty prompt, missing model) ends the command with
one line on stderr and exit code 2, never a traceback. `predict` rewrites `predictions.csv` after every
image, atomically, so an interrupted run leaves a table that matches the masks already written. An image
the model's domain guard flags is refused (one line, no mask); exit code 3 when no input was segmented.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from napari_mris import __version__
from napari_mris.errors import DatasetError, MRISError, PromptError
from napari_mris.io.text_table import find_text_file, read_text_table

if TYPE_CHECKING:  # torch is imported only by the commands that need it
    from napari_mris.pipeline import SegmentationResult

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_NOTHING_SEGMENTED = 3  # every input was refused as out of domain (see --allow-out-of-domain)
MASK_PREFIX = "mask_"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PREDICTION_COLUMNS = [
    "image", "prompt", "answer", "rejected", "seconds", "model_id", "model_hash", "adapter", "order", "domain_score"
]  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of usage text + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MRISError(f"{message} (see {self.prog} --help)")


@dataclass
class Job:
    """One image to segment and the prompt to use for it."""

    image: Path
    prompt: str


# ---------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except MRISError as exc:
        print(f"napari-mris: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"napari-mris: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("napari-mris: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with a way to see the traceback
        if os.environ.get("NAPARI_MRIS_DEBUG"):
            raise
        print(
            f"napari-mris: internal error: {type(exc).__name__}: {exc} (set NAPARI_MRIS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_BUG


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="napari-mris", description="Medical referring image segmentation with a token model.")
    parser.add_argument("--version", action="version", version=f"napari-mris {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    predict = commands.add_parser("predict", help="write a mask PNG per input image and predictions.csv")
    predict.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="image files, DICOM folders or LViT split folders"
    )
    prompts = predict.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="one description used for every input")
    prompts.add_argument(
        "--prompts", type=Path, metavar="FILE", help="table (.csv/.xlsx) with columns Image, Description"
    )
    predict.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    _model_options(predict)
    predict.add_argument(
        "--order", choices=("scale", "raster"), help="coarse-to-fine or raster (default: the model's default_order)"
    )
    predict.add_argument("--samples", type=int, default=1, help="N > 1: consensus of N sampled masks")
    predict.add_argument("--beam", type=int, default=1, help="beam width (raster order only)")
    predict.add_argument(
        "--no-snap", action="store_true", help="the token mask as decoded, not snapped to the lesion map"
    )
    predict.add_argument(
        "--allow-out-of-domain",
        action="store_true",
        help="segment images the model's domain guard flags as unlike its training images (refused by default)",
    )
    predict.set_defaults(run=run_predict)

    demo = commands.add_parser("demo", help="open napari with a phantom chest X-ray and segment its description")
    demo.add_argument("--model", default="default", help="model directory (default: the packaged model)")
    demo.add_argument("--seed", type=int, default=7, help="which phantom to draw")
    demo.set_defaults(run=run_demo)

    info = commands.add_parser("info", help="print the model, the device and software versions")
    _model_options(info)
    info.set_defaults(run=run_info)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="model directory (default: the packaged model)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter name inside the model directory")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")


# ---------------------------------------------------------------------- predict


def run_predict(args: argparse.Namespace) -> int:
    from napari_mris.io import read_slice, write_png
    from napari_mris.io.atomic import write_text_atomic
    from napari_mris.pipeline import MRISPipeline

    jobs = collect_jobs(args.inputs, args.prompt, args.prompts)
    _check_unique_stems(jobs)
    check_out_dir(args.out)
    print(f"loading the model ({args.model}) ...", flush=True)
    start = time.perf_counter()
    pipeline = MRISPipeline.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    verified = "weights verified" if pipeline.weights_verified else "weights not verified: no SHA256SUMS"
    print(
        f"model {pipeline.model_id} (hash {pipeline.model_hash}, {verified}) on {pipeline.device} in "
        f"{time.perf_counter() - start:.1f} s; {len(jobs)} image(s) to segment", flush=True,
    )  # fmt: skip
    settings = pipeline.settings(order=args.order, samples=args.samples, beam=args.beam, snap=not args.no_snap)
    for prompt in dict.fromkeys(job.prompt for job in jobs):  # a prompt the model cannot use fails before any work
        pipeline.check_prompt(prompt)
    rows: list[dict[str, str]] = []
    refused = 0
    for number, job in enumerate(jobs, start=1):
        start = time.perf_counter()
        image = read_slice(job.image, expect_2d=True)
        domain = pipeline.domain(image.pixels, image.window)
        if domain is not None and domain.out_of_domain and not args.allow_out_of_domain:
            refused += 1
            note = "--allow-out-of-domain segments it anyway"
            print(f"[{number}/{len(jobs)}] {job.image.name}: refused, {domain.message()} ({note})", flush=True)
            continue
        with warnings.catch_warnings():  # the tokenizer's truncation warning is printed below as a note
            warnings.simplefilter("ignore", UserWarning)
            result = pipeline.segment(
                image.pixels, job.prompt, window=image.window, order=settings.order, samples=settings.samples,
                temperature=settings.temperature, beam=settings.beam, snap=settings.snap,
            )  # fmt: skip
        write_png(args.out / f"{MASK_PREFIX}{_stem(job.image)}.png", result.mask, binary=True)
        seconds = time.perf_counter() - start
        rows.append(_prediction_row(job, result, seconds))
        write_text_atomic(args.out / "predictions.csv", _predictions_csv(rows))
        verdict = f"{int(result.mask.sum())} pixels"
        if result.not_present:
            verdict = "not present (" + ("the model answered [REJ]" if result.rejected else "no lesion drawn") + ")"
        notes = "".join(f" ({note})" for note in result.warnings)
        print(f"[{number}/{len(jobs)}] {job.image.name}: {verdict}, {seconds:.2f} s{notes}", flush=True)
    if refused and refused == len(jobs):
        which = "the image was" if refused == 1 else f"all {refused} images were"
        print(f"napari-mris: nothing was segmented: {which} refused as out of domain", file=sys.stderr)
        return EXIT_NOTHING_SEGMENTED
    return 0


def collect_jobs(inputs: list[Path], prompt: str | None, prompts_file: Path | None) -> list[Job]:
    """Expand LViT split folders and folders of PNG/JPEG/TIFF images to their images (a folder with neither
    is one DICOM series) and give every image its prompt."""
    table = read_prompt_table(prompts_file) if prompts_file is not None else None
    jobs: list[Job] = []
    for item in inputs:
        if not item.exists():
            raise DatasetError(f"{item}: no such file or folder")
        image_dir = _child(item, "img") if item.is_dir() else None
        if image_dir is None:
            images = _folder_images(item) if item.is_dir() else []
            jobs.extend(Job(path, _prompt_for(path, prompt, table, None)) for path in images or [item])
            continue
        split_table = table if (prompt is not None or table is not None) else read_prompt_table(find_text_file(item))
        images = sorted(
            p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise DatasetError(f"{image_dir}: no images (.png/.jpg/.tif) in this LViT img/ folder")
        jobs.extend(Job(path, _prompt_for(path, prompt, split_table, item)) for path in images)
    return jobs


def _folder_images(folder: Path) -> list[Path]:
    """The PNG/JPEG/TIFF files of a plain folder (its subfolders are not searched); [] for a DICOM series
    folder. A folder holding both kinds is refused: which of them was meant would be a guess."""
    from napari_mris.io.dicom import folder_has_dicom
    from napari_mris.io.raster import RASTER_SUFFIXES

    images = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in RASTER_SUFFIXES and p.is_file() and p.name[0] != "."
    )
    if images and folder_has_dicom(folder):
        raise DatasetError(
            f"{folder} holds both DICOM files and PNG/JPEG/TIFF images; give the files you mean, or separate them"
        )
    return images


def _prompt_for(image: Path, prompt: str | None, table: dict[str, str] | None, split: Path | None) -> str:
    if prompt is not None:
        if not prompt.strip():
            raise PromptError("--prompt is empty; describe the finding, e.g. --prompt 'lower left lung'")
        return prompt
    if table is None:
        raise MRISError(
            f"No prompt for {image.name}: give --prompt TEXT or --prompts FILE (columns Image, Description)"
        )
    text = table.get(_key(image.name))
    if not text:
        where = f"the description table of {split}" if split is not None else "the --prompts table"
        raise PromptError(f"No description for {image.name} in {where}")
    return text


def read_prompt_table(path: Path) -> dict[str, str]:
    """{image key: description} from an LViT table (columns Image, Description; .csv with , ; or tab, or .xlsx)."""
    table: dict[str, str] = {}
    for image, text in read_text_table(path):
        if image and text:
            table.setdefault(_key(image), text)
    return table


def _key(name: str) -> str:
    """`mask_abc.png`, `abc.png` and `abc` all name image `abc` (case-insensitive)."""
    stem = Path(name.replace("\\", "/")).name.lower()
    if Path(stem).suffix in IMAGE_SUFFIXES + (".dcm",):
        stem = Path(stem).stem
    return stem[len(MASK_PREFIX) :] if stem.startswith(MASK_PREFIX) else stem


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def _check_unique_stems(jobs: list[Job]) -> None:
    seen: dict[str, Path] = {}
    for job in jobs:
        stem = _stem(job.image)
        if stem in seen:
            raise DatasetError(f"{job.image} and {seen[stem]} would both write mask_{stem}.png; rename one of them")
        seen[stem] = job.image


def _child(folder: Path, name: str) -> Path | None:
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name), None)


def _prediction_row(job: Job, result: SegmentationResult, seconds: float) -> dict[str, str]:
    """One predictions.csv row: the answer plus what produced it, so a table stays traceable on its own."""
    return {
        "image": job.image.name,
        "prompt": job.prompt,
        "answer": "not present" if result.not_present else "present",  # [REJ], or nothing drawn
        "rejected": str(bool(result.rejected)).lower(),
        "seconds": f"{seconds:.3f}",
        "model_id": result.model_id,
        "model_hash": result.model_hash,
        "adapter": result.adapter or "",
        "order": result.settings.order,
        "domain_score": "" if result.domain_score is None else f"{result.domain_score:.4g}",  # "": no guard
    }


def _predictions_csv(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_out_dir(out: Path) -> None:
    """Fail before the model loads when `--out` cannot take the results: a file, or a folder (existing or
    created here) that refuses a test file. The probe writes, because permission bits do not tell (root
    ignores them; read-only mounts and full quotas do not show in them)."""
    if out.exists() and not out.is_dir():
        raise MRISError(f"--out {out} is a file, not a folder; give a folder for the masks and predictions.csv")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise MRISError(f"--out {out} is not a writable folder ({exc.strerror or exc})") from exc


# ---------------------------------------------------------------------- demo and info


def run_demo(args: argparse.Namespace) -> int:
    """napari with a phantom chest X-ray, the widget docked, its description typed in and Segment pressed."""
    check_display()
    import napari
    import numpy as np

    from napari_mris._widget import MRISWidget
    from napari_mris.io import Slice
    from napari_mris.phantom import make_phantom
    from napari_mris.pipeline import resolve_model_dir

    model = resolve_model_dir(args.model)  # a missing model fails here, before a window opens
    phantom = make_phantom(args.seed)
    source = Slice(phantom.image, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=np.eye(2), name="phantom")
    viewer = napari.Viewer(title="napari-mris demo")
    viewer.add_image(phantom.image, name="phantom chest X-ray", metadata={"mris_slice": source})
    widget = MRISWidget(viewer, model=model)
    viewer.window.add_dock_widget(widget, name="MRIS", area="right")
    widget.set_prompt(phantom.description)
    widget.segment()
    fit_after_docking(viewer, widget)
    napari.run()
    return 0


DESKTOP_PLATFORMS = ("xcb", "wayland", "wayland-egl")  # Qt platform plugins that need a display server


def check_display() -> None:
    """Refuse to open napari without a display: Qt would abort the process (a core dump, exit 134) before
    Python could say why. Other Qt platforms (offscreen, vnc, eglfs) and macOS/Windows are left to Qt."""
    if sys.platform in ("win32", "darwin") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    chosen = {name.split(":")[0] for name in os.environ.get("QT_QPA_PLATFORM", "").split(";") if name}
    if chosen - set(DESKTOP_PLATFORMS):
        return
    raise MRISError(
        "the demo opens a napari window, but there is no display (DISPLAY and WAYLAND_DISPLAY are unset); run it "
        "in a desktop session, over ssh -X, or under xvfb-run (napari-mris predict needs no display)"
    )


def fit_after_docking(viewer, dock_widget) -> None:
    """Zoom to the image again once the dock has narrowed the canvas: napari zoomed when the image layer was
    added, to the wider canvas, which left the image cropped. Qt lays the dock out on its event loop, in
    more than one pass (a layout posts another layout request), so run it until the dock is at its size."""
    from qtpy.QtWidgets import QApplication

    for _ in range(10):
        width = dock_widget.width()
        QApplication.processEvents()
        if dock_widget.width() == width >= min(dock_widget.minimumSizeHint().width(), dock_widget.maximumWidth()):
            break
    viewer.reset_view()


def run_info(args: argparse.Namespace) -> int:
    from napari_mris.export import software_versions
    from napari_mris.pipeline import MRISPipeline

    for name, version in software_versions().items():
        print(f"{name:13s} {version}")
    info = MRISPipeline.from_pretrained(args.model, device=args.device, adapter=args.adapter).info()
    print(f"{'model':13s} {info['model_id']} (hash {info['model_hash']})")
    verified = "verified against SHA256SUMS" if info["weights_verified"] else "not verified (no SHA256SUMS manifest)"
    print(f"{'weights':13s} {verified}")
    print(f"{'model dir':13s} {info['model_dir']}")
    print(f"{'adapter':13s} {info['adapter'] or 'none'}")
    print(f"{'device':13s} {info['device']}")
    print(f"{'orders':13s} {', '.join(info['orders'])}")
    print(f"{'image size':13s} {info['image_size']} px")
    print(f"{'parameters':13s} {info['parameters']:,} (decoder)")
    threshold = info.get("domain_threshold")
    guard = "none (no domain.safetensors)" if threshold is None else f"threshold {threshold:.2f} (domain.safetensors)"
    print(f"{'domain guard':13s} {guard}")
    words = info.get("prompt_vocabulary")
    print(f"{'prompt words':13s} {', '.join(words) if words else 'not checked (no prompt_vocabulary.json)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
