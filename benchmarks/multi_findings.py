"""Several findings of one image in one call: what the first finding costs and what each later one costs.

    python benchmarks/multi_findings.py [--model DIR] [--image FILE] [--repeats N] [--threads 1]

`MRISPipeline.segment_findings` runs the image part (preprocessing, image tokens, the domain check, the pixel
stem and the image block's KV cache) once and decodes the greedy findings together, one batch row each.
For each order this prints medians over N calls (after one warm-up call):

- one finding: `segment_findings` with the first finding alone (the same work as `segment`);
  the calls with 1, 2 and 4 findings take turns within each repeat, so the medians share the machine's
  slow and fast spells;
- F = 2 and 4 findings in one call, and what each later finding adds: (time(F) - time(1)) / (F - 1), as a
  share of one finding (issue 18's target: <= 40 %);
- the widget's path, `stream_findings` (findings streamed one after the other, each one's own time after
  the first), and the four findings as four separate `segment` calls, for comparison.

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
from latency import force_present  # one owner of the pin (benchmarks/latency.py)

from napari_mris.io import read_slice
from napari_mris.pipeline import MRISPipeline

ROOT = Path(__file__).resolve().parents[1]
QATA_IMAGE = ROOT.parent / "shared/data/QaTa-COV19/Val_Folder/img/sub-S11228_ses-E19964_run-1_bp-chest_vp-ap_dx.png"
FINDINGS = [
    "Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "Bilateral pulmonary infection, three infected areas, upper left lung and all right lung.",
]


def together(pipeline: MRISPipeline, image, order: str, findings: list[str]) -> float:
    """Seconds for one segment_findings call."""
    start = time.perf_counter()
    pipeline.segment_findings(image.pixels, findings, order=order, window=image.window)
    return time.perf_counter() - start


def streamed(pipeline: MRISPipeline, image, order: str) -> list[float]:
    """Seconds per finding of one stream_findings call: the first from the call, the rest each its own."""
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
    force_present(pipeline)
    print(f"model {pipeline.model_id} ({pipeline.model_hash}), image {path.name} {image.pixels.shape}")
    print(f"torch threads {torch.get_num_threads()}, {len(FINDINGS)} findings per call, {args.repeats} calls")
    counts = (1, 2, len(FINDINGS))
    for order in pipeline.orders:
        together(pipeline, image, order, FINDINGS)  # warm-up
        # the calls of 1, 2 and 4 findings take turns, so a slower spell of a shared machine hits all of them
        times: dict[int, list[float]] = {count: [] for count in counts}
        for _ in range(args.repeats):
            for count in counts:
                times[count].append(together(pipeline, image, order, FINDINGS[:count]))
        one = statistics.median(times[1])
        line = f"{order:7s} one finding {one * 1000:6.1f} ms"
        for count in counts[1:]:
            many = statistics.median(times[count])
            later = (many - one) / (count - 1)
            line += f" | {count} together {many * 1000:6.1f} ms, each later {later * 1000:6.1f} ms = {later / one:5.1%}"
        calls = [streamed(pipeline, image, order) for _ in range(args.repeats)]
        first = statistics.median(c[0] for c in calls)
        after = statistics.median(t for c in calls for t in c[1:])
        apart = statistics.median(separate_calls(pipeline, image, order) for _ in range(args.repeats))
        print(line)
        print(
            f"{'':7s} streamed one after the other: first {first * 1000:6.1f} ms, later {after * 1000:6.1f} ms "
            f"= {after / first:5.1%}; {len(FINDINGS)} separate segment calls {apart * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    main()
