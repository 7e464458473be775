"""Domain guard of a model: false alarms on chest X-rays, detections on CT, MR, natural images and noise.

Every image goes through the runtime path (`read_slice`, `MRISPipeline.domain`), so a flagged image here is
one `napari-mris predict` refuses. `--compare` adds the alternative the guard was chosen against: the image
tokenizer's reconstruction error (mean squared, on the model image), with its threshold set the same way
(at most 1 % of Val_Folder above it). `--sweep` refits the statistics (Train_Folder plus `--extra-train`)
for several covariance shrinkages and prints false alarms and detections for each (several minutes).

    python benchmarks/domain_guard.py --data ../shared/data/QaTa-COV19 --ct ../shared/data/ct-3slice \
        --extra-train runs/phantoms224 [--compare] [--sweep]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import skimage.color
import skimage.data
import torch

from napari_mris.errors import MRISError
from napari_mris.io import read_slice
from napari_mris.pipeline import MRISPipeline
from napari_mris.tokenizers.preprocess import to_model_image

# pydicom's bundled single-frame grayscale images (its test files; RGB, multi-frame and 10x10 dose grids left out).
PYDICOM_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000.dcm",
    "JPEG-lossy.dcm",
    "examples_overlay.dcm",
    "image_dfl.dcm",
)
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
    "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "shepp_logan_phantom", "text",
)  # fmt: skip
SHRINKAGES = (0.001, 0.003, 0.01, 0.03)


def model_image(pipeline: MRISPipeline, pixels: np.ndarray, window) -> torch.Tensor:
    return torch.from_numpy(to_model_image(pixels, window, pipeline.image_size))[None, None]


def image_sets(args: argparse.Namespace) -> dict[str, list[tuple[str, np.ndarray, tuple | None]]]:
    """{group: [(name, pixels, window)]}; pixels are read lazily for the big folders (see `folder`)."""
    sets: dict[str, list] = {}
    if args.ct is not None:
        sets["CT slices, ct-3slice"] = [dicom(path) for path in sorted(Path(args.ct).glob("0*.dcm"))]
    bundled = Path(pydicom.__file__).parent / "data" / "test_files"
    read, unreadable = [], []
    for name in PYDICOM_FILES:
        try:
            read.append(dicom(bundled / name))
        except MRISError as exc:
            unreadable.append(f"{name} ({str(exc).split(': ')[-1][:60]})")
    sets["pydicom CT/MR/NM/OT test files"] = read
    if unreadable:
        print("not readable here, left out:", "; ".join(unreadable))
    natural = []
    for name in SKIMAGE_IMAGES:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 3:
            pixels = skimage.color.rgb2gray(pixels[..., :3])
        natural.append((name, pixels.astype(np.float32), None))
    sets["scikit-image natural images (gray)"] = natural
    rng = np.random.default_rng(0)
    noise = [(f"uniform {k}", rng.random((224, 224)).astype(np.float32), None) for k in range(10)]
    noise += [(f"gaussian {k}", rng.normal(size=(512, 512)).astype(np.float32), None) for k in range(10)]
    sets["random noise (uniform 224 px, gaussian 512 px)"] = noise
    return sets


def dicom(path: Path) -> tuple[str, np.ndarray, tuple | None]:
    image = read_slice(path, expect_2d=True)
    return path.name, image.pixels, image.window


def folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (or 'default')")
    parser.add_argument("--data", type=Path, required=True, help="LViT root: Val_Folder is the false-alarm set")
    parser.add_argument("--ct", type=Path, help="ct-3slice folder (01.dcm..03.dcm)")
    parser.add_argument("--extra-train", type=Path, action="append", default=[], help="phantom root (Val_Folder)")
    parser.add_argument("--compare", action="store_true", help="also the image tokenizer's reconstruction error")
    parser.add_argument("--sweep", action="store_true", help="refit for several shrinkages (needs Train_Folder)")
    parser.add_argument("--details", action="store_true", help="print every small-set image's score")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)  # pydicom's notes on its deliberately odd test files

    pipeline = MRISPipeline.from_pretrained(args.model, device="cpu")
    guard = pipeline.domain_guard
    if guard is None:
        raise SystemExit(f"{pipeline.model_dir} has no domain guard (napari-mris-train domain writes one)")
    stem = pipeline.decoder.pixel_stem
    print(f"model {pipeline.model_id}, threshold {guard.threshold:.2f}, shrinkage {guard.info.get('shrinkage')}")

    rows, features, recon = [], {}, {}
    seconds = []

    def score_group(group: str, items, in_domain: bool) -> None:
        from napari_mris.domain import stem_features

        scores, errors, feats = [], [], []
        for name, pixels, window in items:
            start = time.perf_counter()
            check = pipeline.domain(pixels, window)
            seconds.append(time.perf_counter() - start)
            scores.append(check.score)
            image = model_image(pipeline, pixels, window)
            with torch.inference_mode():
                if args.sweep:
                    feats.append(stem_features(stem, image))
                if args.compare:
                    out = pipeline.tokenizers.image(image).reconstruction.clamp(0, 1)
                    errors.append(float(((out - image) ** 2).mean()))
            if args.details and not in_domain:
                print(f"  {group[:20]:20s} {name:36s} {check.score:8.2f}")
        flagged = sum(s > guard.threshold for s in scores)
        rows.append((group, len(scores), flagged, in_domain, min(scores), max(scores)))
        recon[group] = (errors, in_domain)
        if feats:
            features[group] = (torch.cat(feats), in_domain)

    def lazy(paths):
        for path in paths:
            image = read_slice(path, expect_2d=True)
            yield path.name, image.pixels, image.window

    val = folder_images(args.data / "Val_Folder" / "img")
    score_group(f"QaTa-COV19 Val_Folder (calibration set), {len(val)}", lazy(val), True)
    samples = folder_images(Path(__file__).resolve().parents[1] / "sample_data" / "img")
    score_group("sample_data phantoms (bundled)", lazy(samples), True)
    for root in args.extra_train:
        phantoms = folder_images(root / "Val_Folder" / "img")
        score_group(f"phantom Val_Folder of {root.name} (not in the statistics)", lazy(phantoms), True)
    for group, items in image_sets(args).items():
        score_group(group, items, False)

    print()
    print("| images | n | flagged | rate | score min - max |")
    print("|---|---|---|---|---|")
    for group, n, flagged, in_domain, low, high in rows:
        kind = "false alarms" if in_domain else "detected"
        print(f"| {group} | {n} | {flagged} {kind} | {100.0 * flagged / n:.2f} % | {low:.1f} - {high:.1f} |")
    print(f"\nthreshold {guard.threshold:.2f}; guard cost per image (preprocess + stem encoder + score, "
          f"{args.threads} thread): median {1000 * statistics.median(seconds):.1f} ms")  # fmt: skip

    if args.compare:
        val_errors = np.sort(recon[rows[0][0]][0])
        threshold = float(val_errors[len(val_errors) - 1 - int(np.floor(0.01 * len(val_errors)))])
        print(f"\nimage tokenizer reconstruction error (MSE), threshold {threshold:.5f} (1 % of Val_Folder above)")
        for group, (errors, in_domain) in recon.items():
            flagged = sum(e > threshold for e in errors)
            print(f"  {group}: {flagged}/{len(errors)} {'false alarms' if in_domain else 'detected'}")

    if args.sweep:
        sweep(args, pipeline, features, rows[0][0])


def sweep(args: argparse.Namespace, pipeline: MRISPipeline, features: dict, val_group: str) -> None:
    """Refit on Train_Folder (+ --extra-train Train_Folders) for each shrinkage; report as the table above."""
    from napari_mris.domain import DomainGuard
    from napari_mris_train.domain import calibrate_threshold, features_of

    paths = folder_images(args.data / "Train_Folder" / "img")
    for root in args.extra_train:
        paths += folder_images(root / "Train_Folder" / "img")
    train = features_of(pipeline.decoder.pixel_stem, paths, pipeline.image_size)
    print(f"\nshrinkage sweep (statistics of {len(paths)} training images)")
    for shrinkage in SHRINKAGES:
        guard = DomainGuard.fit(train, shrinkage)
        threshold = calibrate_threshold(guard.scores(features[val_group][0]), 0.01)
        parts = [f"train {int((guard.scores(train) > threshold).sum())}/{len(train)}"]
        for group, (feats, _in_domain) in features.items():
            flagged = int((guard.scores(feats) > threshold).sum())
            parts.append(f"{group.split(',')[0].split(' (')[0]} {flagged}/{len(feats)}")
        print(f"  {shrinkage:g}: threshold {threshold:.1f}; flagged: " + "; ".join(parts))


if __name__ == "__main__":
    main()
