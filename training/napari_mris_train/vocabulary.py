"""`napari-mris-train vocabulary`: record the words of a model's training descriptions in its directory.

The runtime refuses a prompt with none of these words and names the unknown words of a partly known one
(`napari_mris.prompt_check`). The vocabulary is the words of the constructed prompts (`phantom.describe`,
which `prompts.py` uses for zone-restricted and absent-target prompts) plus every word that occurs at least
`--min-count` times in the training split's descriptions; rarer words are annotators' typos
("lowerl", "midddle": QaTa-COV19's Train_Folder has 47 distinct words, 17 of them used 10 times or more),
which a user should not be offered. With `--wording` (a model trained with `train.wording_fraction`) the
words of the report sentences training put prompts into (`prompts.reword`) are recorded too, as `report`
words: the model read past them, so they are not "unknown", but alone they name nothing to segment.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from napari_mris.errors import MRISError
from napari_mris.phantom import LEVELS, NUMBER_WORDS, SIDES, ZONES, describe
from napari_mris.prompt_check import CONNECTIVE, REPORT, PromptVocabulary, prompt_words
from napari_mris_train.prompts import WORDING_CLOSINGS, WORDING_OPENINGS

DEFAULT_MIN_COUNT = 10
MAX_AREAS = 10  # the constructed prompts spell counts up to ten as words
N_EXAMPLES = 6
# Which category a word belongs to; a word in none of them is "other".
CATEGORIES: dict[str, frozenset[str]] = {
    "finding": frozenset({"pulmonary", "infection", "infected", "area", "areas"}),
    "side": frozenset({*SIDES, "bilateral", "unilateral"}),
    "zone": frozenset({*LEVELS, "all", "lung", "lungs"}),
    "count": frozenset(NUMBER_WORDS),
    CONNECTIVE: frozenset({"and"}),
}


def constructed_words() -> set[str]:
    """Every word `phantom.describe` can write: all zone sets, area counts 1..MAX_AREAS."""
    words: set[str] = set()
    for k in range(1, len(ZONES) + 1):
        for zones in itertools.combinations(ZONES, k):
            words.update(prompt_words(describe(list(zones), 1)))
    for n in range(1, MAX_AREAS + 1):
        words.update(prompt_words(describe([ZONES[0]], n)))
    return words


def wording_words() -> set[str]:
    """Every word of the report sentences `prompts.reword` puts training prompts into."""
    return {word for text in (*WORDING_OPENINGS, *WORDING_CLOSINGS) for word in prompt_words(text)}


def build_vocabulary(
    descriptions: Iterable[str], min_count: int = DEFAULT_MIN_COUNT, source: str = "", wording: bool = False
) -> PromptVocabulary:
    """The vocabulary of `descriptions` (words used >= `min_count` times) plus the constructed prompts' words,
    and with `wording` the report sentences' words (category `report` unless they belong to another)."""
    descriptions = list(descriptions)
    counts = Counter(word for text in descriptions for word in prompt_words(text))
    frequent = {word for word, n in counts.items() if n >= min_count}
    words = frequent | constructed_words()
    report = wording_words() - words if wording else set()
    categories: dict[str, list[str]] = {}
    for word in sorted(words | report, key=_reading_order):
        category = next((cat for cat, members in CATEGORIES.items() if word in members), "other")
        category = REPORT if word in report and category == "other" else category
        categories.setdefault(category, []).append(word)
    common = Counter(" ".join(text.split()) for text in descriptions).most_common(N_EXAMPLES)
    examples = [text for text, _ in common] or [describe(["lower left", "lower right"], 2)]
    return PromptVocabulary(
        {cat: tuple(ws) for cat, ws in categories.items()},
        tuple(examples),
        {
            "dataset": source,
            "descriptions": len(descriptions),
            "distinct_words": len(counts),
            "min_count": min_count,
            "wording": wording,
            "dropped_rare_words": sorted(set(counts) - words),
        },
    )


def _reading_order(word: str) -> tuple[int, str]:
    """Counts in number order, levels top to bottom, then alphabetical."""
    ordered = (*NUMBER_WORDS, *LEVELS, "all", "lung", "lungs")
    return (ordered.index(word), "") if word in ordered else (len(ordered), word)


def _record_in_manifest(path: Path) -> None:
    """Add the file's entry to the model directory's SHA256SUMS, when it has one (modeldir.verify_model_dir
    refuses unlisted files); the other entries are kept as they are, so a damaged file stays detected."""
    from napari_mris.io.atomic import write_text_atomic
    from napari_mris.model.modeldir import MANIFEST_NAME, file_sha256, manifest_text, read_manifest

    manifest = read_manifest(path.parent)
    if manifest is not None:
        manifest[path.name] = file_sha256(path)
        write_text_atomic(path.parent / MANIFEST_NAME, manifest_text(manifest))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the model directory to write the file into")
    parser.add_argument("--data", required=True, type=Path, help="LViT root (or Train_Folder) of the training data")
    parser.add_argument(
        "--min-count", type=int, default=DEFAULT_MIN_COUNT, help="keep description words used at least this often"
    )
    parser.add_argument(
        "--wording",
        action="store_true",
        help="also the report sentences' words (for a model trained with train.wording_fraction > 0)",
    )


def run(args: argparse.Namespace) -> int:
    from napari_mris_train.data import load_split

    try:
        if not (args.model / "config.json").is_file():
            raise MRISError(f"{args.model} is not a model directory (no config.json)")
        split = load_split(args.data, split="train")
        vocabulary = build_vocabulary(split.descriptions, args.min_count, str(split.folder), args.wording)
        path = vocabulary.save(args.model)
        _record_in_manifest(path)
    except (MRISError, OSError) as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {path}: {len(vocabulary.words)} words from {len(split)} descriptions ({vocabulary.summary()})")
    return 0
