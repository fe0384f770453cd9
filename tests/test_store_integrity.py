"""Damaged stores: a deleted, truncated or bit-flipped chunk of every array kind.

Each case copies one complete store (TRAK features and kernel, saved scores, a subset
experiment), damages one chunk object, and checks four things: using the store either raises a
:class:`StoreCorruptionError` naming the array and chunk or (a lost completion mark) recomputes
that chunk; using it wrote nothing (every other object is byte-identical); ``verify_store``
reports the damage; and after ``repair=True`` the same run gives results identical to the
undamaged store's. Nothing earlier is lost.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import datatrace as dt
from datatrace.store import Store, StoreCorruptionError, verify_store

sys.path.insert(0, str(Path(__file__).parent))
import _subsets_worker as toy

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, CHUNK, PROJ_DIM = 300, 64, 32
SCORES = "saved"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN + 10, 8, generator=generator)
    y = torch.randint(0, 3, (N_TRAIN + 10,), generator=generator)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def trak(path) -> dt.TRAK:
    return dt.TRAK(
        make_model(),
        dt.Classification(),
        proj_dim=PROJ_DIM,
        store=path,
        chunk_size=CHUNK,
        batch_size=50,
        progress=False,
    )


def use_features(path) -> np.ndarray:
    train, targets = make_data()
    return trak(path).fit(train).score(targets).scores


def use_scores(path) -> np.ndarray:
    return Store(path, read_only=True).load_attributions(SCORES).scores


def use_subsets(path) -> np.ndarray:
    model = toy.Additive()
    experiment = toy.experiment(path)
    experiment.run(model.train, model.evaluate, progress=False)
    return experiment.results(reduce=None).outputs


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A complete store and what each use of it gives."""
    path = tmp_path_factory.mktemp("pristine") / "store"
    train, targets = make_data()
    trak(path).fit(train).score(targets, name=SCORES)
    use_subsets(path)
    assert verify_store(path).clean
    return path, {
        "features": use_features(path),
        "scores": use_scores(path),
        "subsets": use_subsets(path),
    }


def objects(path: Path) -> dict[str, bytes]:
    return {
        str(file.relative_to(path)): file.read_bytes()
        for file in sorted(path.rglob("*"))
        if file.is_file()
    }


def delete(file: Path) -> None:
    file.unlink()


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def flip_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def empty_object(file: Path) -> None:
    """Valid JSON that is not zarr metadata."""
    file.write_text("{}")


DAMAGE = {
    "deleted": delete,
    "truncated": truncate,
    "bit-flipped": flip_bit,
    "emptied": empty_object,
}

# (array, chunk, the use that reads it) for every kind of stored array.
ARRAYS = [
    ("features/0/features", (2, 0), "features"),
    ("features/0/out_to_loss", (3,), "features"),
    ("features/0/example_hash", (1,), "features"),
    ("features/0/done", (2,), "features"),
    ("features/0/digest", (2, 0), "features"),
    ("features/0/gram", (0, 0), "features"),
    (f"scores/{SCORES}/scores", (0, 0), "scores"),
    (f"scores/{SCORES}/out_to_loss", (0,), "scores"),
    (f"subsets/{toy.NAME}/masks", (5, 0), "subsets"),
    (f"subsets/{toy.NAME}/outputs", (5, 0, 0), "subsets"),
    (f"subsets/{toy.NAME}/train_seeds", (5, 0), "subsets"),
    (f"subsets/{toy.NAME}/done", (5,), "subsets"),
]
USES = {"features": use_features, "scores": use_scores, "subsets": use_subsets}


def chunk_file(store: Path, array: str, chunk: tuple[int, ...]) -> Path:
    return store / array / "c" / Path(*map(str, chunk))


