"""Top-k without the score matrix, self-influence and the FAISS index, against the full
matrix: ``argsort`` of every row, its diagonal, exact top-k sets."""

import itertools
import sys

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from datatrace.methods.faiss_index import FaissIndex, import_faiss
from datatrace.methods.retrieval import RunningTopK
from datatrace.store import scores as score_layout

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_TARGETS, FEATURE_ROWS = 300, 12, 64
# Training examples 40:60 are all-zero inputs: with a bias-free first layer their gradient with
# respect to the last layer's weight is exactly zero, so every target scores them exactly 0
# (ties; -0.0 beside 0.0 is in the unit test of RunningTopK).
ZERO_ROWS = slice(40, 60)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.Tanh(), nn.Linear(16, 3))


def make_data():
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(N_TRAIN + N_TARGETS, 8, generator=generator)
    X[ZERO_ROWS] = 0
    y = torch.randint(0, 3, (N_TRAIN + N_TARGETS,), generator=generator)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def fitted(proj_dim: int, n_checkpoints: int = 2, params="2.weight") -> dt.TRAK:
    """TRAK through the last layer (48 parameters: sparse JL to ``proj_dim``; ``512 > n`` is
    the dual)."""
    train, _ = make_data()
    trak = dt.TRAK(
        make_model(),
        dt.Classification(),
        proj_dim=proj_dim,
        projector="sparse",
        params=params,
        chunk_size=FEATURE_ROWS,
        batch_size=50,
        progress=False,
    )
    return trak.fit(train, [make_model(seed).state_dict() for seed in range(n_checkpoints)])


def stable_top(matrix: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-matrix if largest else matrix, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(matrix, order, axis=1)


def test_running_top_k_equals_stable_argsort_with_ties():
    generator = np.random.default_rng(0)
    matrix = generator.integers(-3, 4, size=(9, 500)).astype(np.float32)  # ties everywhere
    matrix[:, 100:120] = -0.0  # a tie between 0.0 and -0.0, as argsort sees it
    matrix[0] = 1.5
    edges = [0, 37, 64, 65, 200, 333, 500]
    for largest in (True, False):
        for k in (1, 10, 499, 600):
            forward, shuffled = RunningTopK(k, largest), RunningTopK(k, largest)
            for lo, hi in itertools.pairwise(edges):
                forward.update(torch.from_numpy(matrix[:, lo:hi]), lo)
            blocks = list(itertools.pairwise(edges))
            for index in generator.permutation(len(blocks)):
                lo, hi = blocks[index]
                shuffled.update(torch.from_numpy(matrix[:, lo:hi]), lo)
            indices, scores = stable_top(matrix, min(k, 500), largest)
            for running in (forward, shuffled):
                got = running.result()
                np.testing.assert_array_equal(got.indices, indices)
                np.testing.assert_array_equal(got.scores, scores)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        RunningTopK(0)


@pytest.fixture(params=[32, 512], ids=["primal", "dual"])
def trak(request, monkeypatch):
    # Column blocks of 128 (two feature chunks), which do not divide n = 300.
    monkeypatch.setattr(score_layout, "SCORE_CHUNK", (5, 128))
    trak = fitted(request.param)
    assert trak.dual_ == (request.param > N_TRAIN)
    return trak


def test_streamed_top_k_equals_argsort_of_the_full_matrix(trak, tmp_path):
    _, targets = make_data()
    scores = trak._ensemble()
    # Blocks of 5 targets (5, 5, 2) in both, so that the products are rounded alike.
    budget = scores.block_bytes(5, 128)
    full = trak.score(targets, out=tmp_path / "store", memory_budget=budget)[:, :]
    assert (full[:, ZERO_ROWS] == 0).all()  # twenty tied columns
    for k in (10, 150, 1000):  # 150 reaches the zeros' ties; 1000 is past n
        budget = scores.block_bytes(5, 128, top_k=min(k, N_TRAIN))
        top = trak.top_k(targets, k, memory_budget=budget)
        for ranking, largest in ((top.proponents, True), (top.opponents, False)):
            indices, values = stable_top(full, min(k, N_TRAIN), largest)
            np.testing.assert_array_equal(ranking.indices, indices)
            np.testing.assert_array_equal(ranking.scores, values)
    # and close to the in-memory scores (computed in one block)
    in_memory = trak.score(targets).scores
    top = trak.top_k(targets, 10)
    want = np.sort(in_memory, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(top.proponents.scores, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        trak.top_k(targets, 0)


def test_self_influence_is_the_diagonal_of_the_training_scores(trak):
    train, _ = make_data()
    diagonal = np.diag(trak.score(train).scores)
    influence = trak.self_influence()
    assert influence.shape == (N_TRAIN,) and influence.dtype == np.float32
    np.testing.assert_allclose(influence, diagonal, rtol=1e-4, atol=1e-6 * diagonal.max())
    assert (influence[ZERO_ROWS] == 0).all() and (np.delete(influence, ZERO_ROWS) > 0).all()


def test_self_influence_with_every_parameter():
    trak = fitted(32, n_checkpoints=3, params=None)
    train, _ = make_data()
    diagonal = np.diag(trak.score(train).scores)
    np.testing.assert_allclose(trak.self_influence(), diagonal, rtol=1e-4, atol=1e-6)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_faiss_index_recall_against_exact_top_k(monkeypatch):
    import_faiss_or_skip()
    monkeypatch.setattr(score_layout, "SCORE_CHUNK", (5, 128))
    trak = fitted(32, n_checkpoints=3, params=None)
    _, targets = make_data()
    exact = trak.top_k(targets, 10)
    # the flat index is exact: the same sets, the same scores up to rounding
    flat = trak.top_k(targets, 10, index=trak.faiss_index("Flat"))
    for got, want in ((flat.proponents, exact.proponents), (flat.opponents, exact.opponents)):
        assert recall(got.indices, want.indices) == 1.0
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-6)
    # inverted lists: probing every list is exact; probing fewer trades recall for speed
    everything = trak.faiss_index("IVF4,Flat", nprobe=4)
    found = trak.top_k(targets, 10, index=everything)
    assert recall(found.proponents.indices, exact.proponents.indices) == 1.0
    assert recall(found.opponents.indices, exact.opponents.indices) == 1.0
    some = trak.top_k(targets, 10, index=trak.faiss_index("IVF4,Flat", nprobe=1))
    assert 0.1 <= recall(some.proponents.indices, exact.proponents.indices) < 1.0
    with pytest.raises(ValueError, match="build the index from this estimator"):
        fitted(64).top_k(targets, 10, index=everything)


def test_faiss_index_refuses_the_dual():
    import_faiss_or_skip()
    with pytest.raises(ValueError, match="dual"):
        fitted(512).faiss_index()


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"datatrace\[faiss\]"):
        import_faiss()
    with pytest.raises(ImportError, match=r"datatrace\[faiss\]"):
        FaissIndex(fitted(32)._ensemble())


def import_faiss_or_skip():
    pytest.importorskip("faiss")
