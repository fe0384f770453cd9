"""Settings and checkpoints that cannot work are refused before anything is computed or stored,
with a message that names the setting (or the checkpoint entry) and what it must be."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt

N_TRAIN, N_FEATURES, N_CLASSES = 24, 5, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))


def make_data(n: int = N_TRAIN) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(n, N_FEATURES, generator=generator)
    return X, torch.randint(0, N_CLASSES, (n,), generator=generator)


def trak(**settings) -> dt.TRAK:
    return dt.TRAK(make_model(), dt.Classification(), progress=False, **settings)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("proj_dim", 2.5),
        ("proj_dim", True),
        ("proj_dim", "512"),
        ("proj_dim", 0),
        ("chunk_size", 2.5),
        ("chunk_size", 0),
        ("batch_size", True),
        ("batch_size", 0),
    ],
)
def test_a_setting_that_is_not_a_positive_integer_is_named_and_no_store_is_made(
    setting, value, tmp_path
):
    path = tmp_path / "store"
    with pytest.raises(ValueError, match=f"{setting} must be a positive integer") as raised:
        trak(store=path, **{setting: value}).fit(make_data())
    assert repr(value) in str(raised.value)
    assert not path.exists()


def test_numpy_integers_are_taken_as_the_integers_they_are():
    fitted = trak(proj_dim=np.int64(16), chunk_size=np.int32(8)).fit(make_data())
    reference = trak(proj_dim=16, chunk_size=8).fit(make_data())
    targets = make_data(4)
    np.testing.assert_array_equal(fitted.score(targets).scores, reference.score(targets).scores)


def test_numpy_float_settings_are_recorded_as_the_numbers_they_are(tmp_path):
    """An ``np.float32`` damping was computed with and then stopped the save of the scores with
    a raw JSON TypeError; a subset experiment's ``np.float32`` drop fraction, its creation."""
    from datatrace.subsets import SubsetExperiment

    targets = make_data(4)
    saved = trak(store=tmp_path / "numpy", damping=np.float32(0.5)).fit(make_data())
    reference = trak(damping=0.5).fit(make_data()).score(targets).scores
    np.testing.assert_array_equal(saved.score(targets, name="saved").scores, reference)
    assert dt.Attributions.load(str(tmp_path / "numpy"), "saved").info["damping"] == 0.5
    experiment = SubsetExperiment(
        tmp_path / "subsets", "t", n_train=20, n_outputs=2, n_masks=4,
        drop_fraction=np.float32(0.25),
    )  # fmt: skip
    assert experiment.drop_fraction == 0.25


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_on_a_machine_without_one_says_so():
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        trak(device="cuda").fit(make_data())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_parameters_is_refused_naming_them(value, tmp_path):
    model = make_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["2.weight"][1, 3] = value
    path = tmp_path / "store"
    with pytest.raises(ValueError, match=r"NaN or infinite values in the parameters 2\.weight"):
        trak(store=path).fit(make_data(), checkpoints=[model.state_dict(), state])
    # The first checkpoint was sound and may be stored; nothing of the second is.
    if path.exists():
        assert not (path / "features" / "1").exists()


def test_a_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "model_3.pt"
    with pytest.raises(FileNotFoundError, match=r"model_3\.pt does not exist"):
        trak().fit(make_data(), checkpoints=[missing])
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        trak().fit(make_data(), checkpoints=[tmp_path])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a torch file", "cannot be read as a torch.save'd state dict"),
        (None, "holds a list, not a state dict"),
    ],
)
def test_a_checkpoint_file_that_is_not_a_state_dict_is_named(content, message, tmp_path):
    path = tmp_path / "model.pt"
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        trak().fit(make_data(), checkpoints=[path])


