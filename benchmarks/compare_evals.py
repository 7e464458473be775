"""Two models on the same referring prompts: paired differences with their standard errors.

`napari-mris-train eval` builds its prompts from (seed, image index), so two runs with the same data, seed
and --limit ask the same questions. Pairing the rows removes the between-image spread that dominates a
difference of two means, which is what a decision between two checkpoints or models needs: on which sets
is B better than A, by more than the noise? Rows are matched by (image, set, prompt); rows present in
only one run are left out and counted.

    python benchmarks/compare_evals.py runs/eval/v6_raster_300.json runs/eval/v7_raster_300.json

The trade-off of other presence thresholds is `napari-mris-train presence` (docs/training.md): it decodes
every finding, so each threshold's figures are exact.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SETS = ("full", "side", "zone", "absent", "other")


def load_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    report = json.loads(path.read_text())
    return {(row["name"], row["set"], row["prompt"]): row for row in report["per_prompt"]}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def score(row: dict, name: str) -> float:
    """The row's figure for its set: "not present" (1/0) for absent prompts, Dice for the others."""
    return float(row["not_present"]) if name == "absent" else float(row["dice"])


def paired_table(a: dict, b: dict) -> list[str]:
    lines = [f"{'set':<8}{'n':>6}{'A':>9}{'B':>9}{'B - A':>10}{'± s.e.':>9}   (percent; absent: N-Acc)"]
    for name in SETS:
        keys = sorted(k for k in a.keys() & b.keys() if k[1] == name)
        if not keys:
            continue
        first, second = [score(a[k], name) for k in keys], [score(b[k], name) for k in keys]
        diff, error = mean_and_error([y - x for x, y in zip(first, second, strict=True)])
        mean_a, mean_b = sum(first) / len(keys), sum(second) / len(keys)
        lines.append(
            f"{name:<8}{len(keys):>6}{100 * mean_a:>9.2f}{100 * mean_b:>9.2f}{100 * diff:>+10.2f}{100 * error:>9.2f}"
        )
    keys = sorted(k for k in a.keys() & b.keys() if k[1] == "full")
    if keys:
        diff, error = mean_and_error([float(b[k]["not_present"]) - float(a[k]["not_present"]) for k in keys])
        lines.append(f"{'false not present on full':<32}{100 * diff:>+10.2f}{100 * error:>9.2f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="eval JSON of the reference model")
    parser.add_argument("b", type=Path, help="eval JSON of the candidate, same data, seed and --limit")
    args = parser.parse_args()
    a, b = load_rows(args.a), load_rows(args.b)
    unmatched = len(a.keys() ^ b.keys())
    print(f"A = {args.a}\nB = {args.b}\n{len(a.keys() & b.keys())} prompts in both, {unmatched} in only one")
    print("\n".join(paired_table(a, b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
