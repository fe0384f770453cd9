"""The small-drop LDS protocol: drop masks, the seed policies, deterministic retraining in the full
run's data order, the LDS and its interval, subset configs and ``datatrace lds --protocol``."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from datatrace import Attributions
from datatrace.cli import app
from datatrace.evaluation.lds import MAX_SMALL_DROP_FRACTION, lds
from datatrace.methods.training import DeterministicRun, TrainingRecipe, train_subset
from datatrace.store import StoreMismatchError
from datatrace.subsets import SubsetExperiment
from datatrace.subsets.config import SubsetRunConfig, run_config
from datatrace.subsets.masks import (
    drop_masks,
    dropped_count,
    kept_fraction,
    random_masks,
    train_seeds,
)

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import _subsets_worker as toy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSIC_PROVENANCE_KEYS = {
    "kind", "n_train", "n_outputs", "alpha", "seed", "n_seeds", "masks", "description",
}  # fmt: skip


@pytest.mark.parametrize(
    ("n_train", "fraction", "dropped"),
    [(1500, 0.01, 15), (40, 0.01, 1), (300, 0.05, 15), (7, 0.5, 4)],
)
def test_drop_masks_leave_out_the_right_number(n_train, fraction, dropped):
    masks = drop_masks(n_train, 12, fraction, seed=4)
    assert dropped_count(n_train, fraction) == dropped
    assert masks.shape == (12, n_train) and masks.dtype == bool
    assert ((~masks).sum(1) == dropped).all()
    # the random-mask stream at the kept fraction: rows independent of n_masks, resumable
    np.testing.assert_array_equal(
        masks, random_masks(n_train, 12, kept_fraction(n_train, fraction), 4)
    )
    np.testing.assert_array_equal(drop_masks(n_train, 5, fraction, 4, start=7), masks[7:])
    if n_train >= 300:  # too many possible subsets for two rows to coincide
        assert len({row.tobytes() for row in masks}) == 12


def test_drop_fraction_errors():
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="drop_fraction"):
            dropped_count(100, fraction)
    with pytest.raises(ValueError, match="at least 2"):
        dropped_count(1, 0.5)


def test_seed_policies():
    per_row = [train_seeds(5, row, 3) for row in range(4)]
    fixed = [train_seeds(5, row, 3, "fixed") for row in range(4)]
    assert len({tuple(seeds) for seeds in per_row}) == 4
    assert all(seeds == per_row[0] for seeds in fixed)  # row 0's seeds for every row
    assert len(set(fixed[0])) == 3  # still one seed per repeat
    with pytest.raises(ValueError, match="seed_policy must be one of"):
        train_seeds(5, 0, 1, "random")


def test_experiment_records_the_protocol_and_reopens_with_it(tmp_path):
    location = tmp_path / "run.zarr"
    classic = SubsetExperiment(location, "classic", n_train=40, n_outputs=5, n_masks=4)
    assert set(classic.provenance) == CLASSIC_PROVENANCE_KEYS  # existing stores stay valid
    assert classic.protocol == "classic"
    small = SubsetExperiment(
        location, "drop", n_train=40, n_outputs=5, n_masks=6, seed=2, drop_fraction=0.05,
        seed_policy="fixed", n_seeds=2,
    )  # fmt: skip
    np.testing.assert_array_equal(small.masks, drop_masks(40, 6, 0.05, seed=2))
    assert small.provenance["drop_fraction"] == 0.05
    assert small.provenance["seed_policy"] == "fixed"
    reopened = SubsetExperiment.open(location, "drop")
    assert reopened.protocol == "small-drop"
    assert reopened.row_seeds(5) == reopened.row_seeds(0) == train_seeds(2, 0, 2)
    reopened.extend(3)
    np.testing.assert_array_equal(reopened.masks, drop_masks(40, 9, 0.05, seed=2))
    with pytest.raises(StoreMismatchError, match="drop_fraction"):
        SubsetExperiment(location, "classic", n_train=40, n_outputs=5, drop_fraction=0.05)
    with pytest.raises(StoreMismatchError, match="seed_policy"):
        SubsetExperiment(location, "classic", n_train=40, n_outputs=5, seed_policy="fixed")


def test_experiment_runs_every_row_with_one_seed(tmp_path):
    experiment = SubsetExperiment(
        tmp_path / "run.zarr", "drop", n_train=40, n_outputs=5, n_masks=5, drop_fraction=0.1,
        seed_policy="fixed", n_seeds=2,
    )  # fmt: skip
    experiment.run(toy.Additive().train, toy.Additive().evaluate, progress=False)
    results = experiment.results(reduce=None)
    assert (results.seeds == results.seeds[0]).all()
    for mask, outputs, seeds in zip(results.masks, results.outputs, results.seeds):
        assert (~mask).sum() == 4
        np.testing.assert_allclose(outputs, toy.expected_outputs(mask, seeds), rtol=1e-6)


def test_config_makes_small_drop_tables(tmp_path):
    settings = {
        "store": str(tmp_path / "run.zarr"), "experiment": "_subsets_worker:Additive",
        "n_train": 40, "n_outputs": 5, "n_masks": 4, "progress": False,
    }  # fmt: skip
    small = run_config(SubsetRunConfig(name="drop", protocol="small-drop", **settings))
    assert small.protocol == "small-drop" and small.seed_policy == "fixed"
    assert ((~small.masks).sum(1) == 1).all()  # 1% of 40, at least one
    across = run_config(
        SubsetRunConfig(name="seeds", protocol="small-drop", seed_policy="per-row", **settings)
    )
    assert across.seed_policy == "per-row"
    assert len({tuple(s) for s in across.results().seeds}) == 4
    classic = run_config(SubsetRunConfig(name="classic", **settings))
    assert classic.protocol == "classic" and set(classic.provenance) == CLASSIC_PROVENANCE_KEYS
    assert ((~classic.masks).sum(1) == 20).all()
    with pytest.raises(ValueError, match="protocol must be one of"):
        SubsetRunConfig(protocol="halves").check()
    with pytest.raises(ValueError, match="seed_policy must be one of"):
        SubsetRunConfig(seed_policy="sometimes").check()


def test_subset_retraining_keeps_the_full_runs_order():
    """``train_subset`` against ``torch.optim`` on the full run's batches with the dropped
    examples taken out (each batch's loss still divided by its size in the full run)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=generator)

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    recipe = TrainingRecipe(optimizer="sgd", lr=0.1, momentum=0.9, epochs=3, batch_size=8)
    keep = drop_masks(30, 1, 0.1, seed=0)[0]
    trained = train_subset(model(), (X, y), recipe, keep)
    reference = model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    full_order = DeterministicRun(model(), (X, y), recipe).order
    assert all(np.array_equal(a, b) for a, b in zip(full_order, recipe.data_order(30)))
    for index in full_order:
        kept = index[keep[index]]
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(reference(X[kept]), y[kept], reduction="none")
        (losses.sum() / len(index)).backward()
        optimizer.step()
    for ours, theirs in zip(trained.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def linear_truth(n_train=200, n_targets=30, n_masks=60, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n_targets, n_train))
    masks = drop_masks(n_train, n_masks, 0.02, seed=seed)
    outputs = masks @ scores.T + noise * rng.standard_normal((n_masks, n_targets))
    return scores, masks, outputs


def test_small_drop_lds_on_a_known_linear_truth():
    scores, masks, outputs = linear_truth()
    result = lds(scores, masks, outputs, protocol="small-drop")
    assert result.mean == pytest.approx(1.0)
    assert result.protocol == "small-drop" and result.drop_fraction == pytest.approx(0.02)
    assert "small-drop protocol, 2.0% dropped" in str(result)
    noisy = lds(Attributions(scores), *linear_truth(noise=3.0)[1:], protocol="small-drop")
    assert 0.0 < noisy.mean < 0.95


def test_small_drop_uses_the_classic_interval():
    scores, masks, outputs = linear_truth(noise=3.0)
    small = lds(scores, masks, outputs, protocol="small-drop", bootstrap=500, seed=3)
    plain = lds(scores, masks, outputs, bootstrap=500, seed=3)
    assert small.ci == plain.ci and small.mean == plain.mean
    np.testing.assert_array_equal(small.per_target, plain.per_target)
    assert small.ci[0] < small.mean < small.ci[1]
    assert plain.protocol is None and "protocol" not in str(plain)
    # across seeds: (n_subsets, n_seeds, n_targets) outputs are averaged, as in the classic one
    stacked = np.stack([outputs, outputs], axis=1)
    assert lds(scores, masks, stacked, protocol="small-drop").mean == pytest.approx(small.mean)


def test_small_drop_refuses_masks_that_are_not_small_drops():
    scores, _, outputs = linear_truth()
    halves = random_masks(200, 60, 0.5)
    with pytest.raises(ValueError, match="look like classic subsets"):
        lds(scores, halves, outputs, protocol="small-drop")
    assert MAX_SMALL_DROP_FRACTION < 0.5
    full = np.ones((60, 200), bool)
    with pytest.raises(ValueError, match="keep every training example"):
        lds(scores, full, outputs, protocol="small-drop")
    with pytest.raises(ValueError, match="protocol must be one of"):
        lds(scores, halves, outputs, protocol="bergson")
    lds(scores, halves, outputs, protocol="classic")  # no check beyond the classic one


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    """A store with saved scores and two subset tables on the toy additive model: small drops
    (fixed seeds) and classic halves."""
    location = tmp_path_factory.mktemp("small-drop") / "run.zarr"
    additive = toy.Additive()
    for name, options in (
        ("drop", {"drop_fraction": 0.05, "seed_policy": "fixed"}),
        ("halves", {}),
    ):
        experiment = SubsetExperiment(
            location, name, n_train=toy.N_TRAIN, n_outputs=toy.N_OUTPUTS, n_masks=30, **options
        )
        experiment.run(additive.train, additive.evaluate, progress=False)
    experiment.store.save_attributions("truth", Attributions(toy.WEIGHTS.T.copy()))
    return location


def invoke(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_cli_lds_reads_the_protocol_of_the_subsets(cli_store, tmp_path):
    out = tmp_path / "lds.json"
    result = invoke("lds", cli_store, "--scores", "truth", "--subsets", "drop", "--json", out)
    assert result.exit_code == 0, result.output
    assert "small-drop protocol, 5.0% dropped" in " ".join(result.output.split())
    record = json.loads(out.read_text())
    assert record["config"]["protocol"] == "small-drop"
    assert record["subsets_protocol"]["seed_policy"] == "fixed"
    assert record["lds"] > 0.9
    classic = invoke("lds", cli_store, "--scores", "truth", "--subsets", "halves")
    assert classic.exit_code == 0 and "classic protocol" in " ".join(classic.output.split())
    explicit = invoke(
        "lds", cli_store, "--scores", "truth", "--subsets", "drop", "--protocol", "small-drop"
    )
    assert explicit.exit_code == 0, explicit.output


def test_cli_lds_refuses_a_protocol_the_subsets_were_not_made_for(cli_store):
    wrong = invoke(
        "lds", cli_store, "--scores", "truth", "--subsets", "halves", "--protocol", "small-drop"
    )
    assert wrong.exit_code == 1
    assert "made for the classic protocol" in " ".join(wrong.output.split())
    bad = invoke("lds", cli_store, "--scores", "truth", "--subsets", "drop", "--protocol", "x")
    assert bad.exit_code == 1 and "--protocol must be" in " ".join(bad.output.split())
