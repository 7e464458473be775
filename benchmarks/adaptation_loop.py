"""Does correcting N cases and adapting help on other cases? The correction loop, simulated on real data.

Val_Folder's annotators draw differently from Train_Folder's (smaller masks: 8.9 % of the image on
average against 11.4 % on train's BIMCV cases and 15.4 % on its covid_* cases), so val cases play a new
site's radiologist. Val_Folder holds BIMCV subjects sorted by subject; the benchmark splits it by subject:

- the correction pool: the first `--pool` val cases. N = 10 / 50 / 200 takes the first N of them, each
  saved into a corrections store with its ground-truth mask as the "correction" and its description as
  the prompt, exactly as "Save as training example" writes it;
- the scored val cases: `--eval-count` cases spread evenly over the rest of Val_Folder, none of a pool
  subject; scored on the referring sets `--sets` (full descriptions, side, absent ...: evaluate.py);
- the forgetting slice: `--train-count` Train_Folder cases spread evenly over it (the model trained on
  them), full descriptions; the replayed training pairs (`--replay-count`, also spread evenly) are
  other training cases.

An adapter is fine-tuned for each N with `napari-mris-train finetune`'s function and the recipe given
here, timed end to end (loading, encoding, the steps, choosing the border cut, saving), and every set is
scored before and after; each row records the lesion-map cut its adapter chose (`lesion_threshold`).

`--annotator dilate:K` / `erode:K` plays a new annotator who outlines every lesion K pixels wider or
tighter: the pool's corrections and the scored truths are redrawn so (`annotator_style`), the forgetting
slice is not. Val_Folder's own annotators differ from Train_Folder's in no way an adapter learns (docs/
results.md, "Stop 32"), so this is the benchmark's case of a difference there is to learn.

`--tune` is for choosing the recipe without looking at the scored cases: it trains on the first N pool
cases and scores on pool cases of OTHER subjects (`--eval-count` of them, from the end of the pool) and
on a different training slice. The scored cases are never read in that mode. `--tune --proxy` scores
without decoding, teacher-forced: the present / not-present decision (cross-entropy, argmax right) and
the mask codes (cross-entropy, argmax accuracy) of the held-back cases' answers to three prompts per
case: its own description (`full`), one side or zone of its mask (`zone`) and zones without lesion
(`absent`), plus the training slice's descriptions. Why: on 60 cases decoded Dice moves by about 2
points (standard error of the paired difference) when a few answers flip, while these average over
every token of every case, so recipes can be told apart in a minute of scoring rather than in the noise.

    python benchmarks/adaptation_loop.py --data ../shared/data/QaTa-COV19 --n 10 50 200 \\
        --json runs/adaptation_loop.json

Adapters go to a temporary per-user adapters folder (`NAPARI_MRIS_ADAPTERS`, napari_mris.adapters), so the
benchmark leaves neither the model directory nor the user's own adapters touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage import morphology

from napari_mris.corrections import CorrectionsStore
from napari_mris.model.modeldir import model_hash
from napari_mris.model_location import resolve_model_dir
from napari_mris.phantom import write_text_table
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.data import load_split
from napari_mris_train.encode_cache import encode_split
from napari_mris_train.evaluate import evaluate_split, parse_sets
from napari_mris_train.finetune import DEFAULT_STEPS, finetune, train_adapter

REPORTED = ("full", "side", "zone", "absent", "other")
PROXY_KINDS = {"full": (0.0, 0.0), "zone": (0.0, 1.0), "absent": (1.0, 0.0)}  # (absent, zone) fractions


class Picked:
    """Chosen pairs of a split, with the split's interface (what evaluate_split needs); `style` redraws
    each mask as a simulated annotator would (`annotator_style`)."""

    def __init__(self, split, indices: list[int], style: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.split, self.indices, self.style = split, list(indices), style
        self.folder = split.folder
        self.pairs = [split.pairs[i] for i in self.indices]
        self.descriptions = [p[3] for p in self.pairs]
        self.names = [p[0] for p in self.pairs]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        example = self.split[self.indices[index]]
        return example if self.style is None else dataclasses.replace(example, mask=self.style(example.mask))


def annotator_style(spec: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """`as-is`, `dilate:K` or `erode:K`: a new annotator who outlines every lesion K pixels wider or
    tighter than Val_Folder's. Val_Folder's own difference from Train_Folder is not one an adapter can
    learn (docs/results.md, stop 32); a known, systematic one shows whether the loop learns a style at all.
    A mask that erosion would empty keeps its original drawing (a correction is always a present finding)."""
    if spec == "as-is":
        return None
    kind, _, size = spec.partition(":")
    if kind not in ("dilate", "erode") or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"annotator style must be as-is, dilate:K or erode:K (K >= 1), got {spec!r}")
    disk = morphology.disk(int(size))

    def redraw(mask: np.ndarray) -> np.ndarray:
        change = ndimage.binary_dilation if kind == "dilate" else ndimage.binary_erosion
        drawn = change(mask, structure=disk)
        return drawn if drawn.any() else mask

    return redraw


def parse_annotator(spec: str) -> str:
    """--annotator: checked here (argparse reports a bad spec), kept as text (the cache key, the JSON)."""
    annotator_style(spec)
    return spec


def subject(name: str) -> str:
    """BIMCV names start with the subject (`sub-S11228_ses-...`); other names are their own subject."""
    return name.split("_ses-")[0] if name.startswith("sub-") else name


def spread(candidates: list[int], count: int) -> list[int]:
    """`count` of `candidates` evenly spaced over them (all of them when there are fewer)."""
    if count >= len(candidates):
        return list(candidates)
    return [candidates[int(i)] for i in np.linspace(0, len(candidates) - 1, count).round().astype(int)]


def choose_cases(val, train, args) -> dict[str, Picked]:
    """The correction pool, the scored val cases, the forgetting slice and the replayed training pairs."""
    names = val.names
    pool = list(range(min(args.pool, len(val))))
    if max(args.n) > len(pool):
        raise SystemExit(f"N = {max(args.n)} needs a pool of at least that many cases (--pool {args.pool})")
    pool_subjects = {subject(names[i]) for i in pool}
    train_indices = list(range(len(train)))
    if args.tune:  # held-back pool cases: subjects none of the largest N's corrections belongs to
        taught = {subject(names[i]) for i in range(max(args.n))}
        held = [i for i in pool if subject(names[i]) not in taught]
        scored = held[-args.eval_count :]
        forgetting = spread(train_indices[1::2], args.train_count)  # the other half of train than the final run
    else:
        rest = [i for i in range(len(val)) if subject(names[i]) not in pool_subjects]
        scored = spread(rest, args.eval_count)
        forgetting = spread(train_indices[::2], args.train_count)
    taken = set(forgetting)
    replay = spread(
        [i for i in train_indices if i not in taken and i % 2 == (0 if args.tune else 1)], args.replay_count
    )
    if not scored:
        raise SystemExit("no val cases left to score: lower --pool or the largest --n")
    style = annotator_style(args.annotator)
    return {
        "pool": Picked(val, pool, style),
        "scored": Picked(val, scored, style),
        "forgetting": Picked(train, forgetting),
        "replay": Picked(train, replay),
    }


def write_corrections(cases: Picked, count: int, root: Path) -> CorrectionsStore:
    """The first `count` cases, saved as a radiologist's corrections (ground truth as the fix)."""
    store = CorrectionsStore(root)
    for index in range(count):
        example = cases[index]
        store.add(example.image, example.description, example.mask, model_id="benchmark")
    return store


