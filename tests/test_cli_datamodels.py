"""`datatrace datamodels fit` and `datatrace lds` on subset experiments in a store."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from datatrace import Attributions
from datatrace.cli import app
from datatrace.evaluation.lds import lds
from datatrace.subsets import SubsetExperiment

N_TRAIN, N_TARGETS = 40, 5
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two subset experiments ("fit": 200 rows, "eval": 60 rows) whose "models"
    output a sparse linear function of their training subset plus noise."""
    location = tmp_path_factory.mktemp("cli") / "run.zarr"
    rng = np.random.default_rng(0)
    weights = np.zeros((N_TARGETS, N_TRAIN))
    weights[:, :4] = rng.standard_normal((N_TARGETS, 4))

    def train(indices, seed):
        return indices, seed

    def evaluate(model):
        indices, seed = model
        noise = np.random.default_rng(seed).standard_normal(N_TARGETS)
        return weights[:, indices].sum(1) + 0.3 * noise

    for name, rows, seed in (("fit", 200, 1), ("eval", 60, 2)):
        experiment = SubsetExperiment(
            location, name, n_train=N_TRAIN, n_outputs=N_TARGETS, n_masks=rows, seed=seed
        )
        experiment.run(train, evaluate, progress=False)
    return location, weights


@pytest.fixture(scope="module")
def fitted(store):
    """The output of `datatrace datamodels fit` on the "fit" experiment, saved as "dm"."""
    location, _ = store
    return invoke(
        "datamodels", "fit", location, "--subsets", "fit", "--out-name", "dm",
        "--l1-path-steps", "50", "--selection", "mse", "--no-progress", "--threads", "1",
    )  # fmt: skip


def test_fit_saves_datamodels_with_their_settings(store, fitted):
    location, weights = store
    result = fitted
    assert result.exit_code == 0, result.output
    assert "saved as scores/dm" in result.output.replace("\n", " ")
    saved = Attributions.load(location, "dm")
    assert saved.method == "datamodels" and saved.scores.shape == (N_TARGETS, N_TRAIN)
    assert saved.info["subsets"] == "fit" and saved.info["l1_path_steps"] == 50
    assert saved.info["selection"] == "mse"
    assert len(saved.info["bias"]) == N_TARGETS
    assert (np.abs(saved.scores[:, :4] - weights[:, :4]) < 0.2).all()
    assert "dm" in invoke("info", location).output


def test_lds_prints_the_score_and_writes_json(store, fitted, tmp_path):
    location, _ = store
    result = invoke(
        "lds", location, "--scores", "dm", "--subsets", "eval", "--json", tmp_path / "lds.json"
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "lds.json").read_text())
    results = SubsetExperiment.open(location, "eval").results()
    expected = lds(Attributions.load(location, "dm"), results.masks, results.outputs)
    assert record["lds"] == pytest.approx(expected.mean)
    assert record["ci"] == pytest.approx(list(expected.ci))
    assert record["config"]["subsets"] == "eval" and record["n_subsets"] == 60
    assert f"LDS {expected.mean:.3f}" in result.output
    assert "optimistic" not in result.output


def test_lds_on_the_fitting_subsets_warns_and_unknown_names_fail(store, fitted):
    location, _ = store
    result = invoke("lds", location, "--scores", "dm", "--subsets", "fit")
    assert result.exit_code == 0 and "optimistic" in result.output
    missing = invoke("lds", location, "--scores", "dm", "--subsets", "nope")
    assert missing.exit_code == 1 and "no subset experiment 'nope'" in missing.output
    missing = invoke("lds", location, "--scores", "nope", "--subsets", "eval")
    assert missing.exit_code == 1 and "no attributions named 'nope'" in missing.output
