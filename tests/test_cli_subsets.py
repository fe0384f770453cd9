"""`datatrace subsets`: init, run (digits out of the box, a user's factory), status, errors."""

import json
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from datatrace.cli import app
from datatrace.demo.subsets import DigitsSubsets
from datatrace.subsets import SubsetExperiment, random_masks
from datatrace.subsets.config import SubsetRunConfig

sys.path.insert(0, str(Path(__file__).parent))
import _subsets_worker as toy

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def write_config(path: Path, **values) -> Path:
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **values}))
    return path


def test_init_then_run_trains_digits_models(tmp_path):
    config = tmp_path / "subsets.json"
    result = invoke("subsets", "init", config, "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    defaults = json.loads(config.read_text())
    assert defaults["experiment"] == "datatrace.demo.subsets:DigitsSubsets"
    write_config(config, n_masks=2, experiment_kwargs={"epochs": 1}, progress=False)
    result = invoke("subsets", "run", config)
    assert result.exit_code == 0, result.output
    assert "2/2 subsets done" in result.output

    experiment = SubsetExperiment.open(tmp_path / "store", "digits")
    results = experiment.results()
    assert results.outputs.shape == (2, 297)
    # Row 0 recomputed here by the same functions gives the same margins.
    digits = DigitsSubsets(epochs=1)
    mask = random_masks(1500, 1, 0.5, seed=0)[0]
    model = digits.train(np.flatnonzero(mask), experiment.row_seeds(0)[0])
    np.testing.assert_allclose(results.outputs[0], digits.evaluate(model), rtol=1e-5, atol=1e-5)
    assert experiment.provenance["description"]["epochs"] == 1
    assert experiment.saved_config()["n_masks"] == 2

    status = invoke(
        "subsets", "status", tmp_path / "store", "digits", "--config-out", tmp_path / "saved.json"
    )
    assert status.exit_code == 0, status.output
    assert "2/2 rows done" in status.output
    assert SubsetRunConfig.from_json(tmp_path / "saved.json") == SubsetRunConfig.from_json(config)
    listing = invoke("subsets", "status", tmp_path / "store")
    assert "digits" in listing.output


def test_run_a_users_factory_and_extend(tmp_path):
    config = write_config(
        tmp_path / "toy.json",
        store=str(tmp_path / "store"),
        name="toy",
        experiment="_subsets_worker:Additive",
        n_train=toy.N_TRAIN,
        n_outputs=toy.N_OUTPUTS,
        n_masks=5,
        n_seeds=2,
        progress=False,
    )
    assert invoke("subsets", "run", config).exit_code == 0
    write_config(config, n_masks=8)
    result = invoke("subsets", "run", config)
    assert result.exit_code == 0, result.output
    assert "8/8 subsets done" in result.output and "trained 3 subsets" in result.output
    results = SubsetExperiment.open(tmp_path / "store", "toy").results(reduce=None)
    for position in range(len(results)):
        expected = toy.expected_outputs(results.masks[position], results.seeds[position])
        np.testing.assert_allclose(results.outputs[position], expected, rtol=1e-5, atol=1e-5)


def test_errors_are_one_line_messages(tmp_path):
    missing = invoke("subsets", "run", tmp_path / "none.json")
    assert missing.exit_code == 1 and "datatrace subsets init" in missing.output
    bad = write_config(tmp_path / "bad.json", experiment="no_such_module:thing")
    result = invoke("subsets", "run", bad)
    assert result.exit_code == 1 and "cannot import 'no_such_module'" in result.output
    both = write_config(tmp_path / "both.json", train="a:b", evaluate="a:c")
    assert "not both" in invoke("subsets", "run", both).output
    unknown = write_config(tmp_path / "unknown.json", epochs=3)
    assert "unknown entries ['epochs']" in invoke("subsets", "run", unknown).output
    assert "not a datatrace store" in invoke("subsets", "status", tmp_path, "x").output
    SubsetExperiment(tmp_path / "store", "y", n_train=3, n_outputs=1, n_masks=1)
    absent = invoke("subsets", "status", tmp_path / "store", "x")
    assert absent.exit_code == 1 and "no subset experiment 'x'" in absent.output
    assert "(found: y)" in absent.output