def write_replay(cases: Picked, root: Path) -> Path:
    """The replayed training pairs as a small LViT split (encoding all 5,716 would dominate the run)."""
    folder = root / "Train_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows = []
    for _name, image_path, mask_path, description in cases.pairs:
        shutil.copy2(image_path, folder / "img" / image_path.name)
        shutil.copy2(mask_path, folder / "labelcol" / mask_path.name)
        rows.append((mask_path.name, description))
    write_text_table(folder / "Train_text.csv", rows)
    return root


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per set: prompts, mean Dice (N-Acc for `absent`), pooled Dice and each prompt's Dice / answer, in
    the cases' order (so two models can be compared case by case)."""
    sets = {}
    for name, s in report["sets"].items():
        rows = [r for r in report["per_prompt"] if r["set"] == name]
        sets[name] = {
            "n": s["n"],
            "not_present": s["not_present"],
            "each_not_present": [r["not_present"] for r in rows],
        }
        if "dice" in s:
            sets[name] |= {"dice": s["dice"], "pooled_dice": s["pooled_dice"], "each_dice": [r["dice"] for r in rows]}
            drawn, true = sum(r["counts"][1] for r in rows), sum(r["counts"][2] for r in rows)
            sets[name]["area_ratio"] = drawn / max(true, 1)  # pixels drawn per true pixel: over- or under-drawing
    return {"n_images": report["n_images"], "seconds": report["seconds"], "sets": sets}