@pytest.mark.parametrize("damage", ["deleted", "truncated", "bit-flipped"])
@pytest.mark.parametrize(("array", "chunk", "use"), ARRAYS, ids=[a for a, _, _ in ARRAYS])
def test_a_damaged_chunk_is_named_nothing_is_lost_and_repair_recomputes_it(
    pristine, tmp_path, array, chunk, use, damage
):
    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    target = chunk_file(path, array, chunk)
    assert target.is_file(), f"the layout changed: no object {target}"
    DAMAGE[damage](target)
    damaged = objects(path)

    # A lost completion mark only means "not done": that chunk is computed again, the same. A
    # lost random mask is drawn again from the experiment's seed (as after a killed creation).
    recomputed = damage == "deleted" and array.endswith(("/done", f"{toy.NAME}/masks"))
    if recomputed:
        np.testing.assert_array_equal(USES[use](path), expected[use])
        assert verify_store(path).clean
        return
    with pytest.raises(StoreCorruptionError) as raised:
        USES[use](path)
    error = raised.value
    assert (error.array, error.chunk) == (array, chunk)
    assert f"chunk {chunk[0] if len(chunk) == 1 else chunk}" in str(error)
    assert array in str(error) and "datatrace verify" in str(error)
    assert objects(path) == damaged, "a use of a damaged store wrote to it"

    report = verify_store(path)
    assert [(p.array, p.chunk) for p in report.problems] == [(array, chunk)]
    assert objects(path) == damaged, "verify without repair wrote to the store"

    repaired = verify_store(path, repair=True)
    assert repaired.repaired
    # What repair drops is recomputed by the next run, and only that: the rest is kept.
    after = objects(path)
    kept = {name for name in damaged if name in after}
    assert all(after[name] == damaged[name] for name in kept if "/c/" in name)
    if use == "scores":  # saved scores are dropped whole: score again to save them
        assert f"{SCORES}" not in Store(path, read_only=True).groups("scores")
        train, targets = make_data()
        trak(path).fit(train).score(targets, name=SCORES)
    np.testing.assert_array_equal(USES[use](path), expected[use])
    assert verify_store(path).clean


def _swap(first: Path, second: Path) -> None:
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)


@pytest.mark.parametrize(
    ("move", "array", "chunk"),
    [
        ("swapped", "features/0/features", (1, 0)),
        ("swapped", "features/0/out_to_loss", (0,)),
        ("from another store", "features/0/features", (2, 0)),
    ],
)
def test_a_chunk_moved_from_elsewhere_is_refused_though_it_decodes(
    pristine, tmp_path, move, array, chunk
):
    """A chunk object copied to another position, or from another store (another seed), passes
    its own checksum: the digest written with its row chunk refuses it, verify names it and
    repair has it recomputed."""
    from datatrace.store.verify import MISPLACED

    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    target = chunk_file(path, array, chunk)
    if move == "swapped":
        _swap(target, chunk_file(path, array, (3, *chunk[1:])))
    else:
        other = tmp_path / "other"
        train, _ = make_data()
        dt.TRAK(
            make_model(), dt.Classification(), proj_dim=PROJ_DIM, store=other, chunk_size=CHUNK,
            batch_size=50, progress=False, seed=1,
        ).fit(train)  # fmt: skip
        target.write_bytes(chunk_file(other, array, chunk).read_bytes())
    damaged = objects(path)
    with pytest.raises(StoreCorruptionError) as raised:
        use_features(path)
    assert (raised.value.array, raised.value.problem) == (array, MISPLACED)
    assert raised.value.chunk in (chunk, (3, *chunk[1:]))
    assert objects(path) == damaged, "a use of a damaged store wrote to it"
    report = verify_store(path)
    moved = {p.chunk for p in report.problems}
    assert {p.problem for p in report.problems} == {MISPLACED} and chunk in moved
    verify_store(path, repair=True)
    np.testing.assert_array_equal(use_features(path), expected["features"])
    assert verify_store(path).clean


def test_repair_recomputes_only_the_dropped_feature_chunk(pristine, tmp_path):
    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    before = objects(path)
    flip_bit(chunk_file(path, "features/0/features", (2, 0)))
    verify_store(path, repair=True)
    assert zarr.open_group(str(path), mode="r")["features/0/done"][:].tolist() == [1, 1, 0, 1, 1]
    np.testing.assert_array_equal(use_features(path), expected["features"])
    after = objects(path)
    for chunk in (0, 1, 3, 4):  # the chunks that were sound are the same objects
        name = f"features/0/features/c/{chunk}/0"
        assert after[name] == before[name]
    assert after["features/0/features/c/2/0"] == before["features/0/features/c/2/0"]


def test_verify_reports_non_finite_features_in_a_finished_chunk(pristine, tmp_path):
    source, _ = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    features = zarr.open_group(str(path), mode="a")["features/0/features"]
    block = features[0:CHUNK]
    block[3, 0] = np.nan
    features[0:CHUNK] = block  # written through zarr: a valid checksum, a bad value
    problems = verify_store(path).problems
    assert [(p.array, p.chunk, p.problem) for p in problems] == [
        ("features/0/features", (0, 0), "holds NaN or infinite values")
    ]


