"""Prompt check: the model directory's training vocabulary refuses prompts with no known word and names the
unknown words of the others (napari_mris.prompt_check, napari-mris-train vocabulary)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from napari_mris.errors import ModelDirectoryError, PromptError
from napari_mris.io import read_slice
from napari_mris.model_location import DEFAULT_MODEL_DIR
from napari_mris.phantom import describe
from napari_mris.pipeline import MRISPipeline
from napari_mris.prompt_check import VOCABULARY_FILE, PromptVocabulary, prompt_words
from napari_mris_train.cli import main as train_main
from napari_mris_train.vocabulary import build_vocabulary

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
DESCRIPTIONS = [
    "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
] * 10 + ["Unilateral pulmonary infection, one infected area, lowerl left lung."]  # a typo, used once


@pytest.fixture(scope="module")
def default_pipeline() -> MRISPipeline:
    return MRISPipeline.from_pretrained("default", device="cpu")


def test_words_are_case_folded_and_split_at_punctuation() -> None:
    assert prompt_words("Lower-LEFT lung, 2 areas.") == ["lower", "left", "lung", "2", "areas"]
    assert prompt_words("左下肺感染") == ["左下肺感染"]


def test_vocabulary_keeps_frequent_and_constructed_words_and_drops_typos() -> None:
    vocabulary = build_vocabulary(DESCRIPTIONS, min_count=10)
    assert {"bilateral", "left", "lower", "lung", "infected", "and"} <= vocabulary.words
    assert {"upper", "middle", "three", "ten"} <= vocabulary.words  # from the constructed prompts (describe)
    assert "lowerl" not in vocabulary.words and vocabulary.source["dropped_rare_words"] == ["lowerl"]
    assert vocabulary.categories["count"][:3] == ("one", "two", "three")  # number order, not alphabetical
    assert vocabulary.examples[0] in DESCRIPTIONS


def test_a_model_trained_with_free_wording_knows_the_report_words_but_they_name_nothing() -> None:
    plain, worded = build_vocabulary(DESCRIPTIONS), build_vocabulary(DESCRIPTIONS, wording=True)
    sentence = "Findings: lower left lung. No pleural effusion."
    assert plain.check(sentence).unknown == ("findings", "no", "pleural", "effusion")
    assert worded.check(sentence).note() is None and {"findings", "effusion"} <= set(worded.categories["report"])
    assert "lung" not in worded.categories["report"]  # a description's word keeps its own category
    with pytest.raises(PromptError) as caught:  # report words alone say nothing about what to segment
        worded.check("No pleural effusion.")
    assert "report" not in str(caught.value) and "effusion" not in worded.completions()


@pytest.mark.parametrize("prompt", ["asdf qwerty", "左下肺感染", "and", "segment the liver"])
def test_a_prompt_with_no_known_word_is_refused_with_the_list(prompt) -> None:
    vocabulary = build_vocabulary(DESCRIPTIONS)
    with pytest.raises(PromptError) as caught:
        vocabulary.check(prompt)
    message = str(caught.value)
    assert repr(prompt) in message and "side: bilateral, left, right, unilateral" in message
    assert "zone: upper, middle, lower, all, lung" in message


def test_unknown_words_of_a_usable_prompt_are_named_with_suggestions() -> None:
    vocabulary = build_vocabulary(DESCRIPTIONS)
    check = vocabulary.check("lower left lung asdf")
    assert check.known == ("lower", "left", "lung") and check.unknown == ("asdf",)
    assert "'asdf'" in check.note()
    assert "did you mean 'lower'" in vocabulary.check("lowr left lung").note()
    assert vocabulary.check(describe(["upper right", "lower left"], 2)).note() is None


def test_file_round_trip_and_bad_files(tmp_path) -> None:
    assert PromptVocabulary.load(tmp_path) is None  # no file: no check
    vocabulary = build_vocabulary(DESCRIPTIONS)
    vocabulary.save(tmp_path)
    assert PromptVocabulary.load(tmp_path) == vocabulary
    (tmp_path / VOCABULARY_FILE).write_text('{"format_version": 1, "categories": {"connective": ["and"]}}')
    with pytest.raises(ModelDirectoryError, match="lists no words"):
        PromptVocabulary.load(tmp_path)
    (tmp_path / VOCABULARY_FILE).write_text("{not json")
    with pytest.raises(ModelDirectoryError, match=VOCABULARY_FILE):
        PromptVocabulary.load(tmp_path)


def test_shipped_file_is_what_the_command_writes_from_qata(qata_root, tmp_path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "config.json", model / "config.json")
    assert train_main(["vocabulary", "--model", str(model), "--data", str(qata_root), "--wording"]) == 0
    written = json.loads((model / VOCABULARY_FILE).read_text(encoding="utf-8"))
    shipped = json.loads((DEFAULT_MODEL_DIR / VOCABULARY_FILE).read_text(encoding="utf-8"))
    assert written["categories"] == shipped["categories"] and written["examples"] == shipped["examples"]


def test_default_model_refuses_unknown_prompts_and_names_ignored_words(default_pipeline) -> None:
    image = read_slice(SAMPLES / "img" / "phantom_07.png", expect_2d=True)
    for prompt in ("asdf qwerty", "左下肺感染"):
        with pytest.raises(PromptError, match="its training descriptions use only: finding: "):
            default_pipeline.segment(image.pixels, prompt, window=image.window)
    result = default_pipeline.segment(image.pixels, "lower left lung asdf", window=image.window)
    assert result.finished and any("'asdf'" in note for note in result.warnings)
    assert not any("lower" in note for note in result.warnings)


def test_a_model_without_the_file_checks_nothing(tiny_pipeline) -> None:  # noqa: F811
    assert tiny_pipeline.vocabulary is None and tiny_pipeline.check_prompt("asdf qwerty") is None
