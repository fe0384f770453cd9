"""The ModelDiff page: every direction's examples, with images, texts or indices."""

import numpy as np
import pytest

from datatrace.applications.modeldiff import ModelDiff
from datatrace.report import Section
from datatrace.report.modeldiff import write_modeldiff_report


@pytest.fixture
def diff():
    rng = np.random.default_rng(0)
    scores_b = rng.normal(size=(12, 20))
    scores_a = scores_b + rng.normal(size=(12, 20))
    return ModelDiff(n_components=2, top_k=3).fit(scores_a, scores_b)


def test_page_shows_each_directions_examples(tmp_path, diff):
    images = np.random.default_rng(1).random((20, 8, 8))
    texts = [f"sentence {j}" for j in range(12)]
    path = write_modeldiff_report(
        tmp_path / "page.html", diff, train_images=images, target_texts=texts,
        train_labels=np.arange(20) % 4, names=("plain", "augmented"),
        sections=[Section("Check", "a caption", columns=["x"], rows=[[1.5]])],
    )  # fmt: skip
    page = path.read_text()
    assert page.count("direction 1") == 2 and page.count("direction 2") == 2
    for direction in diff.directions("a_vs_b") + diff.directions("b_vs_a"):
        for index in direction.train_positive:
            assert f"#{index}<" in page
        assert f"sentence {direction.targets[0]}" in page
    assert page.count("<img") == 2 * 2 * 2 * 3  # 2 comparisons × 2 directions × 2 ends × k
    assert "plain vs augmented" in page and "a caption" in page


def test_page_without_data_and_bad_sizes(tmp_path, diff):
    page = write_modeldiff_report(tmp_path / "plain.html", diff).read_text()
    assert "<img" not in page and "#" in page
    with pytest.raises(ValueError, match="train images has 5 entries"):
        write_modeldiff_report(tmp_path / "x.html", diff, train_images=np.zeros((5, 8, 8)))
