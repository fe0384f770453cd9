"""Commands that only read never create a store: a path that is not a store is a one-line error
naming it, and nothing is created or changed there. `datatrace verify` finds a lost chunk and
`--repair` lets the next fit recompute it to the same scores."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from typer.testing import CliRunner

import datatrace as dt
from datatrace.cli import app
from datatrace.grads.featurize import GradientFeatures
from datatrace.subsets import SubsetExperiment

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
# Wide enough that rich never wraps a table cell or a message.
WIDE = {"COLUMNS": "250"}

# Command → its arguments for a store (or input) at AT; every option it requires is given.
READ_ONLY_COMMANDS = {
    "lds": lambda at: ["lds", at, "--scores", "s", "--subsets", "t"],
    "datamodels fit": lambda at: ["datamodels", "fit", at, "--subsets", "t", "--out-name", "o"],
    "info": lambda at: ["info", at],
    "modeldiff": lambda at: ["modeldiff", at, "--a", "s", "--b", "t"],
    "klom": lambda at: ["klom", at, at],
    "verify": lambda at: ["verify", at],
    "verify --repair": lambda at: ["verify", "--repair", at],
    "subsets status": lambda at: ["subsets", "status", at],
    "subsets status NAME": lambda at: ["subsets", "status", at, "t"],
}


def make_place(tmp_path: Path, place: str) -> tuple[str, Path]:
    """A location that holds no datatrace store: (what is passed, the local path it names)."""
    path = tmp_path / place.replace(" ", "-")
    if place in ("missing", "missing url"):
        path = path / "store"  # its parent is missing too
    elif place == "empty directory":
        path.mkdir()
    elif place == "file":
        path.write_text("not a store\n")
    elif place == "foreign directory":
        path.mkdir()
        (path / "notes.txt").write_text("someone else's\n")
    elif place == "zarr group":
        zarr.open_group(str(path), mode="w")
    return (f"file://{path}" if place == "missing url" else str(path)), path


PLACES = ("missing", "empty directory", "file", "foreign directory", "zarr group", "missing url")


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included): its contents and modification time."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        contents = path.read_bytes() if path.is_file() else None
        entries[str(path.relative_to(root))] = (contents, path.stat().st_mtime_ns)
    return entries


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", READ_ONLY_COMMANDS)
def test_read_only_command_on_a_non_store_is_one_error_line_and_creates_nothing(
    tmp_path, command, place
):
    location, path = make_place(tmp_path, place)
    before = tree(tmp_path)
    result = runner.invoke(app, READ_ONLY_COMMANDS[command](location), env=WIDE)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.startswith("error:"), result.stderr
    named = path.name if command == "klom" else location  # klom names its input files
    assert named in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert tree(tmp_path) == before  # nothing created, nothing changed
    assert place not in ("missing", "missing url") or not path.parent.exists()


# -- datatrace verify -------------------------------------------------------------------------

N_TRAIN, CHUNK = 300, 64


def trak(store) -> dt.TRAK:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    settings = {"proj_dim": 32, "chunk_size": CHUNK, "batch_size": CHUNK, "progress": False}
    return dt.TRAK(model, dt.Classification(), store=store, **settings)


def fitted_store(path: Path) -> tuple[tuple, tuple, np.ndarray]:
    """A TRAK fit into ``path``, its scores saved as "saved", and a subset experiment "none"
    with no finished row: (train, targets, scores)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(N_TRAIN + 10, 8, generator=generator)
    labels = torch.randint(0, 3, (N_TRAIN + 10,), generator=generator)
    train, targets = (inputs[:N_TRAIN], labels[:N_TRAIN]), (inputs[N_TRAIN:], labels[N_TRAIN:])
    scores = trak(str(path)).fit(train).score(targets, name="saved").scores
    SubsetExperiment(str(path), "none", n_train=N_TRAIN, n_outputs=10, n_masks=2)
    return train, targets, scores


# Reads of a sound store, some finding nothing to read: (arguments, exit code, what is said).
FRUITLESS_READS = {
    "lds, no such scores": ("lds STORE --scores nope --subsets none", 1, "'nope'"),
    "lds, no finished subsets": ("lds STORE --scores saved --subsets none", 1, "'none'"),
    "datamodels fit, no such subsets": (
        "datamodels fit STORE --subsets nope --out-name o",
        1,
        "'nope'",
    ),
    "datamodels fit, no finished subsets": (
        "datamodels fit STORE --subsets none --out-name o",
        1,
        "no finished rows",
    ),
    "modeldiff, no such scores": ("modeldiff STORE --a saved --b nope", 1, "'nope'"),
    "subsets status, no such experiment": ("subsets status STORE nope", 1, "'nope'"),
    "subsets status": ("subsets status STORE none", 0, "0/2 rows done"),
    "info": ("info STORE", 0, "Subset experiments: 1"),
    "verify": ("verify STORE", 0, "sound:"),
}


