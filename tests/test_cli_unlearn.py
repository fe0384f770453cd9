"""`datatrace klom`: KLoM of saved margins, per group of points."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from datatrace.cli import app
from datatrace.unlearning import klom

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
