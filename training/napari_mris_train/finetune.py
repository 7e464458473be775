"""`napari-mris-train finetune`: adapt a model to new data (often the widget's corrections) with LoRA.

peft wraps the decoder's inner Llama (`lora_target_modules()`: attention and MLP projections); every
other weight stays frozen and the vocabulary is fixed, so no new token rows are needed. The adapter is
saved in the user's adapters folder under the base model's hash (`napari_mris.adapters`: adapter_model.safetensors,
adapter_config.json, base_model.json) by writing a temporary folder and renaming it: the model directory is
never written, and a stopped or failed run leaves no adapter folder behind.

Replay: a fraction of every batch can come from the original training data, so that a few dozen
corrections teach the model without making it forget the rest.

The default recipe (rank 8 on every projection, 150 steps at lr 5e-4 but at most 9 passes over the new
data, a quarter of each batch replayed, the model's default decoding order only, the new data taught as
given plus a quarter of one-side / one-zone prompts made from it, OWN_MIX) was chosen with
`benchmarks/adaptation_loop.py --tune` on held-back correction cases (docs/results.md, "Correction loop").
The [SOV]/[REJ] decision is left out of the adapter's loss (DECISION_WEIGHT): a correction is always a
present finding, and adapters that were taught its decision learnt to answer "present" to prompts for
empty zones too. At run time the base model takes the decision for the adapter (pipeline.MRISPipeline),
since LoRA weights move it even untaught.

The border: the final mask's borders are the stem's lesion map (napari_mris.lesion_snap), which LoRA on
the transformer does not reach. So the adapter also carries the map's cut that best fits the trained
corrections (`choose_lesion_threshold`): a user who outlines lesions tighter or wider than the training
annotators gets their border; a user who outlines like them keeps 0.5 (the cut must gain MIN_BORDER_GAIN).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from napari_mris.adapters import adapter_dir, save_adapter
from napari_mris.errors import DatasetError, MRISError
from napari_mris.lesion_snap import LESION_THRESHOLD
from napari_mris.model.decoder import lora_target_modules
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model_location import peek_config, resolve_model_dir
from napari_mris.phantom import write_lvit_dataset
from napari_mris.pipeline import MRISPipeline, resolve_device
from napari_mris.tokenizers import load_tokenizers
from napari_mris_train.config import TrainRecipe
from napari_mris_train.data import load_split
from napari_mris_train.encode_cache import encode_split
from napari_mris_train.held_out import report_held_out, score_held_out, split_held_out
from napari_mris_train.losses import LossConfig
from napari_mris_train.metrics import dice_iou
from napari_mris_train.mixing import SequenceMixer
from napari_mris_train.objective import Objective, adamw, collate_samples

ProgressCallback = Callable[[int, int, float], None]  # (step done, total steps, loss)


def open_dataset(path: str | Path):
    """An LViT split folder (a corrections folder is one), or an LViT root: its training split."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset folder not found")
    return load_split(path) if any(p.name.lower() == "img" for p in path.iterdir()) else load_split(path, split="train")


def attach_lora(decoder, rank: int, alpha: int, targets: list[str] | None, dropout: float = 0.05):
    """Freeze the decoder and wrap its Llama with trainable LoRA matrices (in place)."""
    from peft import LoraConfig, get_peft_model

    decoder.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or lora_target_modules(), bias="none"
    )
    decoder.llama = get_peft_model(decoder.llama, config)
    return decoder


DEFAULT_STEPS = 150
MAX_PASSES = 9.0  # what DEFAULT_STEPS make of 50 corrections (3 per batch), where the recipe was chosen
NO_MIX = (0.0, 0.0, 0.0)
OWN_MIX = (0.0, 0.25, 0.0)  # one-side / one-zone prompts made from the corrections: keep the referring skill
TRAINING_MIX = (0.15, 0.25, 0.05)  # TrainRecipe's own (absent, zone, foreign) fractions
DECISION_WEIGHT = 0.0  # the [SOV]/[REJ] token against one mask code: not trained (why: the module docstring)
LESION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the cuts `choose_lesion_threshold` tries
MIN_BORDER_GAIN = 0.01  # mean Dice a cut must gain over LESION_THRESHOLD on the corrections to be chosen