@pytest.fixture(scope="module")
def sound_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sound") / "store"
    fitted_store(path)
    return path


@pytest.mark.parametrize("read", FRUITLESS_READS)
def test_reading_a_store_writes_nothing_into_it(sound_store, read):
    command, code, said = FRUITLESS_READS[read]
    arguments = [str(sound_store) if word == "STORE" else word for word in command.split()]
    before = tree(sound_store.parent)
    result = runner.invoke(app, arguments, env=WIDE)
    assert result.exit_code == code, result.output
    assert said in result.output
    if code:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and said in errors[0], result.stderr
    assert tree(sound_store.parent) == before


def test_verify_finds_a_lost_chunk_and_repair_lets_a_refit_recompute_it(tmp_path, monkeypatch):
    path = tmp_path / "store"
    train, targets, scores = fitted_store(path)

    sound = runner.invoke(app, ["verify", str(path)], env=WIDE)
    assert sound.exit_code == 0, sound.output
    assert sound.stdout.startswith("sound:") and str(path) in sound.stdout

    (path / "features/0/features/c/2/0").unlink()  # row chunk 2 of checkpoint 0 is lost
    damaged = runner.invoke(app, ["verify", str(path)], env=WIDE)
    assert damaged.exit_code == 1, damaged.output
    assert re.search(r"features/0/features\s*│\s*\(2, 0\)\s*│\s*is missing", damaged.stdout), (
        damaged.stdout
    )
    assert "damaged:" in damaged.stdout and f"verify --repair {path}" in damaged.stdout

    repaired = runner.invoke(app, ["verify", "--repair", str(path)], env=WIDE)
    assert repaired.exit_code == 0, repaired.output
    assert "repaired:" in repaired.stdout
    again = runner.invoke(app, ["verify", str(path)], env=WIDE)
    assert again.exit_code == 0 and again.stdout.startswith("sound:"), again.output

    featurized = []
    original = GradientFeatures.featurize

    def counting(self, state, batch, checkpoint):
        featurized.append(len(batch[1]))
        return original(self, state, batch, checkpoint)

    monkeypatch.setattr(GradientFeatures, "featurize", counting)
    refitted = trak(str(path)).fit(train)
    assert sum(featurized) == CHUNK  # only the dropped chunk is featurized again
    np.testing.assert_array_equal(refitted.score(targets).scores, scores)
    np.testing.assert_array_equal(dt.Attributions.load(str(path), "saved").scores, scores)
    assert runner.invoke(app, ["verify", str(path)]).exit_code == 0


def test_repair_exits_1_when_it_leaves_damage_it_cannot_recompute(tmp_path):
    """A checkpoint's features whose zarr.json was lost cannot be recomputed by verify: --repair
    drops what it can (the lost gram) and still says that damage is left, with exit code 1."""
    path = tmp_path / "store"
    fitted_store(path)
    (path / "features/0/features/zarr.json").unlink()
    (path / "features/0/gram/zarr.json").unlink()

    damaged = runner.invoke(app, ["verify", str(path)], env=WIDE)
    assert damaged.exit_code == 1, damaged.output
    assert re.search(r"features/0/features\s*│\s*—\s*│\s*has lost its metadata", damaged.stdout)

    repaired = runner.invoke(app, ["verify", "--repair", str(path)], env=WIDE)
    assert repaired.exit_code == 1, repaired.output
    assert "damage left" in repaired.stdout and "1 of the" in repaired.stdout, repaired.stdout
    assert not (path / "features/0/gram").exists()  # dropped: the next fit rebuilds it
    assert (path / "features/0/features/c").is_dir()  # left as is


def test_info_names_a_node_whose_metadata_was_lost(tmp_path):
    """Without its zarr.json a checkpoint's features show as '?' and a saved score matrix not
    at all: info says why, and points to verify."""
    path = tmp_path / "store"
    fitted_store(path)
    sound = runner.invoke(app, ["info", str(path)], env=WIDE)
    assert sound.exit_code == 0 and "damaged" not in sound.stdout, sound.output
    (path / "features/0/features/zarr.json").unlink()
    (path / "scores/saved/zarr.json").unlink()
    before = tree(path)
    shown = runner.invoke(app, ["info", str(path)], env=WIDE)
    assert shown.exit_code == 0, shown.output
    for node in ("features/0/features", "scores/saved"):
        assert re.search(rf"damaged: {node} has lost its metadata", shown.stdout), shown.stdout
    assert f"datatrace verify {path}" in shown.stdout
    assert tree(path) == before
