"""`napari-mris-train train`: the NTP-MRISeg decoder recipe with HF accelerate.

One loop, nanoGPT style: build a batch (mixing.py), forward, the four losses (losses.py), AdamW with
warmup + cosine, gradient clipping, validation Dice on a fixed Val_Folder subset, checkpoints. The same
command runs on a CPU, a GPU (bf16 autocast) or several GPUs (`accelerate launch`).

Files of a run (`--out` is a model directory that already holds the tokenizers; with `--tag NAME` the
run gets its own model directory `<out>/runs/NAME/` with a copy of the tokenizer files):

    model.safetensors        best decoder so far by validation Dice (via save_decoder)
    checkpoints/last/        full training state for --resume (safetensors + JSON)
    train_log.jsonl          one JSON line per step and per validation
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from napari_mris.errors import MRISError
from napari_mris.model.decoder import DecoderConfig, MRISDecoder
from napari_mris.model.decoder_files import save_decoder
from napari_mris.model.modeldir import load_state_checked, load_weights, read_config
from napari_mris.model.orders import HEADER_LENGTH, decoding_order
from napari_mris.model.vocab import VocabLayout
from napari_mris.pipeline import MRISPipeline
from napari_mris.tokenizers import load_tokenizers
from napari_mris_train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer,
    part,
    restore_rng,
    save_checkpoint,
)
from napari_mris_train.cli import add_training_data
from napari_mris_train.config import ConfigError, Recipe, decoder_settings, load_recipe
from napari_mris_train.data import concat_splits, load_split
from napari_mris_train.encode_cache import cached_encoding
from napari_mris_train.evaluate import SELECTION_SETS, evaluate_split
from napari_mris_train.het_memory import HETMemory
from napari_mris_train.losses import lesion_loss
from napari_mris_train.mixing import SequenceMixer
from napari_mris_train.objective import Objective, adamw, collate_samples
from napari_mris_train.schedule import learning_rate

TOKENIZER_FILES = ("config.json", "image_tokenizer.safetensors", "mask_tokenizer.safetensors", "tokenizer.json")
LOG_NAME = "train_log.jsonl"
LAST = "last"


class TrainingDiverged(MRISError):
    """The loss or the gradient became NaN/inf; training stopped before the weights were touched."""


# --- model -------------------------------------------------------------------------------------------------


def vocab_layout(tokenizers) -> VocabLayout:
    return VocabLayout(
        n_text=tokenizers.text.vocab_size,
        n_image=tokenizers.image.codebook_size,
        n_mask={order: tok.codebook_size for order, tok in tokenizers.masks.items()},
    )


def max_sequence_length(tokenizers, layout: VocabLayout) -> int:
    """Longest training sequence, rounded up to 64: prefix + mask header + the longest order's mask block."""
    prefix = 5 + tokenizers.image.grid**2 + 1 + tokenizers.text.max_length
    blocks = [decoding_order(name, layout, tok).block_length for name, tok in tokenizers.masks.items()]
    return 64 * math.ceil((prefix + HEADER_LENGTH + max(blocks)) / 64)


def build_decoder(recipe: Recipe, tokenizers, layout: VocabLayout) -> MRISDecoder:
    slots, max_text = recipe.decoder["text_slots"], tokenizers.text.max_length
    if 0 < slots < max_text:
        raise ConfigError(f"decoder.text_slots {slots} is shorter than the text tokenizer's max_length {max_text}")
    try:
        config = DecoderConfig(
            vocab_size=layout.vocab_size,
            max_position_embeddings=max_sequence_length(tokenizers, layout) + max(0, slots - max_text),
            n_scales=max(decoding_order(name, layout, tok).n_scale_ids for name, tok in tokenizers.masks.items()),
            **recipe.decoder,
        )
    except ValueError as exc:  # DecoderConfig's cross-field rules (e.g. cell_features needs pixel_channels)
        raise ConfigError(f"{recipe.path or recipe.name}: decoder: {exc}") from exc
    return MRISDecoder(config)


# --- run folder --------------------------------------------------------------------------------------------


