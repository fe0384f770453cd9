"""`datatrace modeldiff`: directions from saved attributions, terminal table, report and JSON."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from datatrace import Attributions
from datatrace.applications.modeldiff import A_VS_B, ModelDiff
from datatrace.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def planted_store(tmp_path):
    """Attributions where A = B + extra weight on training examples 0-4 for targets 0-7."""
    rng = np.random.default_rng(0)
    scores_b = rng.normal(size=(30, 40))
    scores_a = scores_b + 0.05 * rng.normal(size=(30, 40))
    scores_a[:8, :5] += 5.0
    location = tmp_path / "run.zarr"
    Attributions(scores_a, "test").save(location, "a")
    Attributions(scores_b, "test").save(location, "b")
    return location, scores_a, scores_b


def test_modeldiff_command_writes_report_and_json(tmp_path):
    location, scores_a, scores_b = planted_store(tmp_path)
    images = np.random.default_rng(1).random((40, 1, 4, 4))
    np.save(tmp_path / "train.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(40) % 3)
    (tmp_path / "targets.txt").write_text("\n".join(f"target text {j}" for j in range(30)))
    result = invoke(
        "modeldiff", location, "--a", "a", "--b", "b", "--n-components", 2, "--top-k", 5,
        "--report", tmp_path / "page.html", "--json", tmp_path / "out.json",
        "--train-images", tmp_path / "train.npy", "--train-labels", tmp_path / "labels.npy",
        "--target-texts", tmp_path / "targets.txt", "--name-a", "plain", "--name-b", "other",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "plain vs other" in result.output
    record = json.loads((tmp_path / "out.json").read_text())
    expected = ModelDiff(n_components=2, top_k=5).fit(scores_a, scores_b)
    first = record["directions"][0]
    assert first["comparison"] == A_VS_B
    assert sorted(first["train_positive"]) == [0, 1, 2, 3, 4]
    assert first["train_positive"] == expected.directions()[0].train_positive.tolist()
    assert first["variance_a"] == expected.directions()[0].variance_a
    page = (tmp_path / "page.html").read_text()
    assert page.count("data:image/png;base64,") >= 10  # training examples as images
    assert "target text 3" in page or "target text 1" in page  # targets as texts


def test_modeldiff_command_reports_user_errors(tmp_path):
    location, *_ = planted_store(tmp_path)
    Attributions(np.ones((30, 41)), "other").save(location, "wrong")
    result = invoke("modeldiff", location, "--a", "a", "--b", "wrong")
    assert result.exit_code == 1
    assert "same targets" in result.output
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--divide-out-to-loss", "on")
    assert result.exit_code == 1 and "out_to_loss" in result.output
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--divide-out-to-loss", "yes")
    assert result.exit_code == 1 and "auto, on, off" in result.output
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--train-images", "x.png",
                    "--report", tmp_path / "r.html")  # fmt: skip
    assert result.exit_code == 1 and "no train images file" in result.output


def test_a_bad_texts_file_is_named_before_any_work(tmp_path, monkeypatch):
    location, *_ = planted_store(tmp_path)
    (tmp_path / "texts.json").write_text("[1, 2")
    monkeypatch.setattr(
        ModelDiff, "fit", lambda *args, **kwargs: pytest.fail("fitted before reading the texts")
    )
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--report",
                    tmp_path / "r.html", "--train-texts", tmp_path / "texts.json")  # fmt: skip
    assert result.exit_code == 1
    assert "texts.json is not valid JSON" in result.output


def test_the_same_attributions_twice_give_a_report_that_says_there_are_no_directions(tmp_path):
    location, *_ = planted_store(tmp_path)
    with pytest.warns(RuntimeWarning, match="no directions for a_vs_b and b_vs_a"):
        result = invoke("modeldiff", location, "--a", "a", "--b", "a", "--report",
                        tmp_path / "r.html")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "No directions" in (tmp_path / "r.html").read_text()


def test_modeldiff_command_divides_a_collapsed_q_out_by_default_and_says_so(tmp_path):
    location, scores_a, scores_b = planted_store(tmp_path)
    q_wide = np.full(40, 1e-3)
    q_wide[:5] = 1e-6  # a shortcut subpopulation: Q 1000x below the median
    q_flat = np.full(40, 1e-3)
    Attributions(scores_a * q_wide, "TRAK", out_to_loss=q_wide).save(location, "trak_a")
    Attributions(scores_b * q_flat, "TRAK", out_to_loss=q_flat).save(location, "trak_b")
    trak = ("modeldiff", location, "--a", "trak_a", "--b", "trak_b", "--top-k", 5)
    result = invoke(*trak, "--json", tmp_path / "auto.json", "--report", tmp_path / "auto.html")
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "divided out (auto)" in result.output
    assert "1e+03" in result.output  # the spread of A's Q, from the fitted ModelDiff
    record = json.loads((tmp_path / "auto.json").read_text())
    assert record["config"]["divide_out_to_loss"] == "auto"
    assert record["out_to_loss"]["divided_out"] is True
    assert record["out_to_loss"]["spread"] == {"a": pytest.approx(1000.0), "b": 1.0}
    # dividing Q out recovers the kernel scores: the planted examples 0-4 are found
    assert sorted(record["directions"][0]["train_positive"]) == [0, 1, 2, 3, 4]
    assert record["directions"][0]["divided_out_to_loss"] is True
    page = (tmp_path / "auto.html").read_text()
    assert "yes (auto)" in page and "Q divided out (auto): median/p1 of Q exceeds" in page
    kept = invoke(*trak, "--divide-out-to-loss", "off", "--json", tmp_path / "off.json")
    assert kept.exit_code == 0, kept.output
    assert "would divide Q out" in kept.output and "1e+03" in kept.output
    off = json.loads((tmp_path / "off.json").read_text())
    assert off["out_to_loss"]["divided_out"] is False
    assert sorted(off["directions"][0]["train_positive"]) != [0, 1, 2, 3, 4]
    divided = invoke(*trak, "--divide-out-to-loss", "on")
    assert divided.exit_code == 0 and "divide_out_to_loss=True" in divided.output
    plain = invoke("modeldiff", location, "--a", "a", "--b", "b")  # no Q: nothing to say
    assert plain.exit_code == 0 and "note:" not in plain.output
