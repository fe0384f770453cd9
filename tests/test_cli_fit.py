"""`datatrace fit`: a TRAK fit from a run config (the bundled digits, checkpoint files), saved
beside its features; errors of the config. (Backends: tests/test_featurize_backends.py.)"""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from datatrace import TRAK, Classification
from datatrace.cli import app
from datatrace.demo import make_model
from datatrace.fit_config import FitRunConfig, digits_train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def write_config(path, **values):
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **values}))
    return path


def test_init_then_fit_equals_the_python_fit(tmp_path):
    config = tmp_path / "fit.json"
    result = invoke("fit", config, "--init", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"checkpoint{seed}.pt"))
        torch.save(make_model("mlp", seed=seed, hidden=8).state_dict(), paths[-1])
    write_config(
        config, model_kwargs={"name": "mlp", "hidden": 8}, data_kwargs={"n_train": 80},
        checkpoints=paths, proj_dim=24, chunk_size=16, batch_size=16, progress=False,
    )  # fmt: skip
    result = invoke("fit", config)
    assert result.exit_code == 0, result.output
    assert "fitted: 80 training examples × 2 checkpoint(s), k = 24" in result.output

    model = make_model("mlp", seed=0, hidden=8)
    reopened = TRAK.from_store(tmp_path / "store", model, Classification(), paths)
    direct = TRAK(
        model, Classification(), proj_dim=24, chunk_size=16, batch_size=16, progress=False
    ).fit(digits_train(80), paths)
    targets = digits_train(5)
    np.testing.assert_allclose(
        reopened.score(targets).scores, direct.score(targets).scores, rtol=1e-5, atol=1e-6
    )

    saved = tmp_path / "saved.json"
    result = invoke("fit", tmp_path / "store", "--config-out", saved)
    assert result.exit_code == 0, result.output
    assert FitRunConfig.from_json(saved) == FitRunConfig.from_json(config)
    again = invoke("fit", saved)  # a rerun from the saved config resumes: nothing to compute
    assert again.exit_code == 0, again.output


def test_config_errors_are_one_line(tmp_path):
    missing = invoke("fit", tmp_path / "none.json")
    assert missing.exit_code == 1 and "datatrace fit --init" in missing.output
    config = write_config(tmp_path / "bad.json", backend="slurm")
    bad = invoke("fit", config)
    assert bad.exit_code == 1 and "backend must be one of" in bad.output
    config = write_config(tmp_path / "model.json", model="no_such_module:factory")
    wrong = invoke("fit", config)
    assert wrong.exit_code == 1 and "cannot import 'no_such_module'" in wrong.output
    unknown = write_config(tmp_path / "unknown.json", epochs=3)
    assert "unknown entries ['epochs']" in invoke("fit", unknown).output