def mix_recipe(orders: tuple[str, ...], mix: tuple[float, float, float], seed: int) -> TrainRecipe:
    """A mixing recipe with (absent, zone, foreign) prompt fractions; flips only come with derived prompts,
    so data taught as given (NO_MIX) is seen exactly as saved."""
    absent, zone, foreign = mix
    return TrainRecipe(
        orders=orders,
        absent_fraction=absent,
        zone_fraction=zone,
        foreign_fraction=foreign,
        flip=any(f > 0 for f in mix),
        seed=seed,
    )


def capped_steps(steps: int, max_passes: float, examples: int, per_batch: int) -> int:
    """`steps`, or fewer when they would show each of `examples` new examples (`per_batch` of them in a
    step) more than `max_passes` times (0: no cap). Why: ten corrections seen 45 times each were learnt by
    heart and cost 9 Dice points on training cases (docs/results.md, "Correction loop")."""
    if max_passes <= 0:
        return steps
    return max(1, min(steps, math.ceil(max_passes * examples / max(per_batch, 1))))


def training_orders(layout, tokenizers, orders: str | tuple[str, ...] | None, model_dir: Path) -> tuple[str, ...]:
    """The decoding orders to adapt: None = every order of the model, "default" = the order it decodes
    by default (config.json `default_order`; the widget starts there), else the names given."""
    available = tuple(o for o in layout.orders if o in tokenizers.masks)
    if orders is None:
        return available
    if orders == "default":
        preferred = peek_config(model_dir).get("default_order")
        return (preferred,) if preferred in available else available
    unknown = sorted(set(orders) - set(available))
    if unknown or not orders:
        raise MRISError(f"orders {list(orders)}: this model decodes in {list(available)}")
    return tuple(orders)


def adaptation_mixers(
    tokenizers,
    layout,
    dataset,
    replay_data,
    replay_fraction: float,
    batch_size: int,
    seed: int,
    progress: bool,
    text_slots: int = 0,
    *,
    orders: tuple[str, ...] | None = None,
    own_mix: tuple[float, float, float] = OWN_MIX,
    replay_mix: tuple[float, float, float] = TRAINING_MIX,
) -> list[tuple[SequenceMixer, int]]:
    """(mixer, examples per batch) pairs: the new data with `own_mix`, plus replay with `replay_mix` (the
    training mix by default). Why zone prompts of the corrections by default: corrections are full
    descriptions, and 200 of them taught as given made the adapter draw the whole finding whatever side
    was named (docs/results.md, "Correction loop", stop 26)."""
    size = int(tokenizers.image.image_size)
    orders = orders or tuple(o for o in layout.orders if o in tokenizers.masks)
    own_data = encode_split(open_dataset(dataset), tokenizers, size, progress=progress)
    n_replay = min(round(batch_size * replay_fraction), batch_size - 1) if replay_data is not None else 0
    own = SequenceMixer(own_data, tokenizers, layout, mix_recipe(orders, own_mix, seed), text_slots)
    mixers = [(own, batch_size - n_replay)]
    if n_replay:
        replay_split = encode_split(open_dataset(replay_data), tokenizers, size, progress=progress)
        replayed = SequenceMixer(replay_split, tokenizers, layout, mix_recipe(orders, replay_mix, seed + 1), text_slots)
        mixers.append((replayed, n_replay))
    return mixers


