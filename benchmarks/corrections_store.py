"""Time of one corrections-store save (and of opening the store) at 10 and at 10,000 examples.

A save appends to the journal and the text table and renames its own files into place, so it should cost
the same whatever the store holds; opening is a constant-time check too, and only `records()` reads the
whole journal. The store is filled with small 32x32 examples through `CorrectionsStore.add` itself; the
timed saves use `--shape` slices (default 512x512, a typical chest X-ray plane after downsampling).

    python benchmarks/corrections_store.py [--sizes 10 10000] [--repeats 30] [--shape 512 512] [--root DIR]

The timed saves alternate between the stores (the 10- and the 10,000-example one), so that a change in the
load of a shared machine falls on both sizes alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_mris.corrections import CorrectionsStore


def fill(store: CorrectionsStore, count: int, rng: np.random.Generator) -> None:
    """Add small random examples until the store holds `count`."""
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    for _ in range(count - len(store)):
        store.add(rng.random((32, 32), dtype=np.float32), "lower left lung", mask, prediction=mask)


def time_saves(store: CorrectionsStore, repeats: int, shape: tuple[int, int], rng: np.random.Generator) -> list[float]:
    """Seconds per save of a new example with a prediction (the widget's Save as training example)."""
    mask = np.zeros(shape, bool)
    mask[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = True
    times = []
    for _ in range(repeats):
        image = rng.normal(120.0, 40.0, shape).astype(np.float32)
        start = time.perf_counter()
        store.add(image, "bilateral pulmonary infection, lower left lung", mask, prediction=mask, window=(0, 255))
        times.append(time.perf_counter() - start)
    return times


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 512])
    parser.add_argument("--root", type=Path, help="keep the stores here, one per size, and reuse them (default: temp)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or Path(scratch)
        stores = {size: CorrectionsStore(root / f"store_{size}") for size in sorted(args.sizes)}
        for size, store in stores.items():
            fill_s = timed(lambda store=store, size=size: fill(store, size, rng))
            print(f"filled {store.root} to {size} examples in {fill_s:.0f} s", flush=True)
        # Saves alternate between the stores, so a change in machine load (a shared CPU) hits every size alike.
        held = {size: len(store) for size, store in stores.items()}  # at the first timed save
        saves: dict[int, list[float]] = {size: [] for size in stores}
        for _ in range(args.repeats):
            for size, store in stores.items():
                saves[size] += time_saves(store, 1, tuple(args.shape), rng)
        print(f"timed saves: {args.repeats} per store, {args.shape[0]}x{args.shape[1]} slices, alternating stores")
        print(f"{'examples':>9} | {'save median':>11} | {'save p90':>9} | {'open':>8} | {'records()':>9}")
        for size, store in stores.items():
            open_s = timed(lambda store=store: CorrectionsStore(store.root))
            records_s = timed(store.records)
            p90 = statistics.quantiles(saves[size], n=10)[-1]
            print(
                f"{held[size]:>9} | {1000 * statistics.median(saves[size]):>8.1f} ms | {1000 * p90:>6.1f} ms | "
                f"{1000 * open_s:>5.2f} ms | {1000 * records_s:>6.1f} ms"
            )


if __name__ == "__main__":
    main()