def test_a_tuple_of_python_lists_scores_as_the_tensors_it_holds():
    X, y = make_data()
    targets = make_data(4)
    from_lists = trak(proj_dim=16).fit((X.tolist(), y.tolist())).score(targets).scores
    from_tensors = trak(proj_dim=16).fit((X, y)).score(targets).scores
    np.testing.assert_allclose(from_lists, from_tensors, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("k", [2.5, True, 0, "3"])
def test_a_top_k_that_is_not_a_positive_integer_is_named(k):
    fitted = trak(proj_dim=16).fit(make_data())
    targets = make_data(3)
    for call in (
        lambda: fitted.top_k(targets, k),
        lambda: fitted.score(targets).proponents(0, k),
        lambda: fitted.score(targets).opponents(0, k),
    ):
        with pytest.raises(ValueError, match="k must be a positive integer") as raised:
            call()
        assert repr(k) in str(raised.value)
    assert fitted.top_k(targets, np.int64(2)).proponents.indices.shape == (3, 2)


RELATIVE_DAMPING = (
    "damping must be a non-negative number (relative to the mean diagonal of ΦᵀΦ) or 'auto'"
)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"damping": -1.0},
            RELATIVE_DAMPING,
        ),
        (
            {"damping": "big"},
            RELATIVE_DAMPING,
        ),
        (
            {"damping": True},
            RELATIVE_DAMPING,
        ),
        (
            {"damping": float("nan")},
            RELATIVE_DAMPING,
        ),
        ({"damping_absolute": -0.1}, "damping_absolute must be a non-negative number or None"),
        ({"kernel_weights": "gauss-newton"}, "kernel_weights must be 'auto'"),
        ({"device": "tpu"}, "device must be a torch device"),
    ],
)
def test_a_kernel_setting_that_cannot_work_is_refused_before_anything_is_featurized(
    settings, message, tmp_path, monkeypatch
):
    from datatrace.grads.featurize import GradientFeatures

    def featurized(*args, **kwargs):
        raise AssertionError("featurized before the settings were checked")

    monkeypatch.setattr(GradientFeatures, "featurize_train", featurized)
    path = tmp_path / "store"
    with pytest.raises(ValueError, match=re.escape(message)):
        trak(store=path, proj_dim=16, **settings).fit(make_data())
    assert not path.exists()


@pytest.mark.parametrize(
    ("config", "entry", "value", "message"),
    [
        ("fit", "proj_dim", "abc", "proj_dim must be a positive integer, got 'abc'"),
        ("fit", "chunk_size", 2.5, "chunk_size must be a positive integer, got 2.5"),
        ("fit", "threads", -1, "threads must be a non-negative integer"),
        ("fit", "lease_s", 0, "lease_s must be a positive number, got 0"),
        ("fit", "ray_num_gpus", -1.0, "ray_num_gpus must be a non-negative number"),
        ("subsets", "n_masks", "abc", "n_masks must be a positive integer, got 'abc'"),
        ("subsets", "n_masks", 2.5, "n_masks must be a positive integer, got 2.5"),
        ("subsets", "alpha", "x", "alpha must be a non-negative number, got 'x'"),
        ("subsets", "alpha", 1.5, "alpha is the fraction of training examples kept, in [0, 1]"),
        ("subsets", "threads", -1, "threads must be a non-negative integer"),
        ("subsets", "lease_s", -1, "lease_s must be a positive number, got -1"),
    ],
)
def test_a_run_config_entry_that_cannot_work_is_named(config, entry, value, message):
    from datatrace.fit_config import FitRunConfig
    from datatrace.subsets.config import SubsetRunConfig

    kind = {"fit": FitRunConfig, "subsets": SubsetRunConfig}[config]
    with pytest.raises(ValueError, match=re.escape(message)):
        kind(**{entry: value}).check()
    assert kind().check() is not None


def test_a_subset_config_whose_sizes_contradict_its_experiment_is_refused():
    from datatrace.subsets.config import SubsetRunConfig, resolve_functions

    experiment = "datatrace.demo.subsets:DigitsSubsets"
    with pytest.raises(ValueError, match=r"the config's n_train is 5 but .* has 1500"):
        resolve_functions(SubsetRunConfig(experiment=experiment, n_train=5))
    assert resolve_functions(SubsetRunConfig(experiment=experiment, n_train=1500)).n_train == 1500


