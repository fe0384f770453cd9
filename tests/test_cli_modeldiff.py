"""`datatrace modeldiff`: directions from saved attributions, terminal table, report and JSON."""

import json

import numpy as np
from typer.testing import CliRunner

from datatrace import Attributions
from datatrace.cli import app
from datatrace.modeldiff import A_VS_B, ModelDiff

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
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--divide-out-to-loss")
    assert result.exit_code == 1 and "out_to_loss" in result.output
    result = invoke("modeldiff", location, "--a", "a", "--b", "b", "--train-images", "x.png",
                    "--report", tmp_path / "r.html")  # fmt: skip
    assert result.exit_code == 1 and "no train images file" in result.output


def test_modeldiff_command_notes_a_wide_q_and_not_when_divided_out(tmp_path):
    location, scores_a, scores_b = planted_store(tmp_path)
    q_wide = np.full(40, 1e-3)
    q_wide[:5] = 1e-6  # a shortcut subpopulation: Q 1000x below the median
    Attributions(scores_a, "TRAK", out_to_loss=q_wide).save(location, "trak_a")
    Attributions(scores_b, "TRAK", out_to_loss=np.full(40, 1e-3)).save(location, "trak_b")
    result = invoke("modeldiff", location, "--a", "trak_a", "--b", "trak_b")
    assert result.exit_code == 0, result.output
    assert "--divide-out-to-loss" in result.output and "1e+03" in result.output
    divided = invoke(
        "modeldiff", location, "--a", "trak_a", "--b", "trak_b", "--divide-out-to-loss"
    )
    assert divided.exit_code == 0 and "note:" not in divided.output
    plain = invoke("modeldiff", location, "--a", "a", "--b", "b")  # no Q: nothing to say
    assert plain.exit_code == 0 and "note:" not in plain.output