def prepare_run_dir(out: Path, tag: str | None) -> Path:
    """`out` itself, or `out/runs/<tag>/` with a copy of the tokenizer files so it is a complete model dir."""
    for name in TOKENIZER_FILES:
        if not (out / name).is_file():
            raise MRISError(
                f"{out} has no {name}: train the tokenizers first (napari-mris-train tokenizers --out {out})"
            )
    if tag is None:
        return out
    run_dir = out / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (run_dir / name).exists():
            shutil.copy2(out / name, run_dir / name)
    return run_dir


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# --- training ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one training run holds, so the loop below reads top to bottom."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    tokenizers: Any
    layout: VocabLayout
    decoder: MRISDecoder  # the weights themselves (validation, checkpoints, the stem warm-up)
    model: Any  # the decoder's Objective as accelerate prepared it (DDP-wrapped on several processes)
    optimizer: Any
    mixer: SequenceMixer
    memory: HETMemory | None
    val_split: Any
    step: int = 0
    best: float = -1.0

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / LAST

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_NAME


def setup(
    recipe: Recipe,
    data_root: Path,
    out: Path,
    tag: str | None,
    resume: bool,
    progress: bool,
    extra_train: tuple[Path, ...] = (),
    init_from: Path | None = None,
) -> Run:
    """Tokenizers, cached data, a fresh decoder and optimizer; the checkpoint's state on top with --resume.

    `extra_train` roots add their Train_Folder pairs to the training data (validation stays `data_root`'s).
    `init_from` starts the decoder from another model directory's weights (same tokenizers and decoder
    shape) instead of from scratch; with `train.freeze_stem` its pixel stem then stays exactly as loaded.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    # Several processes: a step uses the NkTP heads only on a raster batch, and each process draws its own order
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    with accelerator.main_process_first():  # one process copies the tokenizer files and writes the data cache
        run_dir = prepare_run_dir(Path(out), tag)
        last = run_dir / "checkpoints" / LAST
        if last.exists() and not resume:
            raise CheckpointError(f"{last} already exists: pass --resume to continue that run, or --tag for a new one")
        tokenizers = load_tokenizers(run_dir)
        layout = vocab_layout(tokenizers)
        decoder = build_decoder(recipe, tokenizers, layout)
        if init_from is not None:
            initialise_from(decoder, Path(init_from), layout)
        if cfg.freeze_stem:
            freeze_pixel_stem(decoder)
        train_split = concat_splits([load_split(root, split="train") for root in (data_root, *extra_train)])
        val_split = load_split(data_root, split="val")
        data = cached_encoding(run_dir, train_split, tokenizers, int(tokenizers.image.image_size), progress=progress)
    optimizer = adamw(decoder.parameters(), cfg.lr, cfg.weight_decay, cfg.betas)
    memory = HETMemory(cfg.losses.het_memory, cfg.losses.het_max_keys) if cfg.losses.het else None
    step, best = restore(last, recipe, decoder, optimizer, memory) if resume else (0, -1.0)
    model, optimizer = accelerator.prepare(Objective(decoder, layout, cfg.losses, memory), optimizer)
    mixer = SequenceMixer(data, tokenizers, layout, cfg, recipe.decoder["text_slots"])
    parts = (tokenizers, layout, decoder, model, optimizer, mixer, memory, val_split)
    return Run(recipe, run_dir, accelerator, *parts, step, best)


ZERO_INITIALISED = ("cell_position_proj.",)  # modules that start at zero: a source without them loads exactly


def initialise_from(decoder: MRISDecoder, source: Path, layout: VocabLayout) -> None:
    """Load `source`'s decoder weights; its vocabulary must be the run's (the same tokenizers).

    A source without a module this decoder adds at zero (`cell_positions`) still loads: the new decoder
    then computes exactly what the source did, and training starts from there.
    """
    if read_config(source).get("vocab") != layout.to_dict():
        raise ConfigError(f"--init-from {source}: its vocabulary differs from this run's (other tokenizers)")
    state = load_weights(source, "model.safetensors")
    for name, value in decoder.state_dict().items():
        if name.startswith(ZERO_INITIALISED) and name not in state:
            state[name] = value  # already zero
    load_state_checked(decoder, state, source / "model.safetensors")


def freeze_pixel_stem(decoder: MRISDecoder) -> None:
    """Stop gradients into the pixel stem: its features and lesion map stay as loaded (train.freeze_stem).

    Why: after the stem warm-up the text-free lesion map is the best-trained part of the model, and the
    referring work is the decoder's (which lesions the text names). A frozen stem also makes a decoder step
    cheaper (no backward through the CNN) and keeps statistics computed on its features valid.
    """
    if decoder.pixel_stem is None:
        raise ConfigError("train.freeze_stem needs a pixel stem (decoder.pixel_channels)")
    decoder.pixel_stem.requires_grad_(False)


def train_step(run: Run) -> dict[str, Any]:
    """One optimizer step at `run.step`; raises TrainingDiverged before touching the weights on NaN/inf."""
    cfg, acc = run.recipe.train, run.accelerator
    lr = learning_rate(run.step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    tick = time.perf_counter()
    samples = run.mixer.batch(run.step, cfg.batch_size, acc.process_index, acc.num_processes)
    batch = collate_samples(samples, acc.device)
    het_active = cfg.losses.het and run.step >= cfg.losses.het_start * cfg.steps
    run.model.train()
    with acc.autocast():
        terms = run.model(batch, het_active)
    # the mean over the processes, so that every process logs and stops on the same figures
    means = acc.reduce(torch.stack([v.detach().float() for v in terms.values()]), reduction="mean")
    values = dict(zip(terms, means.tolist(), strict=True))
    if not math.isfinite(values["loss"]):
        raise TrainingDiverged(
            f"loss became {values['loss']} at step {run.step + 1} (terms {values}); training stopped, "
            f"{run.run_dir / 'model.safetensors'} and {run.last} keep the last good weights. Lower train.lr, resume."
        )
    run.optimizer.zero_grad(set_to_none=True)
    acc.backward(terms["loss"])
    grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip))
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(
            f"gradient norm became {grad_norm} at step {run.step + 1}; training stopped before the update, "
            f"{run.last} keeps the last good state. Lower train.lr and resume."
        )
    run.optimizer.step()
    run.step += 1
    tokens = int((batch["input_ids"] != 0).sum())
    speed = tokens / (time.perf_counter() - tick)
    return {
        "step": run.step,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": speed,
        "het_active": het_active,
        **values,
    }


def warm_up_stem(run: Run, progress: bool) -> None:
    """Train only the pixel stem (a U-Net) on the text-free lesion target, before the decoder.

    Why: the stem's image understanding bounds the masks (docs/results.md), yet in joint training it gets
    one update per decoder step, and a decoder step (the transformer over ~450-660 tokens) costs several
    times a stem step. `stem_warmup_steps` cheap stem-only steps first give it many more updates for the
    same wall clock. The warm-up has its own AdamW (the decoder's optimizer starts fresh afterwards) and
    a linear warm-up + cosine schedule; a checkpoint is written when it ends, so `--resume` skips it
    (an interrupted warm-up starts over: it lasts minutes).

    `stem_warmup_parts: map` trains only the map (the up-stages and the lesion head) of a loaded model's stem:
    the encoder, whose features the decoder reads with every image token and the domain guard's statistics
    describe, stays bit-identical, so those stay valid. With `freeze_stem` the map is frozen again for the
    decoder steps that follow, which then learn to read the new map (docs/training.md, "A map pass").
    """
    cfg = run.recipe.train
    decoder = run.decoder
    if decoder.pixel_stem is None or decoder.pixel_stem.lesion_map is None:
        raise ConfigError("train.stem_warmup_steps needs a U-Net pixel stem (decoder.pixel_decoder_channels)")
    params = warmed_up_parameters(decoder.pixel_stem, cfg.stem_warmup_parts)
    for param in params:
        param.requires_grad_(True)  # a frozen stem (freeze_stem) opens for its warm-up only
    optimizer = adamw(params, cfg.stem_warmup_lr, cfg.weight_decay, cfg.betas)
    steps, warmup = cfg.stem_warmup_steps, max(1, cfg.stem_warmup_steps // 20)
    decoder.train()
    for step in tqdm(range(steps), desc="stem warm-up", disable=not progress, mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, cfg.stem_warmup_lr, cfg.min_lr, warmup)
        pixels, target = run.mixer.stem_batch(step, cfg.batch_size)
        with run.accelerator.autocast():
            logits = decoder.lesion_logits(pixels.to(run.accelerator.device))
        loss = lesion_loss(logits, target)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"stem warm-up loss became {value} at step {step + 1}; lower stem_warmup_lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if run.accelerator.is_main_process and ((step + 1) % 50 == 0 or step + 1 == steps):
            append_log(run.log_path, {"stem_warmup_step": step + 1, "lesion": value})
    if cfg.freeze_stem:
        freeze_pixel_stem(decoder)
    if run.accelerator.num_processes > 1:  # each process warmed up alike; the main one's stem is the one kept
        for tensor in decoder.pixel_stem.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    save_state(run)


def warmed_up_parameters(stem, parts: str) -> list[torch.nn.Parameter]:
    """The stem parameters a warm-up trains: all of them, or only the map's (`map`: up-stages + lesion head)."""
    if parts == "map":
        return [*stem.up.parameters(), *stem.lesion_map.parameters()]
    return list(stem.parameters())


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict, tensor by tensor in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(run: Run) -> None:
    """Write the checkpoint (main process) after checking that every process holds the same weights.

    DDP keeps the replicas identical by construction (the same averaged gradient, the same update); the
    check makes a broken assumption (a step outside DDP, a nondeterministic warm-up) an error here rather
    than a run that silently trains N different models. `state.json` records the digests.
    """
    from accelerate.utils import gather_object

    run.accelerator.wait_for_everyone()
    state = run.decoder.state_dict()
    replicas = gather_object([weights_digest(state)])
    if len(set(replicas)) > 1:
        raise TrainingDiverged(f"the {len(replicas)} processes hold different weights at step {run.step}: {replicas}")
    if not run.accelerator.is_main_process:
        return
    cfg = run.recipe.train
    info = {
        "step": run.step,
        "best_score": run.best,
        "data_position": run.step * cfg.batch_size * run.accelerator.num_processes,  # data = f(seed, step)
        "recipe": recipe_snapshot(run.recipe),
        "replicas": replicas,
    }
    memory = run.memory.state_dict() if run.memory else None  # the main process's; each process keeps its own
    save_checkpoint(run.last, state, run.optimizer, memory, info)


def train(
    recipe: Recipe,
    data_root: Path,
    out: Path,
    *,
    tag: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    extra_train: tuple[Path, ...] = (),
    init_from: Path | None = None,
) -> Path:
    """Train (or resume) the decoder of the model directory `out`; returns the run's model directory."""
    run = setup(recipe, data_root, out, tag, resume, progress, tuple(extra_train), init_from)
    cfg = recipe.train
    end = cfg.steps if stop_after is None else min(cfg.steps, run.step + stop_after)
    # the whole stem warms up only from scratch; a loaded model's stem only ever has its map warmed up again
    warm_up = cfg.stem_warmup_steps and (cfg.stem_warmup_parts == "map" or (not cfg.freeze_stem and init_from is None))
    if warm_up and not run.last.exists():  # a checkpoint means the warm-up is behind us
        warm_up_stem(run, progress)
    bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {recipe.name}", disable=not progress)
    while run.step < end:
        record = train_step(run)
        bar.update(1)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "ntp", "tcl", "nktp", "het", "tokens_per_s")})
        if run.accelerator.is_main_process:
            append_log(run.log_path, record)
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            run.best = validate(run)
        if run.step % cfg.checkpoint_every == 0 or run.step == end:
            save_state(run)
    bar.close()
    run.accelerator.wait_for_everyone()  # all processes are done writing; the CLI ends them (end_process)
    return run.run_dir


