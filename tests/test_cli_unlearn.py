"""`datatrace unlearn` against the library functions; `datatrace klom` of saved margins."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from datatrace import Attributions, Store
from datatrace.applications.unlearning import (
    GradientAscentSettings,
    MatchingSettings,
    datamodel_matching,
    gradient_ascent,
    klom,
)
from datatrace.cli import app
from datatrace.demo import Split, digits_split, make_model, train_classifier
from datatrace.demo.subsets import torch_threads
from datatrace.tasks import classification_margin

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_klom_command_summarises_groups(tmp_path):
    rng = np.random.default_rng(0)
    oracle = rng.normal(size=(200, 30))
    unlearned = rng.normal(size=(200, 30))
    unlearned[:, :10] += 3.0  # the first ten points are not unlearned at all
    np.save(tmp_path / "u.npy", unlearned)
    np.save(tmp_path / "o.npy", oracle)
    np.save(tmp_path / "forget.npy", np.arange(10))
    np.save(tmp_path / "rest.npy", np.arange(10, 30))
    result = invoke(
        "klom", tmp_path / "u.npy", tmp_path / "o.npy",
        "--group", f"forget={tmp_path / 'forget.npy'}", "--group", f"rest={tmp_path / 'rest.npy'}",
        "--json", tmp_path / "k.json", "--per-point", tmp_path / "values.npy",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    values = klom(unlearned, oracle)
    np.testing.assert_allclose(np.load(tmp_path / "values.npy"), values)
    summary = json.loads((tmp_path / "k.json").read_text())["summary"]
    assert summary["forget"]["median"] == pytest.approx(np.median(values[:10]))
    assert summary["rest"]["p95"] == pytest.approx(np.percentile(values[10:], 95))
    assert summary["forget"]["median"] > 5 * summary["rest"]["median"]
    assert "forget" in result.output


def test_klom_command_checks_its_inputs(tmp_path):
    np.save(tmp_path / "u.npy", np.zeros((5, 4)))
    np.save(tmp_path / "o.npy", np.zeros((5, 3)))
    result = invoke("klom", tmp_path / "u.npy", tmp_path / "o.npy")
    assert result.exit_code == 1 and "same points" in result.output
    result = invoke("klom", tmp_path / "u.npy", tmp_path / "missing.npy")
    assert result.exit_code == 1 and "no oracle margins" in result.output
    np.save(tmp_path / "bad.npy", np.array([7]))
    result = invoke(
        "klom", tmp_path / "u.npy", tmp_path / "u.npy", "--group", f"g={tmp_path / 'bad.npy'}"
    )
    assert result.exit_code == 1 and "indices of points" in result.output
    result = invoke("klom", tmp_path / "u.npy", tmp_path / "u.npy", "--group", "nofile")
    assert result.exit_code == 1 and "NAME=FILE" in result.output


# -- datatrace unlearn ------------------------------------------------------------------------


def digits_files(tmp_path, n=80):
    """A small digits training set, a model trained on it and a forget set, saved as files."""
    train, _ = digits_split()
    inputs, labels = train.images[:n], train.labels[:n]
    model = make_model("mlp", seed=0)
    with torch_threads(1):
        train_classifier(model, Split(inputs, labels), epochs=5, seed=0)
    np.save(tmp_path / "x.npy", inputs.numpy())
    np.save(tmp_path / "y.npy", labels.numpy())
    np.save(tmp_path / "forget.npy", np.arange(10))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return model, (inputs, labels)


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unlearn_command_matches_the_library(tmp_path):
    model, data = digits_files(tmp_path)
    common = (
        "--inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
        "--forget", tmp_path / "forget.npy",
    )  # fmt: skip
    result = invoke(
        "unlearn", "gradient-ascent", tmp_path / "model.pt", *common,
        "--out", tmp_path / "ga.pt", "--epochs", 2, "--lr", 0.05, "--seed", 3,
        "--margins", tmp_path / "ga_margins.npy",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with torch_threads(1):
        expected = gradient_ascent(
            model, np.arange(10), data, settings=GradientAscentSettings(epochs=2, lr=0.05), seed=3
        )
        saved = torch.load(tmp_path / "ga.pt", weights_only=True)
        assert same_state(saved, expected.state_dict())
        assert not same_state(saved, model.state_dict())
        margins = classification_margin(expected(data[0]).detach(), data[1]).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "ga_margins.npy"), margins, rtol=1e-6)
    config = json.loads((tmp_path / "ga.json").read_text())
    assert config["settings"]["lr"] == 0.05 and config["method"] == "gradient-ascent"

    # datamodel matching with per-class attributions of 30 points, saved in a store
    points = np.arange(30)
    np.save(tmp_path / "points.npy", points)
    beta = np.random.default_rng(0).normal(scale=0.1, size=(30 * 10, len(data[0])))
    Store(tmp_path / "s.zarr").save_attributions("dm", Attributions(beta.astype(np.float32)))
    result = invoke(
        "unlearn", "datamodel-matching", tmp_path / "model.pt", *common,
        "--out", tmp_path / "dmm.pt", "--store", tmp_path / "s.zarr", "--attributions", "dm",
        "--points", tmp_path / "points.npy", "--epochs", 3,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with torch_threads(1):
        expected = datamodel_matching(
            model,
            np.arange(10),
            data,
            beta.astype(np.float32),
            points=points,
            settings=MatchingSettings(epochs=3),
        )
    assert same_state(torch.load(tmp_path / "dmm.pt", weights_only=True), expected.state_dict())


def test_a_forget_mask_file_forgets_the_examples_it_marks(tmp_path):
    digits_files(tmp_path)
    mask = np.zeros(80, bool)
    mask[:10] = True
    np.save(tmp_path / "mask.npy", mask)
    runs = {}
    for name in ("forget", "mask"):
        result = invoke(
            "unlearn", "gradient-ascent", tmp_path / "model.pt", "--inputs", tmp_path / "x.npy",
            "--labels", tmp_path / "y.npy", "--forget", tmp_path / f"{name}.npy",
            "--out", tmp_path / f"{name}.pt", "--epochs", 1, "--seed", 3,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "forgot 10 examples" in result.output
        runs[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert same_state(runs["forget"], runs["mask"])


def test_unlearn_command_checks_its_inputs(tmp_path):
    digits_files(tmp_path, n=40)
    common = (
        tmp_path / "model.pt", "--inputs", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
        "--forget", tmp_path / "forget.npy", "--out", tmp_path / "u.pt",
    )  # fmt: skip
    result = invoke("unlearn", "retain-finetune", *common, "--momentum", 0.9)
    assert result.exit_code == 1 and "--momentum does not apply" in result.output
    result = invoke("unlearn", "datamodel-matching", *common)
    assert result.exit_code == 1 and "--store and --attributions" in result.output
    result = invoke("unlearn", "oracle-matching", *common)
    assert result.exit_code == 1 and "--oracle-logits" in result.output
    result = invoke("unlearn", "forget-everything", *common)
    assert result.exit_code == 1 and "unknown method" in result.output
    result = invoke("unlearn", "gradient-ascent", *common, "--model-kwargs", '{"name": "cnn"}')
    assert result.exit_code == 1 and "missing" in result.output.lower()
    assert not (tmp_path / "u.pt").exists()
