"""Score matrices streamed into the store (``TRAK.score(targets, out=...)``) against the
in-memory ``score``: same numbers, read back by rows and by columns, resumed after a crash,
damage detected on read."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from datatrace.store import Store, StoreCorruptionError, StoreMismatchError, verify_store
from datatrace.store import scores as score_layout
from datatrace.store.scores import IncompleteScoresError, ScoreMatrix

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_TARGETS, FEATURE_ROWS = 300, 20, 64
# Score chunks of 7 targets × 128 columns (two feature chunks): neither divides its axis.
SMALL_SCORE_CHUNK = (7, 128)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def make_data():
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN + N_TARGETS, 8, generator=generator)
    y = torch.randint(0, 3, (N_TRAIN + N_TARGETS,), generator=generator)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def fitted(store=None, proj_dim: int = 32, n_checkpoints: int = 3) -> dt.TRAK:
    """TRAK over three checkpoints; ``proj_dim=512 > n`` solves the dual."""
    train, _ = make_data()
    trak = dt.TRAK(
        make_model(),
        dt.Classification(),
        proj_dim=proj_dim,
        projector="sparse",
        store=store,
        chunk_size=FEATURE_ROWS,
        batch_size=50,
        progress=False,
    )
    checkpoints = [make_model(seed).state_dict() for seed in range(n_checkpoints)]
    return trak.fit(train, checkpoints)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(score_layout, "SCORE_CHUNK", SMALL_SCORE_CHUNK)


def budget_for(trak: dt.TRAK, rows: int) -> int:
    """A memory budget that fits blocks of exactly ``rows`` targets."""
    scores = trak._ensemble()
    return scores.block_bytes(rows, SMALL_SCORE_CHUNK[1])


def assert_close_to(got: np.ndarray, want: np.ndarray) -> None:
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("proj_dim", [32, 512], ids=["primal", "dual"])
def test_streamed_scores_equal_in_memory_scores(small_chunks, tmp_path, proj_dim):
    trak = fitted(tmp_path / "store", proj_dim)
    assert trak.dual_ == (proj_dim > N_TRAIN)
    _, targets = make_data()
    want = trak.score(targets)
    # Blocks of 14 targets: two row chunks per pass over the features, then one of 6.
    matrix = trak.score(targets, out="big", memory_budget=budget_for(trak, 14))
    assert matrix.complete and matrix.shape == (N_TARGETS, N_TRAIN)
    assert matrix.chunks == SMALL_SCORE_CHUNK and matrix.grid == (3, 3)
    full = matrix[:, :]
    assert full.dtype == np.float32
    assert_close_to(full, want.scores)
    # by target rows, by training columns, and any block: the same numbers as the whole
    np.testing.assert_array_equal(matrix.rows(5, 16), full[5:16])
    np.testing.assert_array_equal(matrix.columns(100, 260), full[:, 100:260])
    np.testing.assert_array_equal(matrix[3, 250:], full[3, 250:])
    np.testing.assert_array_equal(matrix.out_to_loss, want.out_to_loss)
    # the finished matrix is ordinary saved attributions, and the store verifies clean
    loaded = Store(tmp_path / "store", read_only=True).load_attributions("big")
    np.testing.assert_array_equal(loaded.scores, full)
    assert loaded.method == "TRAK" and loaded.info["dual"] == trak.dual_
    assert verify_store(tmp_path / "store").clean
    with pytest.raises(IndexError, match="outside"):
        matrix.rows(0, N_TARGETS + 1)


def test_streamed_into_another_store_and_in_one_block(small_chunks, tmp_path):
    trak = fitted()  # features in memory
    _, targets = make_data()
    want = trak.score(targets).scores
    matrix = trak.score(targets, out=tmp_path / "scores", name="all")
    assert isinstance(matrix, ScoreMatrix)
    assert_close_to(ScoreMatrix.open(Store(tmp_path / "scores"), "all")[:, :], want)
    # the default budget scores all 20 targets in one pass; asking again computes nothing
    again = trak.score(targets, out=Store(tmp_path / "scores"), name="all")
    np.testing.assert_array_equal(again[:, :], matrix[:, :])


def test_interrupted_write_resumes_to_the_same_matrix(small_chunks, tmp_path, monkeypatch):
    trak = fitted(tmp_path / "store")
    _, targets = make_data()
    budget = budget_for(trak, 7)
    reference = trak.score(targets, out="reference", memory_budget=budget)[:, :]

    write = ScoreMatrix.write
    calls = []

    def crashing(self, row_start, column_start, block):
        if len(calls) == 4:
            raise RuntimeError("killed mid-write")
        calls.append((row_start, column_start))
        write(self, row_start, column_start, block)

    monkeypatch.setattr(ScoreMatrix, "write", crashing)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        trak.score(targets, out="big", memory_budget=budget)
    monkeypatch.setattr(ScoreMatrix, "write", write)

    partial = ScoreMatrix(Store(tmp_path / "store"), "big")
    assert not partial.complete and partial.done().sum() == 4
    with pytest.raises(IncompleteScoresError, match="4 of 9 chunks are written"):
        partial.rows(0, 1)
    with pytest.raises(KeyError):  # never read as finished saved attributions
        Store(tmp_path / "store").load_attributions("big")
    report = verify_store(tmp_path / "store")
    assert any("incomplete" in problem.problem for problem in report.problems)

    # resuming computes only the five missing chunks, and featurizes only the unfinished blocks
    featurized, resumed = [], []
    featurize_all = trak.features_.featurize_all

    def counting_featurize(data, *args, **kwargs):
        featurized.append(len(data[0]))
        return featurize_all(data, *args, **kwargs)

    def counting_write(self, row_start, column_start, block):
        resumed.append((row_start, column_start))
        write(self, row_start, column_start, block)

    monkeypatch.setattr(trak.features_, "featurize_all", counting_featurize)
    monkeypatch.setattr(ScoreMatrix, "write", counting_write)
    matrix = trak.score(targets, out="big", memory_budget=budget)
    assert len(resumed) == 5 and not set(resumed) & set(calls)
    assert sum(featurized) == 3 * (7 + 6)  # the blocks of targets 7:14 and 14:20, 3 checkpoints
    np.testing.assert_array_equal(matrix[:, :], reference)


def test_other_targets_or_a_saved_matrix_are_refused(small_chunks, tmp_path):
    trak = fitted(tmp_path / "store")
    _, (targets_X, targets_y) = make_data()
    trak.score((targets_X, targets_y), out="big")
    with pytest.raises(StoreMismatchError, match="targets"):
        trak.score((targets_X.flip(0), targets_y.flip(0)), out="big")
    trak.score((targets_X, targets_y), name="whole")
    with pytest.raises(StoreMismatchError, match="saved whole"):
        trak.score((targets_X, targets_y), out="whole")
    with pytest.raises(ValueError, match="pass out="):
        trak.score((targets_X, targets_y), memory_budget=10**6)
    with pytest.raises(ValueError, match="too small"):
        trak.score((targets_X, targets_y), out="tiny", memory_budget=1000)
    with pytest.raises(ValueError, match="already names"):
        trak.score((targets_X, targets_y), out="big", name="other")


def test_a_damaged_chunk_is_named_on_read(small_chunks, tmp_path):
    trak = fitted(tmp_path / "store")
    _, targets = make_data()
    trak.score(targets, out="big")
    chunk = Path(tmp_path / "store" / "scores" / "big" / "scores" / "c" / "1" / "1")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    matrix = ScoreMatrix.open(Store(tmp_path / "store", read_only=True), "big")
    matrix.columns(0, 128)  # other chunks read as ever
    with pytest.raises(StoreCorruptionError, match=r"chunk \(1, 1\) of scores/big/scores"):
        matrix.rows(7, 14)
    with pytest.raises(StoreCorruptionError, match="checksum"):
        matrix.columns(128, 256)
    report = verify_store(tmp_path / "store")
    assert [(p.array, p.chunk) for p in report.problems] == [("scores/big/scores", (1, 1))]


def test_streamed_queries_after_removing_training_examples(small_chunks, tmp_path):
    """Removed examples are not score columns: the streamed matrix, top-k and self-influence
    follow the in-memory scores of the remaining ones."""
    if not hasattr(dt.TRAK, "remove_examples"):
        pytest.skip("this version cannot remove training examples")
    trak = fitted(tmp_path / "store").remove_examples(np.r_[3, 60:75, 200])
    n_train = N_TRAIN - 17
    train, targets = make_data()
    want = trak.score(targets).scores
    assert want.shape == (N_TARGETS, n_train)
    matrix = trak.score(targets, out="after_removal", memory_budget=budget_for(trak, 7))
    assert_close_to(matrix[:, :], want)
    top = trak.top_k(targets, 5)
    best = np.sort(want, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(top.proponents.scores, best, rtol=1e-5, atol=1e-9)
    chosen = np.take_along_axis(want, top.proponents.indices, axis=1)
    np.testing.assert_allclose(chosen, best, rtol=1e-5, atol=1e-9)
    kept = np.delete(np.arange(N_TRAIN), np.r_[3, 60:75, 200])
    diagonal = np.diag(trak.score((train[0][kept], train[1][kept])).scores)
    np.testing.assert_allclose(trak.self_influence(), diagonal, rtol=1e-4, atol=1e-7)
