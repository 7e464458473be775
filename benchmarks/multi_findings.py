"""Several findings of one image in one call: what the first finding costs and what each later one costs.

    python benchmarks/multi_findings.py [--model DIR] [--image FILE] [--repeats N] [--threads 1]

`MRISPipeline.segment_findings` runs the image part (preprocessing, image tokens, the domain check, the pixel
stem and the image block's KV cache) once and then decodes finding after finding on it. For each order this
prints, over N calls with four findings (after one warm-up call):

- first finding: from the call to its finished mask (the image part included);
- later findings: each one's own time, from the end of the one before to its finished mask;
- the ratio later / first (issue 18's target: <= 40 %), and the same four findings as four separate
  `segment` calls, for comparison.

The presence decision is pinned to [SOV] (every finding draws a whole mask), so the figures do not depend
on which prompts the model answers "not present". Default image: a QaTa-COV19 validation X-ray from
../shared/data, else the bundled sample phantom.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from napari_mris.io import read_slice
from napari_mris.model.vocab import SOV
from napari_mris.pipeline import MRISPipeline

ROOT = Path(__file__).resolve().parents[1]
QATA_IMAGE = ROOT.parent / "shared/data/QaTa-COV19/Val_Folder/img/sub-S11228_ses-E19964_run-1_bp-chest_vp-ap_dx.png"
FINDINGS = [
    "Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "Bilateral pulmonary infection, three infected areas, upper left lung and all right lung.",
]


def pin_present(pipeline: MRISPipeline) -> None:
    def hook(module, inputs, output):
        output = output.clone()
        output[..., SOV] += 1e4  # [SOV] is legal only at the decision position
        return output

    pipeline.decoder.lm_head.register_forward_hook(hook)


def one_call(pipeline: MRISPipeline, image, order: str) -> list[float]:
    """Seconds per finding of one segment_findings-style stream: the first from the call, the rest each its own."""
    times, mark = [], time.perf_counter()
    for _, update in pipeline.stream_findings(image.pixels, FINDINGS, order=order, window=image.window):
        if update.finished:
            now = time.perf_counter()
            times.append(now - mark)
            mark = now
    return times


def separate_calls(pipeline: MRISPipeline, image, order: str) -> float:
    start = time.perf_counter()
    for prompt in FINDINGS:
        pipeline.segment(image.pixels, prompt, order=order, window=image.window)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.image or (QATA_IMAGE if QATA_IMAGE.is_file() else ROOT / "sample_data/img/phantom_07.png")
    image = read_slice(path, expect_2d=True)
    pipeline = MRISPipeline.from_pretrained(args.model, device="cpu")
    pin_present(pipeline)
    print(f"model {pipeline.model_id} ({pipeline.model_hash}), image {path.name} {image.pixels.shape}")
    print(f"torch threads {torch.get_num_threads()}, {len(FINDINGS)} findings per call, {args.repeats} calls")
    for order in pipeline.orders:
        one_call(pipeline, image, order)  # warm-up
        calls = [one_call(pipeline, image, order) for _ in range(args.repeats)]
        first = statistics.median(c[0] for c in calls)
        later = statistics.median(t for c in calls for t in c[1:])
        together = statistics.median(sum(c) for c in calls)
        apart = statistics.median(separate_calls(pipeline, image, order) for _ in range(args.repeats))
        print(
            f"{order:7s} first finding {first * 1000:6.1f} ms   later findings {later * 1000:6.1f} ms median "
            f"= {later / first:5.1%} of the first   all {len(FINDINGS)}: {together * 1000:6.1f} ms in one call, "
            f"{apart * 1000:6.1f} ms as separate calls"
        )


if __name__ == "__main__":
    main()