def recipe_snapshot(recipe: Recipe) -> dict[str, Any]:
    return {"decoder": dict(recipe.decoder), "train": asdict(recipe.train)}


def restore(last: Path, recipe: Recipe, decoder, optimizer, memory: HETMemory | None) -> tuple[int, float]:
    """Load a checkpoint into the fresh decoder, optimizer and HET memory; returns (step, best Dice)."""
    tensors, info = load_checkpoint(last)
    saved = decoder_settings(info["recipe"]["decoder"], f"{last}: decoder")  # older snapshots lack some defaults
    if saved != recipe.decoder:
        raise CheckpointError(f"{last} was trained with decoder {saved}; the recipe now asks for {recipe.decoder}")
    decoder.load_state_dict(part(tensors, "model"))
    try:
        load_optimizer(optimizer, part(tensors, "optim"), info["param_groups"])
    except ValueError as exc:  # other parameter groups, e.g. from before decay was kept off 1-D weights
        raise CheckpointError(
            f"{last}: its optimizer state does not fit this trainer ({exc}); start a new run with --init-from"
        ) from exc
    if memory is not None and "het.keys" in tensors:
        memory.load_state_dict(part(tensors, "het"))
    restore_rng(tensors, info["rng"])
    return int(info["step"]), float(info["best_score"])