def flip_digit(metadata: Path, key: str) -> None:
    """One bit flipped in the first digit of the value of ``key`` in a ``zarr.json``: the low
    bit of an ASCII digit, so it stays a digit and the file stays valid JSON."""
    text = metadata.read_bytes()
    start = text.index(f'"{key}":'.encode()) + len(key) + 3
    digit = next(i for i in range(start, len(text)) if chr(text[i]).isdigit())
    metadata.write_bytes(text[:digit] + bytes([text[digit] ^ 0x01]) + text[digit + 1 :])


@pytest.mark.parametrize("key", ["neighbour_cosine", "trace", "coupling", "gram_chunks"])
def test_an_altered_digit_of_the_kernels_attributes_is_refused_and_repaired(
    pristine, tmp_path, key
):
    """The statistics the damping rule reads and the chunks the stored gram covers live in the
    checkpoint group's zarr.json, which no chunk checksum covers: a flipped digit there still
    parses (ρ 0.67 read as 0.66 or 0.47 changes the damping; a gram taken to cover fewer chunks
    than it does would have one chunk added twice). Their seal refuses it; verify names it and
    repair drops them, rebuilt by the next fit to the same scores."""
    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    metadata = path / "features/0/zarr.json"
    flip_digit(metadata, key)
    json.loads(metadata.read_text())  # still valid JSON
    damaged = objects(path)
    with pytest.raises(StoreCorruptionError, match="fail their checksum") as raised:
        use_features(path)
    assert raised.value.array == "features/0" and "datatrace verify" in str(raised.value)
    with pytest.raises(StoreCorruptionError, match="fail their checksum"):
        dt.TRAK.from_store(path, make_model(), dt.Classification())
    assert objects(path) == damaged, "a use of a damaged store wrote to it"
    report = verify_store(path)
    assert [(p.array, p.chunk) for p in report.problems] == [("features/0", None)]
    verify_store(path, repair=True)
    attributes = json.loads(metadata.read_text())["attributes"]
    assert set(attributes) == {"identity"}  # derived attributes and their seal dropped
    np.testing.assert_array_equal(use_features(path), expected["features"])
    assert verify_store(path).clean


def test_chunks_finished_before_the_digests_are_not_taken_for_lost_digests(pristine, tmp_path):
    """A store of an earlier version has no digests; resumed, the chunks it finished have none
    (the array records that not every chunk has one), and stores whose digest array predates
    that record are read as before: neither is refused, and the scores are the same."""
    source, expected = pristine
    train, _ = make_data()
    path = tmp_path / "resumed"
    trak(path).fit(train, shard=(0, 2))
    del zarr.open_group(str(path), mode="r+")["features/0/digest"]  # as written before digests
    trak(path).fit(train)
    digest = zarr.open_array(str(path / "features/0/digest"), mode="r")
    assert digest.attrs["every_chunk"] is False
    assert not (path / "features/0/digest/c/0/0").exists()  # finished before: none
    np.testing.assert_array_equal(use_features(path), expected["features"])
    assert verify_store(path).clean

    path = tmp_path / "unrecorded"
    shutil.copytree(source, path)
    digest = zarr.open_array(str(path / "features/0/digest"), mode="r+")
    digest.attrs.put({})  # a digest array written before the record
    (path / "features/0/digest/c/2/0").unlink()
    np.testing.assert_array_equal(use_features(path), expected["features"])
    assert verify_store(path).clean


def test_derived_attributes_without_a_seal_are_read_as_before(pristine, tmp_path):
    """A store written before seals: its derived attributes are read unchecked, and the next
    change of them seals them."""
    from datatrace.store.verify import SEAL_ATTRIBUTE

    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    metadata = path / "features/0/zarr.json"
    document = json.loads(metadata.read_text())
    assert SEAL_ATTRIBUTE in document["attributes"]
    del document["attributes"][SEAL_ATTRIBUTE]
    metadata.write_text(json.dumps(document))
    np.testing.assert_array_equal(use_features(path), expected["features"])
    assert verify_store(path).clean


