"""Peak memory of inference: process peak RSS and peak Python/numpy allocations while segmenting.

    python benchmarks/memory.py [--model DIR] [--size PX] [--samples N]

Reports, in MB: the resident set before loading the model (Python, torch and the libraries), after
loading it, and the peak after segmenting a phantom in every decoding order at --size pixels (default
2048, a large radiograph: its probability maps at full resolution are the largest arrays the pipeline
makes), with --samples samples. `tracemalloc` adds the peak of numpy/Python allocations during the runs.
The budget of DESIGN section 8 is 1.5 GB for inference; the RSS peak is the figure to compare with it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tracemalloc

BUDGET_MB = 1500.0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--force-present", action="store_true", help="always decode a mask (skip [REJ])")
    args = parser.parse_args()

    from napari_mris.phantom import make_phantom
    from napari_mris.pipeline import MRISPipeline

    phantom = make_phantom(7, size=256)  # enlarged by repetition: drawing a 2048 px phantom would set the peak
    factor = max(1, args.size // 256)
    image = phantom.image.repeat(factor, axis=0).repeat(factor, axis=1)
    baseline = peak_rss_mb()
    pipeline = MRISPipeline.from_pretrained(args.model, device=args.device)
    if args.force_present:
        from latency import force_present

        force_present(pipeline)
    loaded = peak_rss_mb()
    tracemalloc.start()
    for order in pipeline.orders:
        result = pipeline.segment(image, phantom.description, order=order, samples=args.samples)
        verdict = "[REJ]" if result.rejected else f"{int(result.mask.sum())} mask pixels"
        print(f"{order:7s} {image.shape} -> {verdict}, {result.timings['total_s']:.2f} s")
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = peak_rss_mb()
    print(f"model {pipeline.model_id} ({pipeline.model_hash}), {args.samples} sample(s), device {args.device}")
    print(f"RSS before loading the model   {baseline:8.1f} MB")
    print(f"RSS after loading the model    {loaded:8.1f} MB")
    print(f"RSS peak after segmenting      {peak:8.1f} MB   (budget {BUDGET_MB:.0f} MB)")
    print(f"numpy/Python allocation peak   {traced_peak / 2**20:8.1f} MB   (tracemalloc, during segmentation)")
    print(f"-> {'within' if peak <= BUDGET_MB else 'OVER'} the inference memory budget")


if __name__ == "__main__":
    main()