def train_adapter(
    model_dir: Path,
    dataset: str | Path,
    steps: int,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: list[str] | None = None,
    lr: float = 5e-4,
    batch_size: int = 4,
    replay_data: str | Path | None = None,
    replay_fraction: float = 0.25,
    decision_weight: float = DECISION_WEIGHT,
    orders: str | tuple[str, ...] | None = "default",
    own_mix: tuple[float, float, float] = OWN_MIX,
    replay_mix: tuple[float, float, float] = TRAINING_MIX,
    max_passes: float = MAX_PASSES,
    seed: int = 0,
    device: str = "cpu",
    progress_callback: ProgressCallback | None = None,
    progress: bool = False,
):
    """The fine-tuning loop; returns (decoder with its peft-wrapped Llama, layout). Nothing is written.

    `decision_weight`: the [SOV]/[REJ] token against one mask code in the loss (losses.LossConfig);
    `orders`: see `training_orders`; `own_mix` / `replay_mix`: (absent, zone, foreign) prompt fractions
    of the new data and of the replayed data (mixing.SequenceMixer); `max_passes`: see `capped_steps`."""
    if steps < 1:
        raise MRISError(f"fine-tuning needs at least one step, got {steps}")
    if not 0.0 <= replay_fraction < 1.0:
        raise MRISError(f"replay fraction must be in [0, 1), got {replay_fraction}")
    torch.manual_seed(seed)
    torch_device = resolve_device(device)
    tokenizers = load_tokenizers(model_dir)
    decoder, layout = load_decoder(model_dir)
    mixers = adaptation_mixers(
        tokenizers,
        layout,
        dataset,
        replay_data,
        replay_fraction,
        batch_size,
        seed,
        progress,
        decoder.config.text_slots,
        orders=training_orders(layout, tokenizers, orders, model_dir),
        own_mix=own_mix,
        replay_mix=replay_mix,
    )
    steps = capped_steps(steps, max_passes, len(mixers[0][0].data), mixers[0][1])
    attach_lora(decoder, rank, alpha, targets).to(torch_device).train()
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = adamw(params, lr, weight_decay=0.0)
    # No HET (a few hundred steps) and no lesion term: the stem is frozen, the term would only shift the loss
    objective = Objective(decoder, layout, LossConfig(het=False, lesion_weight=0.0, decision_weight=decision_weight))
    for step in tqdm(range(steps), desc="finetune", disable=not progress):
        samples = [s for mixer, n in mixers if n > 0 for s in mixer.batch(step, n)]
        loss = objective(collate_samples(samples, torch_device))["loss"]
        if not torch.isfinite(loss):
            raise MRISError(f"fine-tuning diverged at step {step + 1} (loss {loss.item()}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if progress_callback is not None:
            progress_callback(step + 1, steps, loss.item())
    return decoder.eval(), layout


def choose_lesion_threshold(pipeline: MRISPipeline, examples) -> float:
    """The lesion map's cut (of LESION_THRESHOLDS) whose map best matches the corrections' masks (mean
    Dice). The map is text-free and LoRA leaves it unchanged, so the base `pipeline`'s map is the
    adapter's. LESION_THRESHOLD stays unless another cut gains MIN_BORDER_GAIN: a few corrections should
    not move the border on noise."""
    maps = [(pipeline.lesion_map(example.image), example.mask) for example in examples]
    maps = [(probability, mask) for probability, mask in maps if probability is not None]
    if not maps:
        return LESION_THRESHOLD
    dice = {t: np.mean([dice_iou(probability >= t, mask)[0] for probability, mask in maps]) for t in LESION_THRESHOLDS}
    best = max(dice, key=dice.get)
    return best if dice[best] >= dice[LESION_THRESHOLD] + MIN_BORDER_GAIN else LESION_THRESHOLD


def finetune(
    model_dir: str | Path,
    dataset: str | Path,
    name: str,
    steps: int = DEFAULT_STEPS,
    *,
    held_out_fraction: float = 0.0,
    held_out_progress: Callable[[int, int], None] | None = None,
    calibrate_border: bool = True,
    **options,
) -> Path:
    """Fine-tune with LoRA and save it as adapter `name` of the model (napari_mris.adapters); returns its folder.

    `progress_callback(step, total, loss)` is called after each step (`--report-steps` prints it for the
    widget, which runs this command in a process of its own and stops it by ending that process); a
    failure, or a process ended before the end, leaves no adapter folder behind. With `calibrate_border`,
    the lesion map's cut is chosen on the trained corrections and saved with the adapter
    (`choose_lesion_threshold`). With `held_out_fraction`, that part of the data is not trained on; the
    base model and the adapter (with its cut) are scored on it and the comparison is saved with the
    adapter (held_out.py). Options: see `train_adapter`.
    """
    model_dir = resolve_model_dir(model_dir)
    adapter_dir(model_dir, name)  # a bad name fails before the training, not after it
    with tempfile.TemporaryDirectory(prefix="mris-held-out-") as scratch:
        train_part, held = split_held_out(open_dataset(dataset), held_out_fraction, scratch)
        trained = train_part if held else dataset
        decoder, layout = train_adapter(model_dir, trained, steps, **options)
        threshold, evaluation = LESION_THRESHOLD, None
        if calibrate_border or held:  # the base pipeline: its lesion map, and the held-back comparison's base
            base = MRISPipeline.from_pretrained(model_dir, device=str(next(decoder.parameters()).device))
        if calibrate_border:
            split = open_dataset(trained)
            threshold = choose_lesion_threshold(base, (split[i] for i in range(len(split))))
        if held:
            comparison = score_held_out(base, decoder, layout, held, name, threshold, held_out_progress)
            evaluation = comparison.to_json()
    return save_adapter(decoder.llama.cpu(), model_dir, name, evaluation, threshold)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or 'default')")
    parser.add_argument("--data", required=True, type=Path, help="LViT root, split folder, or corrections folder")
    parser.add_argument(
        "--out", required=True, help="adapter name (saved in the user's adapters folder, under the model's hash)"
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA alpha (scale = alpha / r)")
    parser.add_argument("--targets", help=f"comma-separated modules (default {','.join(lora_target_modules())})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="at most (see --max-passes)")
    parser.add_argument(
        "--max-passes",
        type=float,
        default=MAX_PASSES,
        help="fewer steps when each new example would be seen more often than this (0: no cap)",
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--replay-data", type=Path, help="LViT root mixed in to avoid forgetting")
    parser.add_argument(
        "--replay-phantoms",
        type=int,
        default=0,
        metavar="N",
        help="without --replay-data: replay N synthetic phantoms (part of the default model's training data)",
    )
    parser.add_argument("--replay-fraction", type=float, default=0.25)
    parser.add_argument(
        "--decision-weight",
        type=float,
        default=DECISION_WEIGHT,
        help="the [SOV]/[REJ] token against one mask code in the loss (default 0: the decision is not trained)",
    )
    parser.add_argument(
        "--orders",
        default="default",
        help="decoding orders adapted: 'default' (the model's default order), 'all', or a comma list",
    )
    parser.add_argument(
        "--own-mix",
        type=parse_mix,
        default=OWN_MIX,
        metavar="A,Z,F",
        help="absent, zone and foreign prompt fractions made from the new data (default 0,0.25,0; 0,0,0: as given)",
    )
    parser.add_argument(
        "--replay-mix",
        type=parse_mix,
        default=TRAINING_MIX,
        metavar="A,Z,F",
        help=f"the same for the replayed data (default {','.join(map(str, TRAINING_MIX))}: the training mix)",
    )
    parser.add_argument(
        "--hold-out",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="score base and adapter on this fraction of the data, not trained on (saved with the adapter)",
    )
    parser.add_argument(
        "--keep-border",
        action="store_true",
        help="keep the lesion map's cut at 0.5 (default: choose it on the corrections, saved with the adapter)",
    )
    parser.add_argument(
        "--report-steps", action="store_true", help="print 'step I/N loss L' lines (for the widget), no bar"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)


def parse_mix(text: str) -> tuple[float, float, float]:
    """'A,Z,F' -> (absent, zone, foreign) fractions, each in [0, 1] and summing to at most 1."""
    try:
        mix = tuple(float(v) for v in text.split(","))
    except ValueError:
        mix = ()
    if len(mix) != 3 or min(mix) < 0 or sum(mix) > 1:
        raise argparse.ArgumentTypeError(f"expected three fractions A,Z,F in [0, 1] summing to <= 1, got {text!r}")
    return mix


def run(args: argparse.Namespace) -> int:
    try:
        folder = finetune_command(args)
    except MRISError as exc:  # model directory, dataset or divergence problems, in plain words
        print(f"error: {exc}")
        return 1
    print(f"adapter saved: {folder}")
    return 0


def report_step(step: int, total: int, loss: float) -> None:
    """The line protocol the widget's adaptation job parses (see napari_mris.adaptation)."""
    print(f"step {step}/{total} loss {loss:.4f}", flush=True)


def finetune_command(args: argparse.Namespace) -> Path:
    with tempfile.TemporaryDirectory(prefix="mris-replay-") as scratch:
        replay = args.replay_data
        if replay is None and args.replay_phantoms > 0:
            size = int(load_tokenizers(resolve_model_dir(args.model)).image.image_size)
            replay = write_lvit_dataset(scratch, args.replay_phantoms, 0, size=size, seed=args.seed + 1)
        return finetune(
            args.model,
            args.data,
            args.out,
            args.steps,
            rank=args.rank,
            alpha=args.alpha,
            targets=args.targets.split(",") if args.targets else None,
            lr=args.lr,
            batch_size=args.batch_size,
            replay_data=replay,
            replay_fraction=args.replay_fraction,
            decision_weight=args.decision_weight,
            orders={"default": "default", "all": None}.get(args.orders, tuple(args.orders.split(","))),
            own_mix=args.own_mix,
            replay_mix=args.replay_mix,
            max_passes=args.max_passes,
            device=args.device,
            seed=args.seed,
            progress=not args.report_steps,
            progress_callback=report_step if args.report_steps else None,
            held_out_fraction=args.hold_out,
            held_out_progress=report_held_out if args.report_steps else None,
            calibrate_border=not args.keep_border,
        )
