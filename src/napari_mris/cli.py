"""`napari-mris`: predict masks for files or LViT folders, open the demo, print model information.

    napari-mris predict INPUT... (--prompt TEXT [--prompt TEXT ...] | --prompts FILE.csv|.xlsx) --out DIR
                        [--model DIR] [--order scale|raster] [--samples N] [--instances] [--allow-out-of-domain]
                        [--device auto|cpu|cuda]
    napari-mris demo [--model DIR]
    napari-mris info [--model DIR] [--device auto|cpu|cuda]

Every problem a user can cause (missing file, bad table, empty prompt, missing model) ends the command with
one line on stderr and exit code 2, never a traceback. `predict` rewrites `predictions.csv` after every
image, atomically, so an interrupted run leaves a table that matches the masks already written. An image
the model's domain guard flags is refused (one line, no mask); exit code 3 when no input was segmented.
Several findings of one image (`--prompt` repeated, or several rows of a `--prompts` table) are decoded in
one call (the image read once) into one label PNG, label k for the k-th finding (findings.label_map).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from napari_mris import __version__
from napari_mris.errors import DatasetError, MRISError, PromptError
from napari_mris.findings import check_findings
from napari_mris.io.text_table import find_text_file, read_text_table

if TYPE_CHECKING:  # torch is imported only by the commands that need it
    from napari_mris.pipeline import SegmentationResult

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_NOTHING_SEGMENTED = 3  # every input was refused as out of domain (see --allow-out-of-domain)
MASK_PREFIX = "mask_"
LABELS_PREFIX = "labels_"  # several findings of one image: label k = the k-th finding, 0 background
INSTANCES_PREFIX = "instances_"  # --instances: each finding's lesions numbered 1..n
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PREDICTION_COLUMNS = [
    "image",
    "prompt",
    "answer",
    "rejected",
    "seconds",
    "model_id",
    "model_hash",
    "adapter",
    "order",
    "domain_score",
    "label",
    "lesions",
    "stated_lesions",
    "reject_probability",
]  # new columns go at the end: readers that index columns keep working


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit 2) instead of usage text + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MRISError(f"{message} (see {self.prog} --help)")


@dataclass
class Job:
    """One image to segment and its findings, in the order given (label k = the k-th)."""

    image: Path
    prompts: list[str]


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
    prompts.add_argument(
        "--prompt", action="append", help="a finding's description used for every input; repeat it for several"
    )
    prompts.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="table (.csv/.xlsx) with columns Image, Description; several rows of one image are several findings",
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
        "--instances",
        action="store_true",
        help="also number each finding's connected lesions (instances_<stem>.png) and count them against the prompt",
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
    from napari_mris.io import read_slice
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
    for prompt in dict.fromkeys(p for job in jobs for p in job.prompts):  # a prompt the model cannot use fails first
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
        results = pipeline.segment_findings(
            image.pixels, job.prompts, window=image.window, order=settings.order, samples=settings.samples,
            temperature=settings.temperature, beam=settings.beam, snap=settings.snap,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        lines = _write_findings(args.out, job, results, instances=args.instances)
        spent = _seconds(results, seconds)
        for k, (result, line) in enumerate(zip(results, lines, strict=True), start=1):
            rows.append(_prediction_row(job, result, 255 if len(results) == 1 else k, spent[k - 1], line.lesions))
        write_text_atomic(args.out / "predictions.csv", _predictions_csv(rows))
        if len(results) == 1:
            line = lines[0]
            print(f"[{number}/{len(jobs)}] {job.image.name}: {line.verdict}, {seconds:.2f} s{line.notes}", flush=True)
            continue
        print(f"[{number}/{len(jobs)}] {job.image.name}: {len(results)} findings, {seconds:.2f} s", flush=True)
        for k, line in enumerate(lines, start=1):
            print(f"    label {k} ({job.prompts[k - 1]}): {line.verdict}{line.notes}", flush=True)
    if refused and refused == len(jobs):
        which = "the image was" if refused == 1 else f"all {refused} images were"
        print(f"napari-mris: nothing was segmented: {which} refused as out of domain", file=sys.stderr)
        return EXIT_NOTHING_SEGMENTED
    return 0


def _seconds(results: list[SegmentationResult], total: float) -> list[float]:
    """Each finding's equal share of its image's time: greedy findings are decoded together, one batch row
    each, so no step belongs to one of them alone; the rows of an image add up to its time."""
    return [total / len(results)] * len(results)


@dataclass
class _FindingLine:
    """What the command says about one finding, and its lesion counts for predictions.csv (--instances)."""

    verdict: str
    notes: str  # " (note) (note)": the prompt check's, the domain guard's, the lesion count's
    lesions: tuple[int, int | None] | None  # (drawn, stated in the prompt) with --instances


def _write_findings(out: Path, job: Job, results: list[SegmentationResult], *, instances: bool) -> list[_FindingLine]:
    """mask_<stem>.png (0/255) for one finding, labels_<stem>.png (label k = finding k) for several; with
    `instances`, each finding's lesions numbered in instances_<stem>[_k].png."""
    from napari_mris.findings import instances as split_instances
    from napari_mris.findings import label_map
    from napari_mris.io import write_png

    stem = _stem(job.image)
    if len(results) == 1:
        write_png(out / f"{MASK_PREFIX}{stem}.png", results[0].mask, binary=True)
    else:
        labels = label_map([r.mask for r in results], [r.probability for r in results])
        write_png(out / f"{LABELS_PREFIX}{stem}.png", labels, binary=False)
    lines = []
    for k, result in enumerate(results, start=1):
        verdict = f"{int(result.mask.sum())} pixels"
        if result.not_present:
            verdict = "not present (" + ("the model answered [REJ]" if result.rejected else "no lesion drawn") + ")"
        notes = list(result.warnings)
        lesions = None
        if instances:
            found = split_instances(result.mask, result.prompt)
            suffix = "" if len(results) == 1 else f"_{k}"
            write_png(out / f"{INSTANCES_PREFIX}{stem}{suffix}.png", found.labels, binary=False)
            verdict += f", {found.count} lesion{'s' if found.count != 1 else ''}"
            notes += [found.note] if found.note else []
            lesions = (found.count, found.stated)
        lines.append(_FindingLine(verdict, "".join(f" ({note})" for note in notes), lesions))
    return lines