def score(pipeline: MRISPipeline, cases: Picked, order: str, sets: tuple[str, ...]) -> dict[str, Any]:
    return summary(evaluate_split(pipeline, cases, order=order, sets=sets, progress=False))


def cached_base(model_dir: Path, cases: dict[str, Picked], args, cache: Path | None) -> dict[str, Any]:
    """The base model's scores (they do not depend on the recipe: cached by model, cases, sets and order)."""
    key = hashlib.sha256(
        json.dumps(
            [model_hash(model_dir), args.order, list(args.sets)]
            + [cases["scored"].names, cases["forgetting"].names]
            + ([args.annotator] if args.annotator != "as-is" else [])  # as-is: the keys of earlier runs
        ).encode()
    ).hexdigest()[:16]
    path = cache / f"base_{key}.json" if cache is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    base = MRISPipeline.from_pretrained(model_dir, device="cpu")
    result = {
        "scored": score(base, cases["scored"], args.order, args.sets),
        "forgetting": score(base, cases["forgetting"], args.order, ("full",)),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def answer_losses(decoder, layout, tokenizers, cases: Picked, order: str, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Per kind of prompt and case, teacher-forced: the cross-entropy of the present / not-present decision
    and whether its argmax is right, and (for an answer with a mask) the mask codes' mean cross-entropy and
    the fraction whose argmax is the true code; None where a case has no prompt of that kind."""
    import torch.nn.functional as F

    from napari_mris.model.vocab import REJ, SOV
    from napari_mris_train.config import TrainRecipe
    from napari_mris_train.losses import gather_mask_targets, other_targets
    from napari_mris_train.mixing import SequenceMixer
    from napari_mris_train.objective import collate_samples, teacher_forced

    data = encode_split(cases, tokenizers, int(tokenizers.image.image_size), progress=False)
    start, stop = layout.mask_range(order)
    out: dict[str, Any] = {}
    for kind in kinds:
        absent, zone = PROXY_KINDS[kind]
        recipe = TrainRecipe(
            orders=(order,), absent_fraction=absent, zone_fraction=zone, foreign_fraction=0.0, flip=False, seed=7
        )
        mixer = SequenceMixer(data, tokenizers, layout, recipe, decoder.config.text_slots)
        each: dict[str, list[float | None]] = {"decision_ce": [], "decision_right": [], "code_ce": [], "code_acc": []}
        for index in range(len(data)):
            sample = mixer.sample(index, np.random.default_rng([7, index]), order)
            if sample.kind != kind:
                for values in each.values():
                    values.append(None)
                continue
            batch = collate_samples([sample], "cpu")
            with torch.no_grad():
                logits = teacher_forced(decoder.eval(), batch).logits.float()
            rows, positions, labels = other_targets(batch, layout)
            decision = (labels == SOV) | (labels == REJ)
            pair = logits[rows[decision], positions[decision]][:, [SOV, REJ]]
            truth = (labels[decision] == REJ).long()
            each["decision_ce"].append(float(F.cross_entropy(pair, truth)))
            each["decision_right"].append(float((pair.argmax(-1) == truth).float().mean()))
            targets = gather_mask_targets(batch, [order], layout, order, 1)
            if targets is None:
                each["code_ce"].append(None)
                each["code_acc"].append(None)
                continue
            codes = logits[targets.rows, targets.positions, start:stop]
            each["code_ce"].append(float(F.cross_entropy(codes, targets.codes)))
            each["code_acc"].append(float((codes.argmax(-1) == targets.codes).float().mean()))
        out[kind] = {
            metric: {"mean": float(np.mean([v for v in values if v is not None])), "each": values}
            for metric, values in each.items()
            if any(v is not None for v in values)
        }
    return out


def proxy_change(base: dict[str, Any], adapted: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per kind and metric: the mean paired change (adapted - base) and its standard error."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind, metrics in base.items():
        out[kind] = {}
        for metric, values in metrics.items():
            pairs = [
                (a, b) for a, b in zip(values["each"], adapted[kind][metric]["each"], strict=True) if a is not None
            ]
            diff = np.array([b - a for a, b in pairs])
            se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            out[kind][metric] = {"base": values["mean"], "change": float(diff.mean()), "se": se}
    return out


def run_proxy(model_dir: Path, cases: dict[str, Picked], args, replay: Path | None, scratch: Path) -> dict[str, Any]:
    """--tune --proxy: adapt on each N and score the answers' cross-entropy, base and adapted."""
    from napari_mris.model.decoder_files import load_decoder
    from napari_mris.tokenizers import load_tokenizers

    tokenizers = load_tokenizers(model_dir)
    base_decoder, layout = load_decoder(model_dir)
    val_kinds, train_kinds = tuple(PROXY_KINDS), ("full",)
    base = {
        "scored": answer_losses(base_decoder, layout, tokenizers, cases["scored"], args.order, val_kinds),
        "forgetting": answer_losses(base_decoder, layout, tokenizers, cases["forgetting"], args.order, train_kinds),
    }
    rows = []
    for n in args.n:
        store = write_corrections(cases["pool"], n, scratch / f"corrections_{n}")
        start, cpu_start = time.perf_counter(), time.process_time()
        decoder, _ = train_adapter(model_dir, store.root, args.steps, replay_data=replay, **recipe_of(args))
        adapt_seconds, adapt_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        adapted = {
            "scored": answer_losses(decoder, layout, tokenizers, cases["scored"], args.order, val_kinds),
            "forgetting": answer_losses(decoder, layout, tokenizers, cases["forgetting"], args.order, train_kinds),
        }
        change = {part: proxy_change(base[part], adapted[part]) for part in base}
        rows.append({"n": n, "adapt_seconds": adapt_seconds, "adapt_cpu_seconds": adapt_cpu_seconds, "change": change})
        print(f"N={n}: adaptation {adapt_seconds:.0f} s ({adapt_cpu_seconds:.0f} s CPU)")
        for part, kinds in change.items():
            for kind, metrics in kinds.items():
                text = ", ".join(
                    f"{metric} {c['base']:.4f} {c['change']:+.4f} ± {c['se']:.4f}" for metric, c in metrics.items()
                )
                print(f"  {part:10s} {kind:6s} {text}", flush=True)
    return {"rows": rows}


def recipe_of(args) -> dict[str, Any]:
    """The fine-tuning options (finetune.train_adapter's keywords) given here; the rest are the recipe's."""
    given = {
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "replay_fraction": args.replay_fraction,
        "seed": args.seed,
    }
    recipe = {key: value for key, value in given.items() if value is not None}
    if args.targets:
        recipe["targets"] = args.targets.split(",")
    for option in args.option or []:  # finetune.train_adapter keywords without a flag here
        key, _, value = option.partition("=")
        recipe[key.replace("-", "_")] = json.loads(value)
    return recipe


def effective_recipe(args, replay_count: int) -> dict[str, Any]:
    """Every recipe setting of this run, the given ones over finetune.train_adapter's defaults (for the JSON)."""
    skip = {"progress_callback", "progress", "device", "replay_data"}
    defaults = {
        name: p.default
        for name, p in inspect.signature(train_adapter).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip
    }
    return defaults | recipe_of(args) | {"replay_count": replay_count, "steps": args.steps}


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The figures the table shows: full / side Dice and absent N-Acc on val, full Dice on train (in %)."""
    sets = result["scored"]["sets"]
    pick = {
        "val_full": sets.get("full", {}).get("dice"),
        "val_side": sets.get("side", {}).get("dice"),
        "val_zone": sets.get("zone", {}).get("dice"),
        "val_absent_nacc": sets.get("absent", {}).get("not_present"),
        "train_full": result["forgetting"]["sets"]["full"]["dice"],
    }
    return {k: (None if v is None else 100 * v) for k, v in pick.items()}


HEADLINE_SOURCES = {  # headline key -> (part, set, per-prompt list)
    "val_full": ("scored", "full", "each_dice"),
    "val_side": ("scored", "side", "each_dice"),
    "val_zone": ("scored", "zone", "each_dice"),
    "val_absent_nacc": ("scored", "absent", "each_not_present"),
    "train_full": ("forgetting", "full", "each_dice"),
}


def paired_se(base: dict[str, Any], adapted: dict[str, Any], key: str) -> float | None:
    """Standard error (in points) of the mean per-prompt change behind a headline figure; None without the
    per-prompt lists (the prompts are the same for both models: the same cases, sets and seed)."""
    part, name, field = HEADLINE_SOURCES[key]
    try:
        before = np.asarray(base[part]["sets"][name][field], float)
        after = np.asarray(adapted[part]["sets"][name][field], float)
    except KeyError:
        return None
    if len(before) != len(after) or len(before) < 2:
        return None
    return float(100 * np.std(after - before, ddof=1) / np.sqrt(len(before)))


def print_table(base: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    before = headline(base)
    shown = [k for k, v in before.items() if v is not None]
    labels = {
        "val_full": "val full Dice",
        "val_side": "val side Dice",
        "val_zone": "val zone Dice",
        "val_absent_nacc": "val absent N-Acc",
        "train_full": "train full Dice",
    }
    print("\n| N | " + " | ".join(labels[k] for k in shown) + " | minutes to adapt (CPU minutes) |")
    print("|---:|" + "---:|" * (len(shown) + 1))
    counts = [base[HEADLINE_SOURCES[k][0]]["sets"][HEADLINE_SOURCES[k][1]]["n"] for k in shown]  # prompts per column
    print("| base | " + " | ".join(f"{before[k]:.2f} (n = {c})" for k, c in zip(shown, counts, strict=True)) + " | |")
    for row in rows:
        after = headline(row)
        cells = []
        for k in shown:
            se = paired_se(base, row, k)
            cells.append(f"{after[k]:.2f} ({after[k] - before[k]:+.2f}" + (f" ± {se:.2f})" if se is not None else ")"))
        minutes = f"{row['adapt_seconds'] / 60:.1f} ({row['adapt_cpu_seconds'] / 60:.1f})"
        print(f"| {row['n']} | " + " | ".join(cells) + f" | {minutes} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (never modified)")
    parser.add_argument("--data", type=Path, required=True, help="LViT root with Train_Folder and Val_Folder")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 200], help="numbers of corrected cases")
    parser.add_argument("--pool", type=int, default=200, help="the first POOL val cases are the correction pool")
    parser.add_argument("--eval-count", type=int, default=80, help="val cases scored (other subjects than the pool)")
    parser.add_argument("--train-count", type=int, default=60, help="training cases scored for forgetting")
    parser.add_argument("--sets", type=parse_sets, default=("full", "side", "absent"), help="referring sets on val")
    parser.add_argument("--order", default=None, choices=("scale", "raster"), help="default: the model's")
    parser.add_argument("--tune", action="store_true", help="score held-back pool cases, not the scored cases")
    parser.add_argument(
        "--annotator",
        type=parse_annotator,
        default="as-is",
        help="as-is (default), dilate:K or erode:K: val masks (corrections, scored truths) drawn K px wider / tighter",
    )
    recipe = parser.add_argument_group("recipe (napari-mris-train finetune's options; unset: its defaults)")
    recipe.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    recipe.add_argument("--rank", type=int)
    recipe.add_argument("--alpha", type=int)
    recipe.add_argument("--targets", help="comma-separated LoRA target modules")
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--replay-count", type=int, default=256, help="training pairs replayed while adapting")
    recipe.add_argument("--replay-fraction", type=float)
    recipe.add_argument("--seed", type=int)
    recipe.add_argument(
        "--option", action="append", metavar="KEY=JSON", help="another train_adapter keyword, e.g. max_passes=3"
    )
    parser.add_argument("--proxy", action="store_true", help="with --tune: answers' cross-entropy, no decoding")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the timing's CPU budget)")
    parser.add_argument("--cache", type=Path, default=Path("runs/adaptation_cache"), help="base scores cache")
    parser.add_argument("--json", type=Path, help="write the table (and the case lists) here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = resolve_model_dir(args.model)
    val = load_split(args.data, split="val")
    train = load_split(args.data, split="train")
    cases = choose_cases(val, train, args)
    args.order = args.order or MRISPipeline.from_pretrained(model_dir, device="cpu").default_order
    print(
        f"pool val[0:{len(cases['pool'])}], scored {len(cases['scored'])} val cases "
        f"({'tuning' if args.tune else 'final'}), "
        f"forgetting {len(cases['forgetting'])} train cases, replay {len(cases['replay'])}, order {args.order}, "
        f"annotator {args.annotator}",
        flush=True,
    )
    if args.proxy:
        if not args.tune:
            raise SystemExit("--proxy is for choosing a recipe: use it with --tune")
        with tempfile.TemporaryDirectory(prefix="mris-adapt-proxy-") as scratch:
            replay = write_replay(cases["replay"], Path(scratch) / "replay") if args.replay_count else None
            result = run_proxy(model_dir, cases, args, replay, Path(scratch))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            recipe = effective_recipe(args, len(cases["replay"]))
            args.json.write_text(json.dumps({"mode": "proxy", "recipe": recipe, **result}, indent=1) + "\n")
        return
    base = cached_base(model_dir, cases, args, args.cache)
    print("base:", json.dumps(headline(base)), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mris-adapt-bench-") as scratch:
        os.environ["NAPARI_MRIS_ADAPTERS"] = str(Path(scratch) / "adapters")
        replay = write_replay(cases["replay"], Path(scratch) / "replay") if args.replay_count else None
        for n in args.n:
            store = write_corrections(cases["pool"], n, Path(scratch) / f"corrections_{n}")
            start, cpu_start = time.perf_counter(), time.process_time()
            finetune(model_dir, store.root, f"n{n}", args.steps, replay_data=replay, **recipe_of(args))
            adapt_seconds, adapt_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            adapted = MRISPipeline.from_pretrained(model_dir, device="cpu", adapter=f"n{n}")
            row = {
                "n": n,
                "lesion_threshold": adapted.lesion_threshold,  # the border cut chosen on the corrections
                "adapt_seconds": adapt_seconds,  # wall clock, on a CPU other jobs may share
                "adapt_cpu_seconds": adapt_cpu_seconds,  # this process's CPU time: the cost on an idle core
                "scored": score(adapted, cases["scored"], args.order, args.sets),
                "forgetting": score(adapted, cases["forgetting"], args.order, ("full",)),
            }
            rows.append(row)
            print(
                f"N={n}: {json.dumps(headline(row))}, lesion cut {adapted.lesion_threshold:g}, "
                f"adaptation {adapt_seconds:.0f} s ({adapt_cpu_seconds:.0f} s CPU)",
                flush=True,
            )
    print_table(base, rows)
    if args.json:
        out = {
            "model": str(model_dir),
            "mode": "tune" if args.tune else "final",
            "order": args.order,
            "annotator": args.annotator,
            "sets": list(args.sets),
            "threads": args.threads,
            "steps": args.steps,
            "recipe": effective_recipe(args, len(cases["replay"])),
            "cases": {k: v.names for k, v in cases.items()},
            "base": base,
            "rows": rows,
            "headline": {"base": headline(base)} | {str(r["n"]): headline(r) for r in rows},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
