"""The `datatrace` command: the quick demo end to end, reruns, `info`, and error messages."""

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from datatrace import Attributions, __version__
from datatrace.cli import app
from datatrace.demo.run import QUICK_PRESET, DemoConfig, choose_targets

runner = CliRunner()
K = 3


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def file_times(directory: Path) -> dict[Path, int]:
    """Modification time of every file under ``directory``, in nanoseconds."""
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo run once into a fresh directory: (output directory, CLI result)."""
    out = tmp_path_factory.mktemp("demo")
    result = invoke("demo", "--quick", "--out", out, "--top", K, "--targets", 4)
    assert result.exit_code == 0, result.output
    return out, result


def test_quick_demo_writes_report_config_and_scores(quick_demo):
    out, result = quick_demo
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4 * (1 + 2 * K)
    attributions = Attributions.load(out / "store", "test")
    n_train = QUICK_PRESET["n_train"]
    assert attributions.scores.shape == (297, n_train)
    shown = [int(j) for j in re.findall(r"target (\d+)</div>", report)]
    assert len(shown) == 4
    for j in shown:
        for index in attributions.proponents(j, K).indices:
            assert f"#{index}<" in report
            assert f"#{index}" in result.output
    config = DemoConfig.from_json(out / "config.json")
    assert config == DemoConfig(out=str(out), k=K, n_targets=4, quick=True).resolved()
    assert config.n_train == n_train and config.n_models == QUICK_PRESET["n_models"]
    assert sorted(path.name for path in (out / "checkpoints").glob("*.pt")) == [
        "model_0.pt",
        "model_1.pt",
    ]
    assert str(out / "report.html") in result.output.replace("\n", "")


def test_rerun_reuses_checkpoints_and_store(quick_demo):
    out, _ = quick_demo
    cached = ("checkpoints", "store/features", "store/subsets")
    before = {k: v for path in cached for k, v in file_times(out / path).items()}
    result = invoke("--traceback", "demo", "--config", out / "config.json", "--no-progress")
    assert result.exit_code == 0, result.output
    after = {k: v for path in cached for k, v in file_times(out / path).items()}
    assert after == before  # nothing trained, featurized or retrained for the LDS again
    assert "reused" in result.output


def test_quick_demo_scores_every_method_by_lds(quick_demo):
    """The LDS table lists TRAK and the three baselines, in the terminal and in the report, with
    values computed against the ground truth of QUICK_PRESET["lds_models"] subset models."""
    out, result = quick_demo
    from datatrace.evaluation.lds import lds
    from datatrace.subsets import SubsetExperiment

    truth = SubsetExperiment.open(out / "store", "lds").results()
    assert len(truth.masks) == QUICK_PRESET["lds_models"]
    expected = lds(Attributions.load(out / "store", "test"), truth.masks, truth.outputs).mean
    report = (out / "report.html").read_text()
    assert "Linear datamodeling score" in report
    for method in ("TRAK", "GradientDot", "GradientCosine", "RepresentationSimilarity"):
        assert method in result.output and method in report
    assert f"{expected:.3f}" in result.output
    assert expected > 0.2  # measured 0.60 with 8 models; random scores give ~0


def test_info_describes_the_store(quick_demo):
    out, _ = quick_demo
    result = invoke("info", out / "store")
    assert result.exit_code == 0, result.output
    assert "Provenance" in result.output and "factorized" in result.output
    assert "Features: 2 checkpoints" in result.output
    assert "1/1" in result.output  # 300 rows fit in one chunk
    assert "test" in result.output and "297 × 300" in result.output
    # the quick demo's ground truth: 8 models on random halves of its 300 training images
    assert "Subset experiments: 1" in result.output
    assert re.search(r"lds\s*│\s*8/8\s*│\s*300\s*│\s*297", result.output), result.output


def test_info_points_from_the_output_directory_to_its_store(quick_demo):
    out, _ = quick_demo
    result = invoke("info", out)
    assert result.exit_code == 1
    assert "did you mean" in result.output and "Traceback" not in result.output


def test_a_missing_store_is_a_one_line_error(tmp_path):
    result = invoke("info", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: no datatrace store at")
    assert "Traceback" not in result.output


def test_a_demo_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    path = tmp_path / "report.txt"
    path.write_text("kept")
    result = invoke("demo", "--quick", "--out", path, "--no-progress")
    assert result.exit_code == 1
    assert "is a file: choose a directory" in result.output
    assert path.read_text() == "kept"


def test_a_store_of_another_run_is_refused(quick_demo):
    out, _ = quick_demo
    saved = (out / "config.json").read_text()
    result = invoke("demo", "--config", out / "config.json", "--proj-dim", 32, "--no-progress")
    assert result.exit_code == 1
    assert "holds features of a different run" in result.output
    assert "Traceback" not in result.output
    assert (out / "config.json").read_text() == saved  # still the config of the results there


def test_checkpoints_trained_differently_are_refused(quick_demo):
    out, _ = quick_demo
    result = invoke("demo", "--config", out / "config.json", "--epochs", 4, "--no-progress")
    assert result.exit_code == 1
    assert "trained with other settings" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"datatrace {__version__}"


def test_bad_settings_are_reported(tmp_path):
    result = invoke("demo", "--out", tmp_path, "--model", "resnet")
    assert result.exit_code == 1
    assert "unknown model 'resnet'" in result.output
    bad = tmp_path / "config.json"
    bad.write_text('{"epochs": 3, "learning_rate": 0.1}')
    result = invoke("demo", "--config", bad)
    assert result.exit_code == 1
    assert "unknown entries ['learning_rate']" in result.output


def test_choose_targets_is_deterministic_and_includes_mistakes():
    labels = np.array([0, 1, 1, 2, 0, 2, 1, 0])
    predictions = np.array([0, 1, 0, 2, 0, 2, 1, 0])  # test example 2 is misclassified
    shown = choose_targets(labels, predictions, 4)
    assert shown == [0, 1, 3, 2]  # the first correct one of each class, then the mistake
    assert choose_targets(labels, labels, 4) == [0, 1, 3, 4]
    assert choose_targets(labels, predictions, 20) == [0, 1, 3, 4, 6, 5, 7, 2]


@pytest.mark.parametrize("command", [["fit"], ["verify"], ["subsets", "run"]])
def test_a_commands_help_wraps_its_paragraphs_to_the_terminal(command):
    """Each paragraph of a command's docstring is one line for rich to wrap: at 80 columns the
    docstring's own line breaks (about 95 characters) used to leave a short stub after each."""
    from datatrace.cli.app import reflowed

    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    shown = [line.strip() for line in result.output.splitlines()]
    narrow = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}).output
    lines = [line.strip() for line in narrow.split("╭")[0].splitlines()]
    # at 80 columns no line of the description is a stub of a few words between longer ones
    for before, line, after in zip(lines, lines[1:], lines[2:]):
        if before and after:
            assert len(line) > 40 or not line, (line, narrow)
    assert any(len(line) > 120 for line in shown), "the description was not reflowed"
    assert reflowed("a\nb\n\n- one\n  two\n- three") == "a b\n\n- one two\n- three"