def collect_jobs(inputs: list[Path], prompt: list[str] | None, prompts_file: Path | None) -> list[Job]:
    """Expand LViT split folders and folders of PNG/JPEG/TIFF images to their images (a folder with neither
    is one DICOM series) and give every image its findings: all `--prompt`s, all its rows of a `--prompts`
    table, or the first description of an LViT split's own table (one mask per image there)."""
    if prompt is not None:
        prompt = _checked_prompts(prompt)
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
        split_table = table
        if prompt is None and table is None:  # the dataset's own descriptions: one finding per image
            split_table = {k: v[:1] for k, v in read_prompt_table(find_text_file(item)).items()}
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


def _checked_prompts(prompts: list[str]) -> list[str]:
    """The `--prompt` values, checked as a list of findings (findings.check_findings) before the model loads."""
    if len(prompts) == 1 and not prompts[0].strip():
        raise PromptError("--prompt is empty; describe the finding, e.g. --prompt 'lower left lung'")
    try:
        return check_findings(prompts)
    except PromptError as exc:
        raise PromptError(f"--prompt: {exc}") from exc


def _prompt_for(
    image: Path, prompt: list[str] | None, table: dict[str, list[str]] | None, split: Path | None
) -> list[str]:
    if prompt is not None:
        return prompt
    if table is None:
        raise MRISError(
            f"No prompt for {image.name}: give --prompt TEXT or --prompts FILE (columns Image, Description)"
        )
    texts = table.get(_key(image.name))
    if not texts:
        where = f"the description table of {split}" if split is not None else "the --prompts table"
        raise PromptError(f"No description for {image.name} in {where}")
    try:
        return check_findings(texts)
    except PromptError as exc:
        raise PromptError(f"{image.name} in the --prompts table: {exc}") from exc


def read_prompt_table(path: Path) -> dict[str, list[str]]:
    """{image key: its descriptions, in table order} from an LViT table (columns Image, Description; .csv with
    , ; or tab, or .xlsx). Several rows of one image are several findings of it."""
    table: dict[str, list[str]] = {}
    for image, text in read_text_table(path):
        if image and text:
            table.setdefault(_key(image), []).append(text)
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
            raise DatasetError(f"{job.image} and {seen[stem]} would both write *_{stem}.png; rename one of them")
        seen[stem] = job.image


def _child(folder: Path, name: str) -> Path | None:
    return next((p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name), None)


def _prediction_row(
    job: Job, result: SegmentationResult, label: int, seconds: float, lesions: tuple[int, int | None] | None
) -> dict[str, str]:
    """One predictions.csv row per finding: the answer plus what produced it, so a table stays traceable on its
    own. `label` is the finding's pixel value in its file (255 in mask_<stem>.png, k in labels_<stem>.png)."""
    drawn, stated = lesions if lesions is not None else ("", None)
    return {
        "image": job.image.name,
        "prompt": result.prompt,
        "answer": "not present" if result.not_present else "present",  # [REJ], or nothing drawn
        "rejected": str(bool(result.rejected)).lower(),
        "seconds": f"{seconds:.3f}",
        "model_id": result.model_id,
        "model_hash": result.model_hash,
        "adapter": result.adapter or "",
        "order": result.settings.order,
        "domain_score": "" if result.domain_score is None else f"{result.domain_score:.4g}",  # "": no guard
        "label": str(label),
        "lesions": str(drawn),  # --instances: the finding's 8-connected lesions
        "stated_lesions": "" if stated is None else str(stated),  # the count its prompt states, if any
        "reject_probability": "" if result.reject_probability is None else f"{result.reject_probability:.4f}",
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
    from napari_mris.model_location import resolve_model_dir
    from napari_mris.phantom import make_phantom

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
    print(f"{'not present':13s} when p([REJ]) > {info['reject_threshold']:.2f} (config.json reject_threshold)")
    words = info.get("prompt_vocabulary")
    print(f"{'prompt words':13s} {', '.join(words) if words else 'not checked (no prompt_vocabulary.json)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