@torch.no_grad()
def validate(run: Run) -> float:
    """The referring benchmark's selection score on the first `val_images` of Val_Folder, mean over the
    trained orders; keeps the best weights.

    The score mixes full-description, one-side and one-zone Dice with N-Acc on absent prompts
    (evaluate.SELECTION_SETS): on QaTa-COV19 full descriptions alone reward a decoder that ignores the text.
    """
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return run.best
    decoder = run.decoder
    decoder.eval()
    config = read_config(run.run_dir)
    pipeline = MRISPipeline(
        run.run_dir, config, run.tokenizers, decoder, run.layout, acc.device, None, f"step-{run.step}"
    )
    scores, details = {}, {}
    for order in run.recipe.train.orders:
        report = evaluate_split(
            pipeline,
            run.val_split,
            order=order,
            limit=run.recipe.train.val_images,
            sets=SELECTION_SETS,
            progress=False,
        )
        scores[order] = report["selection"]
        details[order] = {name: s.get("dice", s["not_present"]) for name, s in report["sets"].items()}
    score = sum(scores.values()) / len(scores)
    improved = score > run.best
    if improved:
        save_decoder(decoder, run.layout, run.run_dir)
    append_log(
        run.log_path,
        {"step": run.step, "val_selection": score, "val_by_order": scores, "val_sets": details, "saved_best": improved},
    )
    tqdm.write(
        f"step {run.step}: validation selection score {100 * score:.2f} % {details}"
        + (" (best, saved)" if improved else "")
    )
    decoder.train()
    return max(run.best, score)


