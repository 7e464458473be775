"""Which words of a prompt the model was trained on (`prompt_vocabulary.json` in a model directory).

The text tokenizer is byte-level, so no prompt is ever "unknown" to it: "asdf qwerty", a Chinese sentence or
"liver" all become tokens, and the model, trained only on its training descriptions' few dozen words, draws
the same lesion mask as for a real description. The vocabulary file records the words of those descriptions
(`napari-mris-train vocabulary` writes it), so a prompt with no known word is refused with the list of what
the model knows, and the unknown words of a partly known prompt are named. A model directory without the
file is not checked. This module imports no torch, so the widget can offer the words before a model loads.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_mris.errors import ModelDirectoryError, PromptError
from napari_mris.io.atomic import write_text_atomic

VOCABULARY_FILE = "prompt_vocabulary.json"
FORMAT_VERSION = 1
# Categories whose words alone do not make a prompt usable ("and" says nothing about where to look; nor do
# the report sentences a model trained with free wording learnt to read past, "Findings: ... No effusion.").
CONNECTIVE = "connective"
REPORT = "report"
NOT_NAMING = (CONNECTIVE, REPORT)
CATEGORY_ORDER = ("finding", "side", "zone", "count", CONNECTIVE, REPORT, "other")
_WORD = re.compile(r"[^\W\d_]+|\d+")  # letter runs (any script) or digit runs; punctuation separates words


def prompt_words(prompt: str) -> list[str]:
    """The words of a prompt as the vocabulary sees them: NFKC, case-folded, split at anything not a letter/digit."""
    return _WORD.findall(unicodedata.normalize("NFKC", prompt).casefold())


@dataclass(frozen=True)
class PromptCheck:
    """The verdict on a usable prompt: its words the model knows and the ones it does not."""

    known: tuple[str, ...]
    unknown: tuple[str, ...]
    suggestions: dict[str, str] = field(default_factory=dict)  # unknown word -> the closest known word

    def note(self) -> str | None:
        """One line for the status line / CLI, naming the unknown words; None when every word is known."""
        if not self.unknown:
            return None
        named = ", ".join(
            f"{word!r} (did you mean {self.suggestions[word]!r}?)" if word in self.suggestions else repr(word)
            for word in self.unknown
        )
        return f"ignored words the model was not trained on: {named}"


@dataclass(frozen=True)
class PromptVocabulary:
    """The words of a model's training descriptions, by category, plus example prompts."""

    categories: dict[str, tuple[str, ...]]
    examples: tuple[str, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)  # how it was made (dataset, counts, min_count)

    @property
    def words(self) -> frozenset[str]:
        return frozenset(word for words in self.categories.values() for word in words)

    @property
    def content_words(self) -> frozenset[str]:
        return frozenset(w for cat, words in self.categories.items() if cat not in NOT_NAMING for w in words)

    def summary(self) -> str:
        """'finding: infected, infection, ...; side: left, ...' (the list shown when a prompt is refused; the
        report words are left out: they describe no finding)."""
        cats = [cat for cat in _ordered(self.categories) if self.categories[cat] and cat != REPORT]
        return "; ".join(f"{cat}: {', '.join(self.categories[cat])}" for cat in cats)

    def check(self, prompt: str) -> PromptCheck:
        """Known and unknown words of `prompt`; PromptError when none of its words names a known finding,
        side, zone or count (the model would answer with a mask that has nothing to do with the prompt)."""
        words = list(dict.fromkeys(prompt_words(prompt)))
        known = tuple(w for w in words if w in self.words)
        unknown = tuple(w for w in words if w not in self.words)
        if not any(w in self.content_words for w in known):
            example = f" e.g. {self.examples[0]!r}" if self.examples else ""
            raise PromptError(
                f"The prompt {prompt!r} has no word the model was trained on (it cannot tell what to segment); "
                f"its training descriptions use only: {self.summary()};{example}"
            )
        vocabulary = sorted(self.content_words)
        suggestions = {}
        for word in unknown:
            close = difflib.get_close_matches(word, vocabulary, n=1, cutoff=0.75)
            if close:
                suggestions[word] = close[0]
        return PromptCheck(known, unknown, suggestions)

    def completions(self) -> list[str]:
        """Example prompts first, then every word that describes a finding (for a completer or an examples list)."""
        return [*self.examples, *sorted(w for cat, ws in self.categories.items() if cat != REPORT for w in ws)]

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "categories": {cat: list(self.categories[cat]) for cat in _ordered(self.categories)},
            "examples": list(self.examples),
            "source": self.source,
        }

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / VOCABULARY_FILE
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> PromptVocabulary | None:
        """The model directory's vocabulary, or None when it has no `prompt_vocabulary.json` (no check)."""
        path = Path(model_dir) / VOCABULARY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
            categories = {str(cat): tuple(str(w) for w in words) for cat, words in data["categories"].items()}
            examples = tuple(str(e) for e in data.get("examples", ()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelDirectoryError(f"{path} is not a readable prompt vocabulary: {exc}") from exc
        if not any(words for cat, words in categories.items() if cat not in NOT_NAMING):
            raise ModelDirectoryError(f"{path} lists no words")
        return cls(categories, examples, dict(data.get("source", {})))


def _ordered(categories: dict[str, Any]) -> list[str]:
    known = [cat for cat in CATEGORY_ORDER if cat in categories]
    return known + sorted(cat for cat in categories if cat not in CATEGORY_ORDER)