# Metadata of every kind of node: the root, a section, a checkpoint's group, arrays, saved
# scores, a subset experiment's table.
METADATA = [
    ("/", "features"),
    ("features", "features"),
    ("features/0", "features"),
    ("features/0/features", "features"),
    ("features/0/done", "features"),
    (f"scores/{SCORES}", "scores"),
    (f"scores/{SCORES}/scores", "scores"),
    (f"subsets/{toy.NAME}/outputs", "subsets"),
]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "emptied"])
@pytest.mark.parametrize(("node", "use"), METADATA, ids=[node for node, _ in METADATA])
def test_lost_or_damaged_metadata_is_named_and_nothing_is_written(
    pristine, tmp_path, node, use, damage
):
    source, _ = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    metadata = path / ("zarr.json" if node == "/" else f"{node}/zarr.json")
    DAMAGE[damage](metadata)
    before = objects(path)
    with pytest.raises(StoreCorruptionError) as raised:
        USES[use](path)
    assert raised.value.array == node
    assert "restore the file from a copy" in str(raised.value)
    assert objects(path) == before, "a use of a store with damaged metadata wrote to it"


# (node whose zarr.json is lost, whether repair can drop it: what it holds is rebuilt)
LOST = [
    ("features/0", False),
    ("features/0/features", False),
    ("features/0/digest", False),
    ("features/0/gram", True),
    (f"scores/{SCORES}", True),
    (f"scores/{SCORES}/scores", True),
    (f"subsets/{toy.NAME}/outputs", False),
]


@pytest.mark.parametrize(("node", "rebuilt"), LOST, ids=[node for node, _ in LOST])
def test_verify_reports_a_node_whose_metadata_was_lost(pristine, tmp_path, node, rebuilt):
    """zarr lists no node where ``zarr.json`` is missing, so its chunks are found by listing
    the objects: verify names the node, and repair drops it only where a run rebuilds it."""
    source, expected = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    (path / node / "zarr.json").unlink()
    before = objects(path)
    report = verify_store(path)
    assert [(problem.array, problem.chunk) for problem in report.problems if
            "lost its metadata" in problem.problem] == [(node, None)]  # fmt: skip
    assert objects(path) == before, "verify without repair wrote to the store"
    verify_store(path, repair=True)
    if not rebuilt:
        assert objects(path) == before, "repair dropped what no run can rebuild"
        assert not verify_store(path).clean
        return
    assert verify_store(path).clean
    assert not any(key.startswith(f"{node}/") for key in objects(path))
    np.testing.assert_array_equal(use_features(path), expected["features"])
    if node.startswith("scores/"):
        with pytest.raises(KeyError, match=SCORES):
            use_scores(path)


@pytest.mark.parametrize("reopen", [True, False], ids=["from_store", "fit"])
def test_a_section_whose_provenance_was_dropped_is_refused_not_taken_for_empty(
    pristine, tmp_path, reopen
):
    """``features/zarr.json`` rewritten as valid group metadata without its attributes: the
    checkpoints under it stay, so the store is damaged, not a store that holds no features."""
    source, _ = pristine
    path = tmp_path / "store"
    shutil.copytree(source, path)
    metadata = path / "features/zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"] = {}
    metadata.write_text(json.dumps(document))
    before = objects(path)
    train, _ = make_data()
    with pytest.raises(StoreCorruptionError, match="lost its provenance") as raised:
        if reopen:
            dt.TRAK.from_store(path, make_model(), dt.Classification())
        else:
            trak(path).fit(train)
    assert raised.value.array == "features"
    assert objects(path) == before


def test_swapped_partial_grams_are_refused_when_the_kernel_is_built(tmp_path):
    """The partial Grams of a fit in progress (k < n: the kernel is their sum) are bound to
    their row chunks too: two swapped ones are refused when the last shard completes the fit."""
    from datatrace.store.verify import MISPLACED

    path = tmp_path / "store"
    train, _ = make_data()
    trak(path).fit(train, shard=(0, 2))  # row chunks 0, 2 and 4: not fitted yet
    grams = path / "features/0/partial_gram/c"
    _swap(grams / "0/0/0", grams / "2/0/0")
    with pytest.raises(StoreCorruptionError) as raised:
        trak(path).fit(train)
    assert raised.value.array == "features/0/partial_gram"
    assert raised.value.problem == MISPLACED and raised.value.chunk in ((0, 0, 0), (2, 0, 0))