# --- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="recipe, e.g. training/configs/default.yaml")
    add_training_data(parser, "another LViT root whose Train_Folder joins the training data (repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="model directory holding the trained tokenizers")
    parser.add_argument("--resume", action="store_true", help="continue from <run>/checkpoints/last exactly")
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="MODEL_DIR",
        help="start the decoder from this model directory's weights (same tokenizers), e.g. a second stage",
    )
    parser.add_argument("--steps", type=int, help="total training steps (overrides train.steps)")
    parser.add_argument("--seed", type=int, help="data and prompt seed (overrides train.seed)")
    parser.add_argument("--stop-after", type=int, help="run at most N steps now, checkpoint, and exit")
    parser.add_argument("--no-tcl", action="store_true", help="switch off the contrastive token loss")
    parser.add_argument("--no-nktp", action="store_true", help="switch off next-k-token prediction")
    parser.add_argument("--no-het", action="store_true", help="switch off the hard-example token loss")
    parser.add_argument("--tag", help="a separate run in <out>/runs/TAG (for ablations)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = load_recipe(args.config)
    train_cfg = recipe.train
    losses = replace(
        train_cfg.losses,
        tcl=train_cfg.losses.tcl and not args.no_tcl,
        nktp=train_cfg.losses.nktp and not args.no_nktp,
        het=train_cfg.losses.het and not args.no_het,
    )
    seed = train_cfg.seed if args.seed is None else args.seed
    train_cfg = replace(train_cfg, losses=losses, steps=args.steps or train_cfg.steps, seed=seed)
    return replace(recipe, train=train_cfg)


def end_process(code: int) -> int:
    """The exit code of `napari-mris-train train`; a process of a distributed run exits here, at once.

    Why not `destroy_process_group()` and a normal exit: the Gloo group's destructor joins its threads while
    holding the GIL, and a thread still freeing a finished collective's Python tensor waits for the GIL: a
    deadlock (seen in CI under load: rank 1 hung after a finished run; pytorch/pytorch#56297). Without the
    destructor, interpreter shutdown with Gloo's threads alive can abort (SIGABRT). Every file of the run is
    written atomically and closed before this point, so skipping the interpreter's shutdown loses nothing.
    """
    if torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(args: argparse.Namespace) -> int:
    try:
        run_dir = train(
            recipe_from_args(args),
            args.data,
            args.out,
            tag=args.tag,
            resume=args.resume,
            stop_after=args.stop_after,
            progress=not args.quiet,
            extra_train=tuple(args.extra_train),
            init_from=args.init_from,
        )
    except MRISError as exc:  # diverged, checkpoint, recipe, dataset or model-directory problems
        print(f"error: {exc}")
        return end_process(1)
    print(f"model directory: {run_dir}")
    return end_process(0)
