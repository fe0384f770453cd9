"""Random projections: definition, determinism, E[PPᵀ] = I, JL inner products, blocking."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from datatrace.grads.projectors import (
    DENSE_GENERATION_ROWS,
    DenseProjector,
    IdentityProjector,
    SparseJLProjector,
    derive_seed,
    make_projector,
)

SIZES = [(37, 5), (300,), (7,)]  # several parameter blocks, sizes not multiples of anything


def blocks(batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen) for shape in SIZES]


def sizes():
    return [math.prod(shape) for shape in SIZES]


PROJECTORS = {
    "gaussian": lambda k: DenseProjector(k, "gaussian"),
    "rademacher": lambda k: DenseProjector(k, "rademacher"),
    "sparse": lambda k: SparseJLProjector(k, nnz=4),
}


@pytest.mark.parametrize("kind", PROJECTORS)
def test_projection_is_linear_map_by_its_matrix(kind):
    projector = PROJECTORS[kind](64)
    grads = blocks()
    flat = torch.cat([g.reshape(6, -1) for g in grads], dim=1)
    matrix = projector.matrix(sizes(), seed=3)
    assert matrix.shape == (sum(sizes()), 64)
    torch.testing.assert_close(
        projector.project(grads, seed=3), flat @ matrix, rtol=1e-5, atol=1e-5
    )


def test_dense_definition_matches_an_independent_one_shot_generation():
    """Rows of block t, generation block b come from a generator seeded derive_seed(seed, t, b)."""
    k, seed = 48, 11
    reference = []
    for t, size in enumerate(sizes()):
        n_blocks = -(-size // DENSE_GENERATION_ROWS)
        rows = torch.cat(
            [
                torch.randn(
                    DENSE_GENERATION_ROWS,
                    k,
                    generator=torch.Generator().manual_seed(derive_seed(seed, t, b)),
                )
                for b in range(n_blocks)
            ]
        )
        reference.append(rows[:size] / math.sqrt(k))
    reference = torch.cat(reference)
    torch.testing.assert_close(DenseProjector(k).matrix(sizes(), seed), reference)


@pytest.mark.parametrize("kind", PROJECTORS)
def test_blockwise_equals_cached(kind):
    """Generating P a few rows at a time (no cache, tiny work blocks) gives the same features."""
    grads = blocks(batch=5)
    cached = PROJECTORS[kind](32)
    streamed = PROJECTORS[kind](32)
    streamed.max_cache_bytes = 0
    if isinstance(streamed, DenseProjector):
        streamed.work_bytes = 1  # one generation block at a time
    assert torch.equal(cached.matrix(sizes(), 5), streamed.matrix(sizes(), 5))
    # the same matrix; only the order of float32 additions differs
    torch.testing.assert_close(
        cached.project(grads, 5), streamed.project(grads, 5), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", PROJECTORS)
def test_deterministic_across_calls_and_processes(kind):
    grads = blocks()
    first = PROJECTORS[kind](32).project(grads, seed=7)
    again = PROJECTORS[kind](32).project(grads, seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, PROJECTORS[kind](32).project(grads, seed=8))
    matrix = PROJECTORS[kind](32).matrix([24], seed=7)
    # The other process multiplies with as many BLAS threads as this one (other tests change
    # torch's setting): a float32 product blocked differently may round differently, while the
    # projection matrix itself must be identical bit for bit whatever the threads.
    code = (
        "import torch, sys; sys.path.insert(0, 'tests');"
        f"torch.set_num_threads({torch.get_num_threads()});"
        "from test_projectors import PROJECTORS, blocks;"
        f"out = PROJECTORS[{kind!r}](32).project(blocks(), seed=7);"
        f"matrix = PROJECTORS[{kind!r}](32).matrix([24], seed=7);"
        "sys.stdout.write(out.numpy().tobytes().hex() + ' ' + matrix.numpy().tobytes().hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=__file__.rsplit("/tests/", 1)[0],
    ).stdout
    other_out, other_matrix = other.split()
    assert bytes.fromhex(other_matrix) == matrix.numpy().tobytes()
    assert bytes.fromhex(other_out) == first.numpy().tobytes()


@pytest.mark.parametrize("kind", PROJECTORS)
def test_expectation_of_p_pt_is_identity(kind):
    """Average P Pᵀ over many seeds: within 6 standard errors of I entrywise."""
    k, p, draws = 64, 24, 300
    projector = PROJECTORS[kind](k)
    total = torch.zeros(p, p, dtype=torch.float64)
    for seed in range(draws):
        matrix = projector.matrix([p], seed).double()
        total += matrix @ matrix.T
    mean = total / draws
    # Per draw, diag entries have variance 2/k (dense Gaussian), off-diagonal ones 1/k.
    tolerance = 6 * math.sqrt(2 / k / draws)
    assert (mean - torch.eye(p, dtype=torch.float64)).abs().max().item() < tolerance


@pytest.mark.parametrize("kind", PROJECTORS)
def test_inner_products_preserved(kind):
    """JL: ⟨Pᵀg, Pᵀh⟩ within ε‖g‖‖h‖ of ⟨g, h⟩, ε = 5/√k, for pairs of correlated vectors."""
    k, p = 1024, 4000
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(40, p, generator=gen)
    vectors = base + 0.7 * base.roll(1, 0)  # correlated neighbours: nonzero inner products
    projected = PROJECTORS[kind](k).project([vectors], seed=1).double()
    vectors = vectors.double()
    exact = vectors @ vectors.T
    norms = vectors.norm(dim=1)
    error = ((projected @ projected.T - exact) / torch.outer(norms, norms)).abs()
    assert error.max().item() < 5 / math.sqrt(k)
    # and the projection is not trivially exact: errors have the JL size, ~1/√k
    assert error.mean().item() > 0.1 / math.sqrt(k)


def test_identity():
    grads = blocks()
    out = IdentityProjector().project(grads, seed=0)
    torch.testing.assert_close(out, torch.cat([g.reshape(6, -1) for g in grads], 1))
    assert IdentityProjector().output_dim(sizes()) == sum(sizes())


def test_sparse_rows_have_exactly_nnz_entries():
    matrix = SparseJLProjector(64, nnz=4).matrix([100], seed=0)
    nonzero = (matrix != 0).sum(1)
    assert torch.all(nonzero == 4)
    torch.testing.assert_close(matrix.abs()[matrix != 0], torch.full((400,), 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_csr_product_equals_the_scatter_adds(monkeypatch, dtype):
    # Blocks up to CSR_MAX_COORDINATES go through one CSR product; larger ones through nnz
    # scatter-adds. Both are the same hashed map, and equal a map built from the hash tables.
    import datatrace.grads.projectors as projectors

    projector = SparseJLProjector(64, nnz=4)
    grads = [g.to(dtype) for g in blocks(batch=9)]
    got = projector.project(grads, seed=5)
    monkeypatch.setattr(projectors, "CSR_MAX_COORDINATES", 0)
    scattered = SparseJLProjector(64, nnz=4).project(grads, seed=5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, scattered, rtol=1e-6, atol=1e-6)
    want = torch.zeros(9, 64, dtype=torch.float64)
    for index, g in enumerate(grads):
        buckets, signs = projector._tables(5, index, g[0].numel())
        flat = g.reshape(9, -1).double()
        for j in range(4):
            for column in range(flat.shape[1]):
                want[:, buckets[j, column]] += flat[:, column] * float(signs[j, column])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of nnz"):
        SparseJLProjector(30, nnz=4)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fft", 16)
    with pytest.raises(ValueError, match="distribution"):
        DenseProjector(16, "uniform")


def test_seeds_are_stable():
    """derive_seed is part of every stored projection: its values must never change."""
    assert derive_seed(0, "checkpoint", 0) == derive_seed(0, "checkpoint", 0)
    assert len({derive_seed(s, "checkpoint", c) for s in range(5) for c in range(5)}) == 25
    # pinned: a change here silently changes every projection and invalidates stored features
    assert derive_seed(1, 2, 3) == 0x3A2DCC51502C3215


def test_a_dense_matrix_larger_than_its_cache_is_refused_before_any_work():
    import numpy as np
    from torch import nn

    import datatrace as dt

    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))  # 2,410 parameters
    small_cache = DenseProjector(64, max_cache_bytes=4 * 2410 * 64 - 1)
    with pytest.raises(ValueError, match=r"would be generated again for every batch.*factorized"):
        dt.TRAK(model, dt.Classification(), projector=small_cache).fit(
            (torch.randn(8, 64), torch.randint(0, 10, (8,)))
        )
    fits = DenseProjector(64, max_cache_bytes=4 * 2410 * 64)
    allowed = DenseProjector(64, max_cache_bytes=0, regenerate=True)
    data = (torch.randn(8, 64), torch.randint(0, 10, (8,)))
    scores = [
        dt.TRAK(model, dt.Classification(), projector=p, progress=False).fit(data).score(data)
        for p in (fits, allowed)
    ]
    np.testing.assert_allclose(scores[0].scores, scores[1].scores, rtol=1e-4, atol=1e-6)


def test_auto_projects_per_layer_at_every_size():
    from torch import nn

    import datatrace as dt
    from datatrace._estimator import gradient_features
    from datatrace.grads.factorized import FactorizedProjector

    big = nn.Sequential(nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 10))  # 1,011,010
    small = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))  # 940
    for model, pooled in ((big, False), (small, True)):
        chosen = gradient_features(dt.TRAK(model, dt.Classification(), proj_dim=64)).projector
        assert isinstance(chosen, FactorizedProjector) and chosen.variant == "sparse"  # FactGraSS
        inputs = model[0].in_features
        data = (torch.randn(16, inputs), torch.randint(0, 10, (16,)))
        trak = dt.TRAK(model, dt.Classification(), proj_dim=64, progress=False).fit(data)
        names = [name for name, _ in model.named_parameters()]
        plan = trak.features_.projector.plan(model, names)
        # the small model's blocks are small next to their share of k: their whole gradients
        # go through one sparse JL; the large model's first layer is masked
        assert plan.blocks[0].pooled is pooled


def test_auto_keeps_the_projection_of_an_existing_store(tmp_path):
    """A store featurized with sparse JL (the default of small models before) resumes and extends
    under projector="auto" with the same features; a new store, or another k, gets FactGraSS."""
    from torch import nn

    import datatrace as dt
    from datatrace.grads.factorized import FactorizedProjector
    from datatrace.grads.projectors import SparseJLProjector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    data = (torch.randn(64, 20), torch.randint(0, 5, (64,)))
    first = [{k: v.clone() for k, v in model.state_dict().items()}]
    second = [{k: v + 0.01 for k, v in first[0].items()}]

    def trak(**settings):
        return dt.TRAK(model, dt.Classification(), proj_dim=64, progress=False, **settings)

    trak(projector="sparse", store=tmp_path / "old").fit(data, first)
    resumed = trak(store=tmp_path / "old").fit(data, first + second)  # a checkpoint added
    assert isinstance(resumed.features_.projector, SparseJLProjector)
    reference = trak(projector="sparse").fit(data, first + second)
    np.testing.assert_allclose(
        resumed.score(data).scores, reference.score(data).scores, rtol=1e-6, atol=1e-9
    )
    fresh = trak(store=tmp_path / "new").fit(data, first)
    assert isinstance(fresh.features_.projector, FactorizedProjector)
    with pytest.raises(dt.StoreMismatchError, match="projector"):  # another k: not adopted
        dt.TRAK(model, dt.Classification(), proj_dim=32, progress=False,
                store=tmp_path / "old").fit(data, first)  # fmt: skip


class _Encoder(torch.nn.Module):
    """Embedding, a one-layer TransformerEncoder (its attention's weights are used functionally,
    so the safety check moves them) and an LSTM (not a hooked kind): every path of the default."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.embed = nn.Embedding(12, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.rnn = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        hidden, _ = self.rnn(self.encoder(self.embed(ids)))
        return self.head(hidden[:, -1])


def test_the_default_projection_is_exact_where_k_covers_every_parameter():
    """With k at least the parameter count, FactGraSS keeps every block and the fallback whole
    (hooks, moved blocks and vmap alike), so TRAK's scores are those of the exact gradients."""
    import warnings

    import datatrace as dt
    from datatrace.grads.factorized import FactorizationWarning

    torch.manual_seed(0)
    model = _Encoder().eval()  # float32: torch's LSTM has no float64 vmap (per-example) path
    p = sum(param.numel() for param in model.parameters())
    ids = torch.randint(0, 12, (24, 5))
    data = (ids, torch.randint(0, 3, (24,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FactorizationWarning)
        default = dt.TRAK(model, dt.Classification(), proj_dim=2 * p, progress=False).fit(data)
        exact = dt.TRAK(model, dt.Classification(), projector="identity", progress=False).fit(data)
    plan = default.features_.projector.plan(model, default.features_.param_names)
    assert {row["path"] for row in plan.layout()} >= {"factorized", "vmap"}
    got, want = default.score(data).scores, exact.score(data).scores
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
