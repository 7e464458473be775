"""Text tokenizer: a free-text finding -> token ids.

The paper uses Qwen's tokenizer; here a small byte-level BPE is trained with HF `tokenizers` on the
training descriptions plus a built-in radiology prompt vocabulary, so that words a user types but the
templates never use (effusion, nodule, ...) still get sensible pieces. Byte-level means no word is ever
unknown. Any local HF tokenizer directory (e.g. Qwen's) can be used instead.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from napari_mris.errors import ModelDirectoryError, PromptError
from napari_mris.io.atomic import write_text_atomic

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]")

_ZONES = [f"{level} {side} lung" for level in ("upper", "middle", "lower", "all") for side in ("left", "right")]
_COUNTS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "multiple"]
PROMPT_VOCABULARY: tuple[str, ...] = (
    *_ZONES,
    "left lung. right lung. both lungs. bilateral. unilateral. upper lobe. middle lobe. lower lobe. lingula.",
    "apex apical basal base hilar perihilar peripheral central lateral medial anterior posterior zone field",
    " ".join(f"{c} infected area{'s' if c != 'one' else ''}" for c in _COUNTS),
    "pulmonary infection infected area region lesion lesions opacity opacities consolidation ground-glass",
    "ground glass opacity pneumonia covid-19 covid infiltrate infiltrates effusion pleural pneumothorax nodule",
    "mass atelectasis edema fibrosis cardiomegaly heart liver spine kidney spleen tumor tumour cyst fracture",
    "segment the find the show the where is the no abnormality normal findings there is a small large diffuse",
    "patchy focal mild moderate severe extensive chest x-ray ct slice axial image mask of in on at the and with",
)

_PUNCT_ONLY = re.compile(r"^[\W_]*$")


def normalize_prompt(prompt: str) -> str:
    """NFKC, lower case, single spaces: the same prompt typed twice gives the same tokens."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", prompt).lower()).strip()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on the descriptions plus the built-in prompt vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, *PROMPT_VOCABULARY], trainer=trainer)
    return tokenizer


class TextTokenizer:
    """Prompt -> ids through `PreTrainedTokenizerFast`, with the project's normalisation and checks."""

    def __init__(self, hf: PreTrainedTokenizerFast, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.hf = hf
        self.max_length = int(max_length)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, max_length: int) -> TextTokenizer:
        return cls(PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, vocab_size)), max_length)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 64) -> TextTokenizer:
        """A `tokenizer.json` file, or a directory holding one (ours, or any local HF tokenizer)."""
        path = Path(path)
        if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
            raise ModelDirectoryError(f"{path} has no {TOKENIZER_FILE} (a fast HF tokenizer is needed)")
        if not path.exists():
            raise ModelDirectoryError(f"Text tokenizer not found: {path}")
        try:
            if path.is_dir():
                hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
            else:
                hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for corrupt JSON
            raise ModelDirectoryError(f"{path} is not a readable tokenizer: {exc}") from exc
        return cls(hf, max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, prompt: str, truncate: bool = False) -> list[int]:
        """Token ids of a prompt; PromptError when it is empty or longer than the model reads (`max_length`).

        Why refuse rather than cut: a finding usually names where it is at the end ("... in the lower left
        lung"), and a cut prompt would be answered for what is left of it. `truncate=True` (training data,
        whose descriptions the recipe sized the text slots for) cuts to the limit with a warning instead.
        """
        text = normalize_prompt(prompt)
        if not text or _PUNCT_ONLY.match(text):
            raise PromptError(f"the prompt {prompt!r} is empty; describe the finding, e.g. 'lower left lung infection'")
        ids = self.hf.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_length:
            return ids
        if not truncate:
            raise PromptError(
                f"the prompt is {len(ids)} tokens long and the model reads at most {self.max_length}: its end "
                "would be cut off; shorten it to the finding and where it is, e.g. 'lower left lung infection'"
            )
        warnings.warn(
            f"the prompt is {len(ids)} tokens long; only the first {self.max_length} tokens (the model's limit)"
            " are used",
            UserWarning,
            stacklevel=2,
        )
        return ids[: self.max_length]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically."""
        write_text_atomic(path, self.hf.backend_tokenizer.to_str(pretty=True))

    def to_config(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_length": self.max_length, "file": TOKENIZER_FILE}
