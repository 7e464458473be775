"""TextTokenizer: training, normalisation, empty and overlong prompts, unknown words, loading."""

from __future__ import annotations

import warnings

import pytest

from napari_mris.errors import ModelDirectoryError, PromptError
from napari_mris.tokenizers.text import TextTokenizer, normalize_prompt

DESCRIPTIONS = [
    "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, middle left lung.",
    "Bilateral pulmonary infection, three infected areas, upper left lung and middle right lung.",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(DESCRIPTIONS, vocab_size=400, max_length=12)


def test_case_and_whitespace_do_not_change_the_tokens(tok):
    assert tok.encode("  Lower   RIGHT\tlung\n") == tok.encode("lower right lung")
    assert normalize_prompt("ＬＯＷＥＲ  lung ") == "lower lung"  # NFKC folds full-width letters


def test_roundtrip_and_vocab_size(tok):
    ids = tok.encode("middle left lung")
    assert tok.decode(ids) == "middle left lung"
    assert 258 <= tok.vocab_size <= 400
    assert all(0 <= i < tok.vocab_size for i in ids)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", "...", " ?! - "])
def test_empty_prompts_raise(tok, prompt):
    with pytest.raises(PromptError, match="empty"):
        tok.encode(prompt)


def test_overlong_prompt_is_refused_and_training_data_is_cut_with_a_warning(tok):
    """A user's prompt past the limit is refused (its end, often the location, would be lost); a training
    description is cut to the text slots the recipe gave it, with a warning."""
    overlong = " ".join(["upper left lung"] * 20)
    with pytest.raises(PromptError, match=r"tokens long and the model reads at most 12"):
        tok.encode(overlong)
    with pytest.warns(UserWarning, match="first 12 tokens"):
        ids = tok.encode(overlong, truncate=True)
    assert len(ids) == 12
    assert len(tok.encode("upper left lung", truncate=True)) < 12


def test_short_prompt_gives_no_warning(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode("upper left lung")


def test_unknown_words_and_scripts_never_crash(tok):
    for prompt in ("pneumomediastinum", "épanchement pleural", "肺炎 左肺", "x" * 30 + " 🫁"):
        with warnings.catch_warnings():  # the last one is past the 12-token limit: cut, not refused, here
            warnings.simplefilter("ignore", UserWarning)
            ids = tok.encode(prompt, truncate=True)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(tok.encode("épanchement")) == "épanchement"  # byte-level: nothing is lost


def test_save_and_load_file_and_hf_directory(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = TextTokenizer.from_file(tmp_path / "tokenizer.json", max_length=12)
    assert loaded.encode("all left lung") == tok.encode("all left lung")
    hf_dir = tmp_path / "hf"
    tok.hf.save_pretrained(hf_dir)  # the layout of any local HF tokenizer folder (tokenizer.json + config)
    from_dir = TextTokenizer.from_file(hf_dir, max_length=12)
    assert from_dir.encode("all left lung") == tok.encode("all left lung")


def test_missing_or_corrupt_tokenizer_names_the_file(tmp_path):
    with pytest.raises(ModelDirectoryError, match="nothere.json"):
        TextTokenizer.from_file(tmp_path / "nothere.json")
    with pytest.raises(ModelDirectoryError, match="has no tokenizer.json"):
        TextTokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelDirectoryError, match="not a readable tokenizer"):
        TextTokenizer.from_file(bad)
