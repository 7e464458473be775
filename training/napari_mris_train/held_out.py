"""Hold back part of the corrections from fine-tuning and score the base model and the adapter on them.

Why: a user deciding whether to switch to an adapter needs its effect on their own cases, and only cases
the adapter did not train on say that (training cases it would simply have learnt). Which cases are held
back is `napari_mris.adaptation.held_out_names` (a hash of the name), so the runtime and this child agree;
the comparison is `napari_mris.adaptation.compare_on_held_out`, stored with the adapter.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from napari_mris.adaptation import HeldOutComparison, compare_on_held_out, held_out_names
from napari_mris.phantom import write_text_table
from napari_mris.pipeline import MRISPipeline
from napari_mris_train.data import Example


def split_held_out(split, fraction: float, scratch: str | Path) -> tuple[Path, list[Example]]:
    """(an LViT folder of the training part, the held-back examples); without any held back, (the
    split's own folder, []). The training part's files are hard links (copies across file systems)."""
    held = set(held_out_names(split.names, fraction))
    if not held:
        return Path(split.folder), []
    folder = Path(scratch) / "train_part"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows, examples = [], []
    for index, (name, image_path, mask_path, description) in enumerate(split.pairs):
        if name in held:
            examples.append(split[index])
            continue
        for source, target in ((image_path, folder / "img"), (mask_path, folder / "labelcol")):
            _link_or_copy(source, target / source.name)
        rows.append((mask_path.name, description))
    write_text_table(folder / "train_part_text.csv", rows)
    return folder, examples


def score_held_out(
    base: MRISPipeline,
    decoder,
    layout,
    examples: list[Example],
    name: str,
    lesion_threshold: float,
    progress: Callable[[int, int], None] | None = None,
) -> HeldOutComparison:
    """The `base` pipeline and the fine-tuned `decoder` (its Llama peft-wrapped; a merged copy is scored,
    the decoder itself is left as it is for saving) with the adapter's `lesion_threshold` on the held-back
    examples, as the widget decodes them."""
    merged = copy.deepcopy(decoder)
    merged.llama = merged.llama.merge_and_unload()
    adapted = MRISPipeline(
        base.model_dir,
        base.config,
        base.tokenizers,
        merged.eval(),
        layout,
        base.device,
        name,
        base.model_hash,
        presence_decoder=base.decoder,  # the base decides presence, as when the adapter is loaded
        lesion_threshold=lesion_threshold,
    )
    items = [(e.name, e.image, e.description, e.mask) for e in examples]
    return compare_on_held_out(base, adapted, items, progress)


def report_held_out(done: int, total: int) -> None:
    """The line protocol the widget's adaptation job parses (napari_mris.adaptation.HELD_OUT_LINE)."""
    print(f"held-back {done}/{total}", flush=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
