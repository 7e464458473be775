"""Latency of MRISPipeline.stream(): first visible update and full mask, per decoding order.

    python benchmarks/latency.py [--model DIR] [--repeats N] [--device cpu] [--threads N]

Measures, on a 224 px phantom chest X-ray (or --image FILE), with the presence decision left to the model:

- first update: from calling stream() (preprocessing included) to the first partial mask;
- full mask: from calling stream() to the finished mask;
- raster only: the same decoding through `transformers`' `model.generate()` (greedy, legal-token
  processor, KV cache) as the baseline the raster budget is stated against.

Prints median and worst of N runs after one warm-up run, next to the budgets of DESIGN section 8.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from napari_mris.model.sequence import prefix_ids
from napari_mris.phantom import make_phantom
from napari_mris.pipeline import MRISPipeline

BUDGETS = {"first_update_s": 0.150, "full_scale_s": 0.5, "full_raster_s": 1.5, "raster_speedup": 2.0}


def time_stream(pipeline: MRISPipeline, image: np.ndarray, prompt: str, order: str) -> tuple[float, float, bool]:
    start = time.perf_counter()
    first = None
    rejected = False
    for update in pipeline.stream(image, prompt, order=order):
        first = time.perf_counter() - start if first is None else first
        rejected = update.rejected
    return first, time.perf_counter() - start, rejected


def time_generate(pipeline: MRISPipeline, image: np.ndarray, prompt: str) -> float:
    """Raster mask through `LlamaForCausalLM.generate()`: the same prefix, forced header, legal codes."""
    raster = pipeline.decoding_orders["raster"]
    start = time.perf_counter()
    text_ids, _ = pipeline._encode_prompt(prompt)
    _, codes = pipeline._model_input(image, None)  # generate() runs the bare Llama: no pixel stem
    prefix = prefix_ids(pipeline.layout, codes, text_ids, int(pipeline.tokenizers.image.grid)).to(pipeline.device)
    header = torch.tensor(raster.header(), device=prefix.device)
    ids = torch.cat([prefix, header])[None]
    with torch.inference_mode():
        pipeline.decoder.llama.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=raster.n_codes,
            min_new_tokens=raster.n_codes,
            do_sample=False,
            logits_processor=[raster.legal_tokens()],
            pad_token_id=0,
        )
    return time.perf_counter() - start


def force_present(pipeline: MRISPipeline) -> None:
    """Pin the presence decision to [SOV], so that every run writes a whole mask (for untrained test models)."""
    from napari_mris.model.vocab import SOV

    def hook(module, args, kwargs, output):
        # [SOV] is legal only at the decision position; the mask loop's logits (a slice of the vocabulary,
        # without [SOV]) are left alone, so the decoder keeps its fast path
        if output.logits is not None and kwargs.get("vocab_slice") is None:
            output.logits[..., SOV] += 1e4
        return output

    pipeline.decoder.register_forward_hook(hook, with_kwargs=True)


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.1f} ms   worst {max(values) * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--image", default=None, help="an image file instead of the phantom")
    parser.add_argument("--force-present", action="store_true", help="always decode a mask (skip [REJ])")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.image:
        from napari_mris.io import read_slice

        image, prompt = read_slice(args.image, expect_2d=True).pixels, "bilateral pulmonary infection"
    else:
        phantom = make_phantom(7)
        image, prompt = phantom.image, phantom.description
    pipeline = MRISPipeline.from_pretrained(args.model, device=args.device)
    if args.force_present:
        force_present(pipeline)
    info = pipeline.info()
    print(f"model {info['model_id']} ({info['model_hash']}), {info['parameters']:,} decoder parameters")
    print(f"device {info['device']}, torch threads {torch.get_num_threads()}, image {image.shape}, {args.repeats} runs")
    results: dict[str, float] = {}
    for order in pipeline.orders:
        time_stream(pipeline, image, prompt, order)  # warm-up
        runs = [time_stream(pipeline, image, prompt, order) for _ in range(args.repeats)]
        firsts, fulls = [r[0] for r in runs], [r[1] for r in runs]
        rejected = sum(r[2] for r in runs)
        print(f"{order:7s} first update  {summary(firsts)}   (budget {BUDGETS['first_update_s'] * 1000:.0f} ms)")
        note = f", {rejected} of {len(runs)} runs answered [REJ]" if rejected else ""
        print(f"{order:7s} full mask     {summary(fulls)}   (budget {BUDGETS[f'full_{order}_s'] * 1000:.0f} ms){note}")
        results[order] = statistics.median(fulls)
    if "raster" in pipeline.orders:
        time_generate(pipeline, image, prompt)
        generate = [time_generate(pipeline, image, prompt) for _ in range(args.repeats)]
        speedup = statistics.median(generate) / results["raster"]
        print(f"raster  generate()    {summary(generate)}")
        print(f"raster  stream() is {speedup:.2f}x faster than generate() (budget >= {BUDGETS['raster_speedup']:.0f}x)")


if __name__ == "__main__":
    main()
