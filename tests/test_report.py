"""The HTML report, built from small synthetic attributions."""

import base64
import io
import re

import matplotlib.image
import numpy as np
import pytest

from datatrace import Attributions
from datatrace.report import Section, label_agreement, q_dominance, write_report
from datatrace.report.images import as_image_batch

N_TRAIN, N_TARGETS, N_CLASSES = 24, 5, 3


@pytest.fixture
def synthetic():
    """Attributions whose proponents share their target's label by construction."""
    generator = np.random.default_rng(0)
    train_labels = np.arange(N_TRAIN) % N_CLASSES
    target_labels = np.arange(N_TARGETS) % N_CLASSES
    same = train_labels[None, :] == target_labels[:, None]
    scores = np.where(same, 1.0, -1.0) + 0.1 * generator.standard_normal((N_TARGETS, N_TRAIN))
    out_to_loss = generator.uniform(0.01, 0.5, N_TRAIN)
    attributions = Attributions(
        scores.astype(np.float32), "TRAK", out_to_loss.astype(np.float32), {"seed": 0}
    )
    return {
        "attributions": attributions,
        "train_labels": train_labels,
        "target_labels": target_labels,
        "train_images": generator.uniform(0, 1, (N_TRAIN, 1, 8, 8)),
        "target_images": generator.uniform(0, 1, (N_TARGETS, 1, 8, 8)),
    }


def embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([^\"]+)", html)]


def test_report_shows_targets_with_proponents_opponents_and_q(tmp_path, synthetic):
    attributions = synthetic["attributions"]
    predictions = synthetic["target_labels"].copy()
    predictions[1] = (predictions[1] + 1) % N_CLASSES
    path = write_report(
        tmp_path / "sub" / "report.html",
        **synthetic,
        predictions=predictions,
        targets=[0, 1],
        k=3,
        summary={"proj_dim": 64, "damping": 0.01},
    )
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for j in (0, 1):
        assert f"target {j}</div>" in html
        for ranking in (attributions.proponents(j, 3), attributions.opponents(j, 3)):
            for index in ranking.indices:
                assert f"#{index}<" in html
                assert f"Q {attributions.out_to_loss[index]:.2g}" in html
    assert "target 2</div>" not in html
    assert "misclassified" in html and "correct" in html
    assert "proj_dim" in html and "damping" in html and "TRAK" in html
    assert "How to read this" in html


def test_report_is_self_contained_with_decodable_images(tmp_path, synthetic):
    html = write_report(tmp_path / "report.html", **synthetic, targets=[0], k=2).read_text()
    pngs = embedded_pngs(html)
    # 1 target + 2 proponents + 2 opponents, and the histogram of Q.
    assert len(pngs) == 1 + 2 + 2 + 1
    thumbnail = matplotlib.image.imread(io.BytesIO(pngs[0]))
    assert thumbnail.shape[:2] == (8, 8)
    assert "image-rendering: pixelated" in html
    assert not re.search(r"<(link|script)\b", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


def test_sections_are_rendered_and_escaped(tmp_path, synthetic):
    section = Section(
        "LDS by method",
        caption="<b>not bold</b>",
        html='<p class="custom">trusted</p>',
        columns=["method", "LDS"],
        rows=[["TRAK", 0.123456], ["datamodels", 0.2]],
    )
    html = write_report(tmp_path / "report.html", **synthetic, sections=[section]).read_text()
    assert "LDS by method" in html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html
    assert '<p class="custom">trusted</p>' in html
    assert "<td>0.1235</td>" in html and "<td>datamodels</td>" in html


def test_report_without_images_or_q(tmp_path, synthetic):
    attributions = Attributions(synthetic["attributions"].scores, "datamodels")
    path = write_report(
        tmp_path / "report.html",
        attributions,
        train_labels=synthetic["train_labels"],
        target_labels=synthetic["target_labels"],
        class_names=["zero", "one", "two"],
    )
    html = path.read_text()
    assert embedded_pngs(html) == []
    assert "Out-to-loss weights Q" not in html
    assert "zero" in html and "datamodels" in html


def test_colour_images_channel_first_and_last(tmp_path, synthetic):
    colour = np.random.default_rng(1).uniform(0, 1, (N_TRAIN, 3, 6, 6))
    assert as_image_batch(colour).shape == (N_TRAIN, 6, 6, 3)
    assert as_image_batch(colour.transpose(0, 2, 3, 1)).shape == (N_TRAIN, 6, 6, 3)
    synthetic = {**synthetic, "train_images": colour, "target_images": None}
    html = write_report(tmp_path / "report.html", **synthetic, targets=[0], k=1).read_text()
    assert matplotlib.image.imread(io.BytesIO(embedded_pngs(html)[0])).shape[:2] == (6, 6)
    with pytest.raises(ValueError, match="images must be"):
        as_image_batch(np.zeros((2, 5, 6, 6)))


def test_label_agreement_counts_same_label_rankings(synthetic):
    rows = label_agreement(
        synthetic["attributions"],
        synthetic["train_labels"],
        synthetic["target_labels"],
        k=4,
        predictions=synthetic["target_labels"],
    )
    assert [row["label"] for row in rows] == [0, 1, 2, "all"]
    assert rows[-1]["targets"] == N_TARGETS
    for row in rows:
        assert row["proponents_same"] == 1.0
        assert row["opponents_same"] == 0.0
        assert row["accuracy"] == 1.0


def test_q_dominance_flags_rankings_decided_by_q(synthetic):
    attributions = synthetic["attributions"]
    labels, targets = synthetic["train_labels"], synthetic["target_labels"]
    assert not q_dominance(attributions, labels, targets, k=3)["dominates"]
    # Every example helps every target, its own class most; but only the first six have a
    # sizeable Q, so they take the top ranks whatever their class.
    same = labels[None, :] == targets[:, None]
    kernel_term = np.where(same, 1.0, 0.5) + 0.01 * np.arange(N_TRAIN)
    out_to_loss = np.where(np.arange(N_TRAIN) < 6, 0.3, 1e-6)
    dominated = Attributions(kernel_term * out_to_loss, "TRAK", out_to_loss)
    found = q_dominance(dominated, labels, targets, k=3)
    assert found["dominates"]
    assert found["ratio"] == pytest.approx(0.3 / 1e-6)
    assert found["same_label_without_q"] == 1.0
    assert found["same_label"] == pytest.approx(2 / 3)


def test_bad_inputs_say_what_is_wrong(tmp_path, synthetic):
    with pytest.raises(ValueError, match="train_labels has 3 entries, expected 24"):
        write_report(tmp_path / "r.html", **{**synthetic, "train_labels": [0, 1, 2]})
    with pytest.raises(ValueError, match="target_images has 2 images"):
        write_report(tmp_path / "r.html", **{**synthetic, "target_images": np.zeros((2, 8, 8))})
    with pytest.raises(IndexError, match="target 9 out of range"):
        write_report(tmp_path / "r.html", **synthetic, targets=[9])