@pytest.mark.parametrize(
    ("entry", "value", "message"),
    [
        ("proj_dim", "512", "proj_dim must be a positive integer, got '512'"),
        ("epochs", 2.5, "epochs must be a positive integer, got 2.5"),
        ("threads", -2, "threads must be a non-negative integer"),
        ("lds_models", 1.5, "lds_models must be a non-negative integer (0: no LDS), got 1.5"),
    ],
)
def test_a_demo_config_entry_that_cannot_work_is_named(entry, value, message):
    from datatrace.demo.run import DemoConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        DemoConfig(quick=True, **{entry: value}).resolved()
    assert DemoConfig(quick=True, lds_models=0).resolved().lds_models == 0


@pytest.mark.parametrize("estimator", ["InfluenceFunctions", "GradientDot"])
def test_a_device_name_torch_does_not_know_is_named_by_every_estimator(estimator):
    with pytest.raises(ValueError, match=r"device must be a torch device .* got 'tpu'"):
        getattr(dt, estimator)(make_model(), dt.Classification(), device="tpu", progress=False).fit(
            make_data()
        )


# A seed that is not a non-negative integer: each was taken before, "3" and 2.5 seeding other
# projections than 3 and 2 (and the masks of a subset experiment silently), None and -1 too.
BAD_SEEDS = ["3", 2.5, -1, True, None]


def _seeded(kind: str, seed, tmp_path):
    from datatrace.evaluation.lds import lds
    from datatrace.subsets import SubsetExperiment

    rng = np.random.default_rng(0)
    if kind == "TRAK":
        return trak(store=tmp_path / "store", proj_dim=8, seed=seed).fit(make_data())
    if kind == "SubsetExperiment":
        return SubsetExperiment(
            tmp_path / "store", "t", n_train=N_TRAIN, n_outputs=2, n_masks=4, seed=seed
        )
    if kind == "Datamodels":
        masks = rng.random((40, N_TRAIN)) < 0.5
        return dt.Datamodels(seed=seed, progress=False).fit(masks, rng.normal(size=(40, 2)))
    if kind == "InfluenceFunctions":
        estimator = dt.InfluenceFunctions(make_model(), dt.Classification(), seed=seed)
        return estimator.fit(make_data())
    masks = rng.random((30, N_TRAIN)) < 0.5
    return lds(rng.normal(size=(2, N_TRAIN)), masks, rng.normal(size=(30, 2)), seed=seed)


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=[repr(seed) for seed in BAD_SEEDS])
@pytest.mark.parametrize(
    "kind", ["TRAK", "SubsetExperiment", "Datamodels", "InfluenceFunctions", "lds"]
)
def test_a_seed_that_is_not_a_non_negative_integer_is_named_and_nothing_is_stored(
    kind, seed, tmp_path
):
    with pytest.raises(ValueError, match=re.escape("must be a non-negative integer")) as raised:
        _seeded(kind, seed, tmp_path)
    assert "seed" in str(raised.value) and repr(seed) in str(raised.value)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "kind", ["TRAK", "SubsetExperiment", "Datamodels", "InfluenceFunctions", "lds"]
)
def test_a_numpy_integer_seed_is_the_seed_it_holds(kind, tmp_path):
    first = _seeded(kind, np.int64(3), tmp_path / "numpy")
    second = _seeded(kind, 3, tmp_path / "python")
    if kind == "TRAK":
        targets = make_data(4)
        np.testing.assert_array_equal(first.score(targets).scores, second.score(targets).scores)
    elif kind == "SubsetExperiment":
        np.testing.assert_array_equal(first.masks[:], second.masks[:])
    elif kind == "lds":
        assert first.ci == second.ci
    elif kind == "Datamodels":
        np.testing.assert_array_equal(first.weights_, second.weights_)
    else:
        targets = make_data(4)
        np.testing.assert_array_equal(first.score(targets).scores, second.score(targets).scores)
