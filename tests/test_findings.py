"""Several findings: the list's rules, the label map (overlap rule), stated lesion counts and instances."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mris.errors import PromptError
from napari_mris.findings import MAX_FINDINGS, check_findings, instances, label_map, split_findings, stated_count


def test_check_findings_names_each_problem() -> None:
    assert check_findings(("lower left lung", "upper right lung")) == ["lower left lung", "upper right lung"]
    with pytest.raises(PromptError, match="Finding 3 repeats finding 1 \\(.lower LEFT   lung.\\)"):
        check_findings(["lower left lung", "upper right lung", " lower LEFT   lung "])
    with pytest.raises(PromptError, match="Finding 2 of 3 is empty; remove the empty line"):
        check_findings(["lower left lung", "", "upper right lung"])
    with pytest.raises(PromptError, match="The prompt is empty"):
        check_findings(["  "])
    with pytest.raises(PromptError, match=f"{MAX_FINDINGS + 1} findings, more than the {MAX_FINDINGS}"):
        check_findings([f"zone {i}" for i in range(MAX_FINDINGS + 1)])
    assert len(check_findings([f"zone {i}" for i in range(MAX_FINDINGS)])) == MAX_FINDINGS
    with pytest.raises(PromptError, match="No finding"):
        check_findings([])
    with pytest.raises(TypeError):
        check_findings("lower left lung")  # a string is not a list of findings (it would be one per letter)


def test_split_findings_keeps_inner_blank_lines_for_the_check() -> None:
    assert split_findings("\n lower left lung\nupper right lung\n\n") == [" lower left lung", "upper right lung"]
    assert split_findings("a\n\nb") == ["a", "", "b"]
    assert split_findings("") == []


def test_label_map_gives_overlaps_to_the_more_probable_finding() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:, :3] = True
    b[:, 1:] = True
    pa = np.where(a, 0.9, 0.1).astype(np.float32)
    pb = np.where(b, 0.6, 0.1).astype(np.float32)
    pb[:, 2] = 0.95  # finding 2 is surer in column 2, finding 1 in column 1
    labels = label_map([a, b], [pa, pb])
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[0], [1, 1, 2, 2])
    tie = label_map([a, b], [a.astype(np.float32), b.astype(np.float32)])
    np.testing.assert_array_equal(tie[0], [1, 1, 1, 2])  # equal probabilities: the finding given first
    rejected = label_map([a, np.zeros_like(b)], [pa, None])
    np.testing.assert_array_equal(rejected[0], [1, 1, 1, 0])


@pytest.mark.parametrize(
    ("prompt", "count"),
    [
        ("Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung.", 2),
        ("Unilateral pulmonary infection, one infected area, upper left lung.", 1),
        ("3 lesions in the right lung", 3),
        ("Bilateral pulmonary infection, three infected areas, all left lung and lower right lung.", 3),
        ("lower left lung", None),
        ("several opacities", None),
    ],
)
def test_stated_count(prompt: str, count: int | None) -> None:
    assert stated_count(prompt) == count


def test_instances_are_8_connected_and_the_count_is_only_reported() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one lesion
    mask[5:7, 5:7] = True
    found = instances(mask, "two infected areas")
    assert found.count == 2 and found.note is None
    assert set(np.unique(found.labels)) == {0, 1, 2} and np.array_equal(found.labels > 0, mask)
    one = instances(mask, "one infected area, lower left lung")
    assert one.count == 2 and one.note == "2 lesions drawn, the prompt says 1"
    assert instances(np.zeros((4, 4), bool), "two infected areas").note == "0 lesions drawn, the prompt says 2"
    assert instances(mask, "lower left lung").note is None
