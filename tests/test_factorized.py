"""Per-layer projections against (P_out ⊗ P_in), or the TensorSketch's hashed map built here, of
per-example gradients from a loop."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import datatrace as dt
from conftest import SmallCNN, make_mlp, train
from datatrace._estimator import projector_from_config
from datatrace.data import map_tensors
from datatrace.grads import factorized, projectors
from datatrace.grads.factorized import (
    FactorizationWarning,
    FactorizedProjector,
    factor_dims,
    split_dim,
)
from datatrace.grads.featurize import GradientFeatures
from datatrace.grads.projectors import (
    DENSE_GENERATION_ROWS,
    SPARSE_GENERATION_ROWS,
    derive_seed,
    make_projector,
)
from datatrace.store import Store, StoreMismatchError
from datatrace.tasks.base import Task, fuses_out_to_loss
from datatrace.tasks.classification import ClassLogit

SEED = 5
pytestmark = pytest.mark.usefixtures("one_thread")
VARIANTS = ["dense", "sparse", "sketch"]
KRONECKER_VARIANTS = ["dense", "sparse"]


class ModelOutput(Task):
    """The model returns ``(batch_size,)`` outputs itself."""

    def output(self, model, batch):
        return model(batch)

    def out_to_loss(self, model, batch):
        return torch.ones(len(model(batch)), dtype=torch.float64)


class Sequence(nn.Module):
    """Linear layers applied at every position of ``(n, positions, 9)`` inputs."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 12)
        self.second = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        hidden = torch.tanh(self.first(x).mul_(1.5))  # in place on the hooked output
        return (torch.sin(self.second(hidden)) * torch.arange(1.0, 4.0, dtype=x.dtype)).sum((1, 2))


class Convolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.line = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.image = nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)

    def forward(self, batch):
        line = torch.tanh(self.line(batch["line"])).pow(2).sum((1, 2))
        return line + torch.sin(self.image(batch["image"])).sum((1, 2, 3))


class TiedLanguageModel(nn.Module):
    """Embedding (padding_idx 0) tied to the head; the output masks padded positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 40, bias=False)
        self.head.weight = self.embed.weight

    masked = True

    def forward(self, batch):
        ids = batch["ids"]
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        picked = logits.log_softmax(-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        return (picked * (ids != 0)).sum(1) if self.masked else picked.sum(1)


class UnmaskedLanguageModel(TiedLanguageModel):
    """Padded positions reach the output: only padding_idx keeps their row's gradient out."""

    masked = False


class HFConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(8, 9)  # nf=8 outputs, nx=9 inputs: weight (9, 8)

    def forward(self, x):
        return torch.tanh(self.proj(x)).pow(2).sum((1, 2))


class Scale(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x):
        return x * self.scale


class WithFallback(nn.Module):
    """LayerNorm (hooked) and a custom module (vmap) are the fallback; ``middle`` is called
    twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 8)
        self.norm = nn.LayerNorm(8)
        self.custom = Scale(8)
        self.middle = nn.Linear(8, 8)
        self.last = nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.custom(self.norm(self.first(x)))
        hidden = torch.tanh(self.middle(torch.tanh(self.middle(hidden))))
        return torch.sin(self.last(hidden)).sum((1, 2))


class FunctionalUse(nn.Module):
    """``fc.weight`` is also used through a functional call, which no hook sees."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(9, 7)
        self.other = nn.Linear(9, 7)

    def forward(self, x):
        used_twice = self.fc(x) + nn.functional.linear(x.flip(-1), self.fc.weight)
        return torch.tanh(used_twice + self.other(x)).pow(2).sum((1, 2))


def make(model_class, n=5, positions=4, seed=0):
    torch.manual_seed(seed)
    model = model_class().double()
    gen = torch.Generator().manual_seed(seed + 1)
    if model_class is Convolutions:  # positions: the length of the 1-d input
        size = (5, 6) if positions < 20 else (9, 8)
        batch = {
            "line": torch.randn(n, 4, positions, generator=gen, dtype=torch.float64),
            "image": torch.randn(n, 3, *size, generator=gen, dtype=torch.float64),
        }
    elif issubclass(model_class, TiedLanguageModel):
        ids = torch.randint(1, 40, (n, positions), generator=gen)
        ids[:, -2:] = 0  # padded tail
        ids[0, 1] = 0
        batch = {"ids": ids, "targets": torch.randint(0, 40, (n, positions), generator=gen)}
    else:
        batch = torch.randn(n, positions, 9, generator=gen, dtype=torch.float64)
    return model, batch


def loop_gradients(model, task, batch, n):
    """Reference: one torch.autograd.grad per example, on the model itself."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(n):
        one = map_tensors(lambda tensor, i=i: tensor[i : i + 1], batch)
        grads = torch.autograd.grad(task.output(model, one).sum(), list(params.values()))
        rows.append(dict(zip(params, grads)))
    return {name: torch.stack([row[name] for row in rows]) for name in params}


def hashed_map(projector, block, seed):
    """The TensorSketch of a block as a ``(rows·cols, dim)`` matrix, entry by entry from its hash
    tables: in slice s (of width w), coordinate (i, j) goes to bucket (h_out(i) + h_in(j)) mod w
    with sign s_out(i)·s_in(j), all divided by √nnz."""
    like = torch.zeros((), dtype=torch.float64)
    rows, cols = projector.factor(block, 0, seed, like), projector.factor(block, 1, seed, like)
    width = block.dim // projector.nnz
    matrix = torch.zeros(block.rows * block.cols, block.dim, dtype=torch.float64)
    for s in range(projector.nnz):
        for i in range(block.rows):
            for j in range(block.cols):
                bucket = s * width + (int(rows.buckets[s, i]) + int(cols.buckets[s, j])) % width
                sign = int(rows.signs[s, i]) * int(cols.signs[s, j])
                matrix[i * block.cols + j, bucket] += sign / math.sqrt(projector.nnz)
    return matrix


def reference_features(projector, plan, grads, seed):
    """Each block's explicit (P_out ⊗ P_in) (then JL), or hashed map, applied to vec([G | b]);
    the fallback block's projector on the fallback gradients."""
    parts, pool = [], [grads[name] for name in plan.fallback_names]
    for block in plan.blocks:
        weight = grads[block.params[0]]
        matrix = weight.reshape(len(weight), weight.shape[1], -1)
        if block.bias_axis is not None:
            bias = grads[block.params[1]]
            matrix = torch.cat([matrix, bias.unsqueeze(1 + block.bias_axis)], 1 + block.bias_axis)
        if block.pooled:  # its whole gradient, into the fallback's sparse JL after the others
            pool.append(matrix.reshape(len(matrix), -1))
            continue
        explicit = hashed_map if block.sketch else type(projector).block_matrix
        parts.append(matrix.reshape(len(matrix), -1) @ explicit(projector, block, seed))
    if pool:
        fallback = plan.fallback_projector.project(pool, derive_seed(seed, "fallback"))
        parts.append(fallback.double())
    return torch.cat(parts, 1)


def featurize(projector, model, batch, names=None):
    names = names or [name for name, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FactorizationWarning)
        return projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)


@pytest.mark.parametrize("variant", KRONECKER_VARIANTS)
@pytest.mark.parametrize(
    "model_class, positions, paths",
    [
        (Sequence, 4, {"first.weight": "factorized", "second.weight": "factorized"}),
        # the cost rule materialises small layers used at many positions
        (Sequence, 40, {"first.weight": "factorized", "second.weight": "materialized"}),
        (Convolutions, 9, {"line.weight": "factorized", "image.weight": "factorized"}),
        (Convolutions, 81, {"line.weight": "materialized", "image.weight": "factorized"}),
        (TiedLanguageModel, 6, {"embed.weight": "factorized"}),
        (UnmaskedLanguageModel, 6, {"embed.weight": "factorized"}),
        (HFConv1D, 3, {"proj.weight": "factorized"}),
    ],
    ids=[
        "linear",
        "linear-materialized",
        "conv",
        "conv-materialized",
        "tied-embedding",
        "padding-idx",
        "hf-conv1d",
    ],
)
def test_features_equal_kronecker_map_of_loop_gradients(variant, model_class, positions, paths):
    if model_class is HFConv1D:
        pytest.importorskip("transformers")
    model, batch = make(model_class, positions=positions)
    projector = FactorizedProjector(24, variant=variant, split="params")
    got = featurize(projector, model, batch)
    plan = projector.plan(model, [name for name, _ in model.named_parameters()])
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    assert got.shape == (5, plan.output_dim)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    rows = {row["name"]: row for row in projector.layout()}
    assert not plan.fallback_names
    for name, path in paths.items():
        assert rows[name]["path"] == (path if variant == "dense" else "factorized"), rows[name]
        assert rows[name]["k"] < math.prod(rows[name]["shape"])  # projected, not copied


@pytest.mark.parametrize("through", ["factorized", "materialized"])
@pytest.mark.parametrize(
    "model_class, positions",
    [
        (Sequence, 4),
        (Convolutions, 9),
        (TiedLanguageModel, 6),
        (UnmaskedLanguageModel, 6),
        (HFConv1D, 3),
    ],
    ids=["linear", "conv", "tied-embedding", "padding-idx", "hf-conv1d"],
)
def test_sketch_features_equal_hashed_map_of_loop_gradients(
    monkeypatch, model_class, positions, through
):
    """From hooks (FFTs summed over positions) and from materialised gradients (index
    arithmetic), each forced on every layer: the hashed map, built here entry by entry, of loop
    gradients."""
    if model_class is HFConv1D:
        pytest.importorskip("transformers")
    if through == "factorized":
        monkeypatch.setattr(factorized, "MATERIALISE_BYTES", 0)
    else:
        monkeypatch.setattr(factorized, "FFT_COST", 1e9)
    model, batch = make(model_class, positions=positions)
    projector = FactorizedProjector(24, variant="sketch", split="params")
    got = featurize(projector, model, batch)
    plan = projector.plan(model, [name for name, _ in model.named_parameters()])
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert {row["path"] for row in projector.layout()} == {through}
    assert all(block.sketch and block.dim < block.size for block in plan.blocks)


def test_sketch_hashes_match_a_one_shot_generation():
    model = nn.Embedding(70_000, 3)  # the rows span two generation blocks
    projector = FactorizedProjector(1000, variant="sketch", nnz=2, split="params")
    (block,) = projector.plan(model, ["weight"]).blocks
    assert block.dim == 1000 and (block.k_rows, block.k_cols) == (500, 500)  # two of width 500
    rows = projector.factor(block, 0, SEED, torch.zeros(()))
    buckets, signs = [], []
    for b in range(2):
        generator = torch.Generator().manual_seed(derive_seed(SEED, "weight", "out", b))
        buckets.append(torch.randint(0, 500, (2, SPARSE_GENERATION_ROWS), generator=generator))
        signs.append(torch.randint(0, 2, (2, SPARSE_GENERATION_ROWS), generator=generator))
    torch.testing.assert_close(rows.buckets, torch.cat(buckets, 1)[:, :70_000])
    torch.testing.assert_close(rows.signs.long(), torch.cat(signs, 1)[:, :70_000] * 2 - 1)


def test_bias_is_an_input_coordinate_and_tied_weight_is_one_block():
    model, _ = make(TiedLanguageModel)
    plan = FactorizedProjector(64, split="params").plan(
        model, [name for name, _ in model.named_parameters()]
    )
    rows = {row["name"]: row for row in plan.layout()}
    assert set(rows) == {"embed.weight", "mix.weight"}  # the head is the embedding's block
    assert rows["embed.weight"]["kind"] == "embedding+linear"
    assert rows["mix.weight"]["params"] == ["mix.weight", "mix.bias"]
    assert rows["mix.weight"]["shape"] == (6, 7)


def test_padding_contributes_nothing():
    """Padded positions (masked by the task, padding_idx in the embedding) change no feature."""
    model, batch = make(TiedLanguageModel, positions=6)
    projector = FactorizedProjector(48, split="params")
    names = [name for name, _ in model.named_parameters()]
    before = featurize(projector, model, batch)
    changed = dict(batch, targets=batch["targets"].clone())
    changed["targets"][batch["ids"] == 0] = 7  # targets at padded positions are ignored
    torch.testing.assert_close(featurize(projector, model, changed, names), before)
    # positions 4 and 5 are padding everywhere: removing them changes nothing
    shorter = {key: value[:, :4] for key, value in batch.items()}
    torch.testing.assert_close(featurize(projector, model, shorter, names), before)


def test_fallback_for_layer_norm_and_custom_module():
    model, batch = make(WithFallback)
    projector = FactorizedProjector(40, split="params")
    names = [name for name, _ in model.named_parameters()]
    got = featurize(projector, model, batch)
    plan = projector.plan(model, names)
    assert plan.fallback_names == ["norm.weight", "norm.bias", "custom.scale"]
    rows = {row["name"]: row for row in plan.layout()}
    # the LayerNorm's affine gradients come from hooks, the custom module's from vmap
    assert rows["(other)"]["path"] == "hooks+vmap" and rows["first.weight"]["path"] == "factorized"
    assert rows["(other)"]["vmap_params"] == ["custom.scale"]
    assert rows["middle.weight"]["path"] == "factorized"  # two calls, one block
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    hooked = sum(block.dim for block in plan.blocks)
    torch.testing.assert_close(got[:, :hooked], want[:, :hooked], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[:, hooked:], want[:, hooked:], rtol=1e-5, atol=1e-6)


class Norms(nn.Module):
    """Every normalisation layer the hooks form affine gradients of, on sequences and images;
    the BatchNorm is called twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 8)
        self.layer_norm = nn.LayerNorm((4, 8))  # over positions and features
        self.rms_norm = nn.RMSNorm(8)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.batch_norm = nn.BatchNorm2d(4)
        self.group_norm = nn.GroupNorm(2, 4)
        self.flat_norm = nn.BatchNorm1d(8, affine=True)
        self.flat_norm.bias = None  # a weight without a bias
        for norm in (self.batch_norm, self.flat_norm):  # running statistics of a trained model
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        for norm in (self.layer_norm, self.rms_norm, self.batch_norm, self.group_norm):
            nn.init.uniform_(norm.weight, 0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                nn.init.uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x):
        sequence = torch.tanh(self.rms_norm(self.layer_norm(self.first(x))))  # (n, 4, 8)
        image = sequence.reshape(len(x), 2, 4, 4)
        image = self.batch_norm(torch.relu(self.batch_norm(self.conv(image))))
        image = torch.sin(self.group_norm(image)).flatten(2).mean(-1)  # (n, 4)
        flat = self.flat_norm(sequence.mean(1))  # (n, 8)
        return (image.sum(-1) * flat.sum(-1)).pow(2) + flat.pow(3).sum(-1)


def test_norm_layer_gradients_from_hooks_equal_loop_gradients():
    model, batch = make(Norms)
    model.eval()
    projector = FactorizedProjector(40, split="params", check_examples=0)
    names = [name for name, _ in model.named_parameters()]
    plan = projector.plan(model, names)
    norms = plan.hooked_norms()
    assert {kind for _, kind, _, _ in norms} == {
        "layer_norm", "rms_norm", "batch_norm", "group_norm"
    }  # fmt: skip
    assert plan.vmap_names() == []  # nothing left for vmap
    task = ModelOutput()
    _, bad, grads, _ = projector._hooked_features(
        plan, model, task, model.state_dict(), batch, SEED, [], norms
    )
    assert not bad
    want = loop_gradients(model, task, batch, 5)
    norm_names = [name for _, _, weight, bias in norms for name in (weight, bias) if name]
    assert sorted(grads) == sorted(norm_names) and "flat_norm.weight" in grads
    for name in norm_names:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-10, atol=1e-12)
    # and the whole features, fallback included, against the map of loop gradients
    with warnings.catch_warnings():
        warnings.simplefilter("error", FactorizationWarning)
        checked = FactorizedProjector(40, split="params")
        got = checked.features(model, task, names, model.state_dict(), batch, SEED)
    reference = reference_features(checked, checked.plan(model, names), want, SEED)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-9)
    assert {row["name"]: row["path"] for row in checked.layout()}["(other)"] == "hooks"


class InPlace(nn.Module):
    """In-place ReLUs change the outputs of a hooked Linear and a hooked LayerNorm."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 8)
        self.norm = nn.LayerNorm(8)
        self.last = nn.Linear(8, 3)

    def forward(self, x):
        hidden = nn.functional.relu(self.first(x), inplace=True) + 0.1
        hidden = nn.functional.relu(self.norm(hidden), inplace=True)
        return torch.sin(self.last(hidden)).sum((1, 2))


def test_outputs_changed_in_place_are_copied_and_features_stay_exact():
    model, batch = make(InPlace)
    projector = FactorizedProjector(40, split="params")
    names = [name for name, _ in model.named_parameters()]
    got = featurize(projector, model, batch)
    plan = projector.plan(model, names)
    assert plan.copied_outputs == {id(model.first), id(model.norm)}  # not model.last
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class KeptOutput(nn.Module):
    """A forward hook of the model's own keeps a Linear's output, which the parent then changes
    in place: a copy returned by datatrace's hook does not protect the tensor the hooks saw."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 8)
        self.last = nn.Linear(8, 3)
        self.first.register_forward_hook(
            lambda module, inputs, output: setattr(module, "kept", output)
        )

    def forward(self, x):
        hidden = self.first(x)
        self.first.kept.mul_(1.0)  # bumps the version of the hooked tensor itself
        return torch.sin(self.last(torch.tanh(hidden))).sum((1, 2))


def test_an_output_changed_even_when_copied_goes_to_vmap_instead_of_looping():
    model, batch = make(KeptOutput)
    projector = FactorizedProjector(40, split="params")
    names = [name for name, _ in model.named_parameters()]
    with pytest.warns(
        FactorizationWarning, match="first.weight .its output changes after the hook"
    ):
        got = projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    plan = projector.plan(model, names)
    assert "first.weight" in plan.moved and "last.weight" not in plan.moved
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class BatchStatistics(nn.Module):
    """A BatchNorm without running statistics: examples interact, it stays on vmap."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(9, 6)
        self.norm = nn.BatchNorm1d(6, track_running_stats=False)

    def forward(self, x):
        return torch.tanh(self.norm(self.first(x).mean(1))).sum(-1)


def test_norm_layers_that_mix_examples_stay_on_vmap():
    model, _ = make(BatchStatistics)
    plan = FactorizedProjector(40, split="params").plan(
        model, [name for name, _ in model.named_parameters()]
    )
    assert plan.norms == [] and plan.vmap_names() == ["norm.weight", "norm.bias"]


def test_out_to_loss_from_the_featurizing_forward_pass():
    """Q from the hooked forward pass equals the task's own, and is used only where the task
    defines both together."""
    model = make_mlp().double()
    inputs = torch.randn(6, 64, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(32, variant="sparse", split="params")
    task = dt.Classification()
    state = model.state_dict()
    features, weights = projector.features_and_out_to_loss(
        model, task, names, state, (inputs, labels), SEED
    )
    torch.testing.assert_close(weights, task.out_to_loss(model, (inputs, labels)))
    torch.testing.assert_close(
        features, projector.features(model, task, names, state, (inputs, labels), SEED)
    )
    # a subclass that redefines Q without the fused method: Q from its own out_to_loss
    _, weights = projector.features_and_out_to_loss(
        model, ClassLogit(), names, state, (inputs, labels), SEED
    )
    assert weights is None
    assert fuses_out_to_loss(task) and not fuses_out_to_loss(ClassLogit())
    assert not fuses_out_to_loss(ModelOutput())


def test_safety_check_moves_a_weight_also_used_functionally():
    model, batch = make(FunctionalUse)
    projector = FactorizedProjector(40, split="params")
    names = [name for name, _ in model.named_parameters()]
    with pytest.warns(FactorizationWarning, match=r"fc\.weight"):
        got = projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    rows = {row["name"]: row for row in projector.layout()}
    assert rows["fc.weight"]["path"] == "vmap"
    assert rows["other.weight"]["path"] == "factorized"
    plan = projector.plan(model, names)
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with warnings.catch_warnings():  # checked once per task: no second warning
        warnings.simplefilter("error", FactorizationWarning)
        projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)


class BatchCentred(Sequence):
    """Examples interact: the hidden layer is centred over the batch."""

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return torch.sin(self.second(hidden - hidden.mean(0)) + 0.3).sum((1, 2))


def test_safety_check_moves_layers_where_examples_interact():
    model, batch = make(BatchCentred)
    projector = FactorizedProjector(40, split="params")
    names = [name for name, _ in model.named_parameters()]
    with pytest.warns(FactorizationWarning, match="first.weight") as caught:
        projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    assert "second.weight" in str(caught[0].message)
    assert {row["path"] for row in projector.layout()} == {"vmap"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_expected_outer_product_is_identity(variant):
    model = nn.Linear(5, 4).double()  # one block [W | b], 4 × 6
    projector = FactorizedProjector(16, variant=variant, nnz=2, split="params")
    (block,) = projector.plan(model, ["weight", "bias"]).blocks
    assert block.dim < block.size
    seeds = range(400)
    mean = sum(projector.block_matrix(block, s) @ projector.block_matrix(block, s).T for s in seeds)
    mean = mean / len(seeds)
    torch.testing.assert_close(mean, torch.eye(block.size, dtype=torch.float64), atol=0.2, rtol=0)
    assert abs(torch.diagonal(mean).mean().item() - 1) < 0.03
    if variant == "sketch":  # every coordinate goes to one bucket of each slice, sign ±1/√nnz
        matrix = projector.block_matrix(block, SEED)
        torch.testing.assert_close(matrix, hashed_map(projector, block, SEED))
        torch.testing.assert_close(matrix.pow(2).sum(1), torch.ones(block.size).double())
        assert ((matrix != 0).sum(1) == 2).all()
    if variant == "sparse":  # masks: exactly k of the dim coordinates kept, scaled by √(dim/k)
        like = torch.zeros((), dtype=torch.float64)
        rows = projector.factor(block, 0, SEED, like).dense(like)
        assert torch.allclose(torch.diagonal(rows @ rows.T).sum(), torch.tensor(4.0).double())


def test_dense_factor_definition_matches_a_one_shot_generation():
    model = nn.Linear(300, 290, bias=False)
    projector = FactorizedProjector(1000, split="params")
    (block,) = projector.plan(model, ["weight"]).blocks
    like = torch.zeros(())
    got = projector.factor(block, 1, SEED, like).dense(like)
    generators = [
        torch.Generator().manual_seed(derive_seed(SEED, "weight", "in", b)) for b in range(2)
    ]
    rows = [torch.randn(DENSE_GENERATION_ROWS, block.k_cols, generator=g) for g in generators]
    want = torch.cat(rows)[:300] / math.sqrt(block.k_cols)
    torch.testing.assert_close(got, want)
    assert block.k_rows * block.k_cols == block.dim


def test_split_and_factor_rules():
    assert split_dim(100, [10, 1000, 3000]) == [10, 22, 68]  # floor min(p, 16), rest ∝ p
    assert split_dim(10_000, [10, 1000]) == [10, 1000]  # everything fits: no projection
    assert split_dim(20, [100, 100, 100]) == [16, 16, 16]  # floors exceed k
    assert factor_dims(64, 100, 400) == (8, 8)  # both sides √k
    assert factor_dims(64, 3, 400) == (3, 21)  # a small side is kept whole
    assert factor_dims(500, 10, 20) == (10, 20)


def test_make_projector_names_and_config():
    assert make_projector("factorized", 64).variant == "dense"
    assert make_projector("logra", 64).variant == "dense"
    assert make_projector("factgrass", 64).config()["variant"] == "sparse"
    assert make_projector("tensorsketch", 64).config()["variant"] == "sketch"
    with pytest.raises(TypeError, match="plan"):
        FactorizedProjector(8).output_dim([3])


def trak_scores(model, projector, proj_dim, train_set, targets):
    trak = dt.TRAK(
        model, dt.Classification(), projector=projector, proj_dim=proj_dim, damping=0.05,
        batch_size=64, progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", FactorizationWarning)
        return trak, trak.fit(train_set).score(targets).scores


# k below p = 1210 (MLP) and 698 (CNN): every block projected. Identity-projection TRAK as the
# reference; the sparse JL default reaches 0.91 and 0.94 on these.
@pytest.mark.parametrize(
    "make_model, proj_dim, bar", [(make_mlp, 1024, 0.85), (SmallCNN, 512, 0.8)], ids=["mlp", "cnn"]
)
@pytest.mark.parametrize("projector", ["factorized", "factgrass", "tensorsketch"])
def test_trak_factorized_correlates_with_identity(digits, make_model, proj_dim, bar, projector):
    X, y = digits
    model = train(make_model(), X[:200], y[:200], steps=30)
    data = (X[:200], y[:200]), (X[1000:1010], y[1000:1010])
    _, want = trak_scores(model, "identity", None, *data)
    trak, got = trak_scores(model, projector, proj_dim, *data)
    assert trak.feature_dim_ < sum(param.numel() for param in model.parameters())
    correlation = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert correlation > bar, correlation


def test_trak_factorized_at_k_above_p_is_identity_trak(digits):
    """Every block whole and the BatchNorm fallback unprojected: the same kernel as identity."""
    X, y = digits
    model = train(SmallCNN(), X[:200], y[:200], steps=30)
    data = (X[:200], y[:200]), (X[1000:1010], y[1000:1010])
    _, want = trak_scores(model, "identity", None, *data)
    trak, got = trak_scores(model, "factorized", 4096, *data)
    rows = {row["name"]: row["path"] for row in trak.features_.projector.layout()}
    assert rows == {
        "conv.weight": "materialized", "head.weight": "materialized", "(other)": "hooks"
    }  # fmt: skip
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-3)


def test_gradient_features_uses_plan_dimension(trained_mlps):
    models, X, y = trained_mlps
    features = GradientFeatures(models[0], dt.Classification(), FactorizedProjector(256))
    with pytest.raises(RuntimeError, match="not fitted"):
        features.dim  # the gradient split is measured first
    # in memory: featurize_all fits the split on its data
    got, q = features.featurize_all((X[:70], y[:70]), models[0].state_dict(), 0)
    assert features.dim == features.projector.plan(models[0], features.param_names).output_dim
    assert got.shape == (70, features.dim) and got.dtype == torch.float32 and q.shape == (70,)
    one, _ = features.featurize(models[0].state_dict(), (X[:7], y[:7]), 0)
    torch.testing.assert_close(one, got[:7])


@pytest.mark.parametrize("projector", ["factorized", "factgrass", "tensorsketch"])
def test_from_store_reopens_a_factorized_store(trained_mlps, tmp_path, projector):
    models, X, y = trained_mlps
    checkpoints = [model.state_dict() for model in models[:2]]
    settings = {"damping": 0.05, "progress": False}
    trak = dt.TRAK(
        models[0], dt.Classification(), projector=projector, proj_dim=256, batch_size=50,
        store=tmp_path / "store", **settings,
    )  # fmt: skip
    targets = (X[1000:1012], y[1000:1012])
    want = trak.fit((X[:150], y[:150]), checkpoints).score(targets).scores
    reopened = dt.TRAK.from_store(
        tmp_path / "store", make_mlp(seed=7), dt.Classification(), checkpoints, **settings
    )
    assert isinstance(reopened.features_.projector, FactorizedProjector)
    assert reopened.features_.projector.config() == trak.features_.projector.config()
    assert reopened.feature_dim_ == trak.feature_dim_
    np.testing.assert_array_equal(reopened.score(targets).scores, want)


def test_from_store_refuses_a_factorized_store_of_other_constants(monkeypatch):
    config = FactorizedProjector(256, variant="sketch", layer_dims={"a": 200, "b": 56}).config()
    assert projector_from_config(config).config() == config
    params = FactorizedProjector(256, variant="sketch", split="params").config()
    assert projector_from_config(params).config() == params
    # The maps of the sketch and of LoGra did not change with FactGraSS's mask rule: their
    # configs are what earlier versions wrote, so their stores still open.
    for variant in ("sketch", "dense"):
        written = FactorizedProjector(256, variant=variant, split="params").config()
        assert written["sparse_blowup"] == 4
        assert not set(factorized.mask_constants("sparse")) & set(written)
    for variant in factorized.MASK_VARIANTS:
        written = FactorizedProjector(256, variant=variant).config()
        assert factorized.mask_constants(variant).items() <= written.items()
    # FactGraSS's pool changed its map on small blocks: older FactGraSS stores are refused
    sparse = FactorizedProjector(256, variant="sparse", split="params").config()
    with pytest.raises(ValueError, match="pool"):
        projector_from_config({key: value for key, value in sparse.items() if key != "pool"})
    monkeypatch.setattr(factorized, "SPARSE_BLOWUP", factorized.SPARSE_BLOWUP + 1)
    with pytest.raises(ValueError, match="sparse_blowup"):
        projector_from_config(config)


class Heads(nn.Module):
    """A body and three heads of equal size: ``loud``'s output is scaled up (3× the gradient,
    9× the energy), ``dead``'s multiplied by 0 (no gradient at all)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(9, 30)
        self.loud = nn.Linear(30, 20, bias=False)
        self.quiet = nn.Linear(30, 20, bias=False)
        self.dead = nn.Linear(30, 20, bias=False)

    def forward(self, x):
        hidden = torch.tanh(self.body(x))
        heads = 3 * self.loud(hidden) + self.quiet(hidden) + 0 * self.dead(hidden)
        return torch.sin(heads).sum((1, 2))


def test_split_rule_follows_weights_with_floors_and_caps():
    # ∝ weights; a zero weight gets the floor; a block capped at its size gives the rest away
    assert split_dim(100, [1000, 1000, 1000], weights=[3.0, 1.0, 0.0]) == [63, 21, 16]
    assert split_dim(100, [40, 1000, 1000], weights=[100.0, 1.0, 1.0]) == [40, 30, 30]
    assert split_dim(100, [1000, 1000], weights=[0.0, 0.0]) == [50, 50]  # no energy: ∝ p_l


def test_gradient_split_follows_the_energies():
    """k_l ∝ E‖g_l‖² (loop gradients) within the pilot's estimation error; no gradient: the
    floor. The fitted split is part of the config."""
    model, batch = make(Heads, n=64, positions=3)
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(300, variant="sketch", nnz=2)
    with pytest.raises(RuntimeError, match="not fitted"):
        projector.plan(model, names)
    pieces = [batch[:40], batch[40:]]  # energies are summed over batches
    projector.fit_split(model, ModelOutput(), names, model.state_dict(), pieces, SEED)
    grads = loop_gradients(model, ModelOutput(), batch, 64)
    energy = {
        block: sum(grads[name].flatten(1).pow(2).sum(1).mean().item() for name in params)
        for block, params in {
            "body.weight": ["body.weight", "body.bias"],
            "loud.weight": ["loud.weight"],
            "quiet.weight": ["quiet.weight"],
        }.items()
    }
    got = projector.layer_dims_
    assert got["dead.weight"] == factorized.MIN_LAYER_DIM
    assert sum(got.values()) == pytest.approx(300, abs=3)
    total = sum(got[name] for name in energy)
    for name, value in energy.items():  # none of these is floored or capped here
        assert got[name] / total == pytest.approx(value / sum(energy.values()), rel=0.15), got
    assert got["loud.weight"] > 4 * got["quiet.weight"]
    assert projector.config()["layer_dims"] == got
    plan = projector.plan(model, names)
    assert {block.name: block.dim for block in plan.blocks} == {
        name: -(-k // 2) * 2 for name, k in got.items()
    }
    with pytest.raises(ValueError, match="already set"):
        projector.fit_split(model, ModelOutput(), names, model.state_dict(), pieces, SEED)
    again = FactorizedProjector(300, variant="sketch", nnz=2)
    again.fit_split(model, ModelOutput(), names, model.state_dict(), [batch], SEED)
    assert again.layer_dims_ == got  # deterministic


def store_trak(model, path, **settings):
    settings = {"projector": "factgrass", "proj_dim": 256, "damping": 0.05, **settings}
    return dt.TRAK(
        model, dt.Classification(), batch_size=20, chunk_size=30, store=path, progress=False,
        **settings,
    )  # fmt: skip


def test_gradient_split_is_recorded_and_adopted_on_resume(trained_mlps, tmp_path, monkeypatch):
    """Two of five chunks by a shard, then a full fit by a new estimator: it adopts the recorded
    split (no second pilot pass) and gives the scores of a one-shot fit; reopening gives them
    too; another proj_dim or variant is refused."""
    models, X, y = trained_mlps
    train_set, targets = (X[:150], y[:150]), (X[1000:1012], y[1000:1012])
    checkpoints = [model.state_dict() for model in models[:2]]
    want = store_trak(models[0], None).fit(train_set, checkpoints).score(targets).scores
    path = tmp_path / "store"
    part = store_trak(models[0], path).fit(train_set, checkpoints, shard=(0, 3))  # chunks 0, 3
    assert not hasattr(part, "n_train_")
    recorded = Store(path).provenance("features")["projector"]
    assert recorded["split"] == "gradient"
    assert recorded["layer_dims"] == part.features_.projector.layer_dims_
    assert Store(path).root["features/0/done"][:].tolist() == [True, False, False, True, False]

    def no_pilot(*args, **kwargs):
        raise AssertionError("the recorded split should have been adopted")

    monkeypatch.setattr(FactorizedProjector, "fit_split", no_pilot)
    resumed = store_trak(models[0], path).fit(train_set, checkpoints)
    assert resumed.features_.projector.config() == recorded
    np.testing.assert_array_equal(resumed.score(targets).scores, want)
    reopened = dt.TRAK.from_store(
        path, make_mlp(seed=7), dt.Classification(), checkpoints, damping=0.05
    )
    assert reopened.features_.projector.config() == recorded
    np.testing.assert_array_equal(reopened.score(targets).scores, want)
    insisting = dt.TRAK.from_store(
        path, make_mlp(seed=7), dt.Classification(), checkpoints, projector="factgrass",
        proj_dim=256, damping=0.05,
    )  # fmt: skip
    np.testing.assert_array_equal(insisting.score(targets).scores, want)
    monkeypatch.undo()
    for other in [
        {"projector": "factgrass", "proj_dim": 128},
        {"projector": "tensorsketch", "proj_dim": 256},
    ]:
        with pytest.raises(StoreMismatchError, match="projector"):
            store_trak(models[0], path, **other).fit(train_set, checkpoints)
        with pytest.raises(StoreMismatchError, match="projector"):
            dt.TRAK.from_store(path, make_mlp(seed=7), dt.Classification(), checkpoints, **other)


@pytest.mark.parametrize("projector", ["factgrass", "sparse"])
def test_bfloat16_forward_keeps_features_close_and_float32(trained_mlps, projector):
    """Under bf16 autocast the features are float32, within bf16's rounding of the float32
    ones, and the ranking of TRAK scores is nearly unchanged; the store records the precision."""
    models, X, y = trained_mlps
    model = models[0]
    train_set, targets = (X[:200], y[:200]), (X[1000:1010], y[1000:1010])

    def fit(**settings):
        trak = dt.TRAK(
            model, dt.Classification(), proj_dim=256, projector=projector, progress=False,
            **settings,
        )  # fmt: skip
        return trak.fit(train_set)

    full, half = fit(), fit(precision="bfloat16")
    features = [np.concatenate([c for _, _, c in t._stored[0].iter_chunks()]) for t in (full, half)]
    assert features[1].dtype == np.float32
    error = np.linalg.norm(features[1] - features[0]) / np.linalg.norm(features[0])
    assert 0 < error < 0.03, error  # bf16 keeps 8 bits: ~0.4% per value, more after layers
    np.testing.assert_allclose(half.out_to_loss_, full.out_to_loss_, rtol=0.05, atol=1e-3)
    scores = [t.score(targets).scores for t in (full, half)]
    rank = np.mean([spearmanr(a, b)[0] for a, b in zip(*scores)])
    assert rank > 0.98, rank
    assert half.store_.provenance("features")["precision"] == "bfloat16"
    assert "precision" not in full.store_.provenance("features")
    with pytest.raises(ValueError, match="precision"):
        dt.TRAK(model, dt.Classification(), precision="int8", progress=False).fit(train_set)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_class", [Sequence, Convolutions, TiedLanguageModel, Norms])
def test_features_on_cuda_equal_the_cpu_ones(variant, model_class):
    """The maps are generated on the CPU and moved: the same features on CUDA (float64)."""
    model, batch = make(model_class, positions=6 if model_class is TiedLanguageModel else 4)
    model.eval()
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(40, variant=variant, split="params")
    want = projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    cuda = model.to("cuda")
    on_cuda = map_tensors(lambda tensor: tensor.to("cuda"), batch)
    got = FactorizedProjector(40, variant=variant, split="params").features(
        cuda, ModelOutput(), names, cuda.state_dict(), on_cuda, SEED
    )
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_trak_on_cuda_scores_like_the_cpu(trained_mlps, precision):
    models, X, y = trained_mlps
    train_set, targets = (X[:200], y[:200]), (X[1000:1010], y[1000:1010])
    scores = []
    for device in ("cpu", "cuda"):
        trak = dt.TRAK(
            models[0], dt.Classification(), proj_dim=256, projector="factgrass",
            device=device, precision=precision, progress=False,
        )  # fmt: skip
        scores.append(trak.fit(train_set, [m.state_dict() for m in models]).score(targets).scores)
    scale = np.abs(scores[0]).max()
    np.testing.assert_allclose(scores[1], scores[0], atol=(3e-2 if precision else 1e-4) * scale)


class OneAndMany(nn.Module):
    """``head`` sees one position per example, ``body`` four."""

    def __init__(self, hidden=12, outputs=7):
        super().__init__()
        self.body = nn.Linear(9, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x):
        hidden = torch.tanh(self.body(x)).mean(1)  # (n, 12): one position
        return torch.sin(self.head(hidden)).sum(-1)


def test_hybrid_sketches_one_position_blocks_and_masks_the_others():
    model, batch = make(OneAndMany)
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(60, variant="hybrid", nnz=2)
    projector.fit_split(model, ModelOutput(), names, model.state_dict(), [batch], SEED)
    assert projector.layer_maps_ == {"body.weight": "masks", "head.weight": "sketch"}
    got = featurize(projector, model, batch)
    plan = projector.plan(model, names)
    kinds = {block.name: (block.sketch, block.sparse_jl) for block in plan.blocks}
    assert kinds == {"body.weight": (False, True), "head.weight": (True, False)}
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the recorded split rebuilds the same map, and a projector adopts it
    config = projector.config()
    rebuilt = projector_from_config(json_round_trip(config))
    torch.testing.assert_close(featurize(rebuilt, model, batch), got)
    fresh = FactorizedProjector(60, variant="hybrid", nnz=2)
    assert fresh.adopt_split(config) and fresh.layer_maps_ == projector.layer_maps_
    with pytest.raises(ValueError, match="hybrid"):
        FactorizedProjector(60, variant="hybrid", split="params")
    with pytest.raises(ValueError, match="layer_maps"):
        FactorizedProjector(60, variant="sparse", layer_dims=config["layer_dims"],
                            layer_maps=config["layer_maps"])  # fmt: skip


class SmallWideAndOne(nn.Module):
    """``body`` (40 × 10 with its bias) and ``wide`` (2000 × 41) at four positions, ``head``
    (30 × 2001) at one."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(9, 40)
        self.wide = nn.Linear(40, 2000)
        self.head = nn.Linear(2000, 30)

    def forward(self, x):
        hidden = torch.tanh(self.wide(torch.tanh(self.body(x)))).mean(1)  # one position
        return torch.sin(self.head(hidden)).sum(-1)


def test_factgrass_sizes_its_masks_by_the_positions_of_each_block():
    model, batch = make(SmallWideAndOne)
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(64, variant="sparse", nnz=2)
    projector.fit_split(model, ModelOutput(), names, model.state_dict(), [batch], SEED)
    assert projector.layer_maps_ == {
        "body.weight": "masks", "wide.weight": "masks", "head.weight": "one_position_masks"
    }  # fmt: skip
    plan = projector.plan(model, names)
    blocks = {block.name: block for block in plan.blocks}
    body, wide, head = blocks["body.weight"], blocks["wide.weight"], blocks["head.weight"]
    assert (body.size, wide.size, head.size) == (40 * 10, 2000 * 41, 30 * 2001)
    # body: MULTI_POSITION_BLOWUP·k_l products are at least WHOLE_BLOCK_FRACTION of it, so its
    # whole gradient joins the pool (the fallback's sparse JL, with its share of k); wide, at
    # four positions, keeps MULTI_POSITION_BLOWUP·k_l (below that fraction), and head, at one
    # position, ONE_POSITION_BLOWUP·k_l (below ONE_POSITION_WHOLE_FRACTION), each with its own
    # sparse JL. Products as factor_dims rounds them.
    whole = factorized.WHOLE_BLOCK_FRACTION
    body_share = projector.layer_dims_["body.weight"]
    assert factorized.MULTI_POSITION_BLOWUP * body_share >= whole * body.size
    assert body.pooled and (body.k_rows, body.k_cols, body.dim) == (40, 10, 0)
    assert not plan.fallback_names and plan.fallback_size == body.size
    # the pool gets what the other blocks leave of k, rounded up to nnz = 2
    left = 64 - projector.layer_dims_["wide.weight"] - projector.layer_dims_["head.weight"]
    assert plan.fallback_dim == -(-left // 2) * 2
    assert not wide.pooled and not head.pooled
    wide_kept = factorized.MULTI_POSITION_BLOWUP * wide.dim
    assert factorized.SPARSE_BLOWUP * wide.dim < wide_kept < whole * wide.size
    assert (wide.k_rows, wide.k_cols) == factor_dims(wide_kept, 2000, 41)
    head_kept = factorized.ONE_POSITION_BLOWUP * head.dim
    assert head_kept < factorized.ONE_POSITION_WHOLE_FRACTION * head.size
    assert (head.k_rows, head.k_cols) == factor_dims(head_kept, 30, 2001)
    assert body.sparse_jl and wide.sparse_jl and head.sparse_jl
    got = featurize(projector, model, batch)
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    config = projector.config()
    rebuilt = projector_from_config(json_round_trip(config))
    torch.testing.assert_close(featurize(rebuilt, model, batch), got)
    fresh = FactorizedProjector(64, variant="sparse", nnz=2)
    assert fresh.adopt_split(config) and fresh.layer_maps_ == projector.layer_maps_
    # a store written before these masks (no layer_maps, other constants) is not reopened as
    # if its map were this one
    constants = factorized.mask_constants("sparse")
    old = {key: value for key, value in config.items() if key not in constants}
    del old["layer_maps"]
    assert not FactorizedProjector(64, variant="sparse", nnz=2).adopt_split(old)
    with pytest.raises(ValueError, match="multi_position_blowup"):
        projector_from_config(old)
    with pytest.raises(ValueError, match="layer_maps"):
        FactorizedProjector(64, variant="sparse", layer_dims=config["layer_dims"],
                            layer_maps={"head.weight": "sketch"})  # fmt: skip


def json_round_trip(config):
    import json

    return json.loads(json.dumps(config))


class SharedPositions(nn.Module):
    """A position embedding called once with ids of batch size 1, broadcast onto the batch
    (GPT-2's ``wpe``); ``strict`` reshapes its output to ``(positions, dim)`` first, which an
    output expanded to the batch cannot take."""

    def __init__(self, strict=False):
        super().__init__()
        self.strict = strict
        self.embed = nn.Embedding(40, 6, padding_idx=0)
        self.positions = nn.Embedding(8, 6)
        self.mix = nn.Linear(6, 7)

    def forward(self, batch):
        ids = batch["ids"]
        shared = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, positions)
        positions = self.positions(shared)
        if self.strict:
            positions = positions.reshape(ids.shape[1], -1)
        hidden = torch.tanh(self.embed(ids) + positions)
        return torch.sin(self.mix(hidden)).sum((1, 2))


class StrictSharedPositions(SharedPositions):
    def __init__(self):
        super().__init__(strict=True)


def shared_positions(model_class):
    torch.manual_seed(0)
    ids = torch.randint(1, 40, (5, 6), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 0  # padded tail
    return model_class().double(), {"ids": ids}


def test_embedding_called_with_ids_shared_by_the_batch_is_expanded_to_it():
    model, batch = shared_positions(SharedPositions)
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(48, split="params")
    got = featurize(projector, model, batch)  # no FactorizationWarning
    plan = projector.plan(model, names)
    assert {row["name"]: row["path"] for row in plan.layout()}["positions.weight"] == "factorized"
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # a model that cannot take the expanded output: the call is left alone, and vmap serves it
    model, batch = shared_positions(StrictSharedPositions)
    projector = FactorizedProjector(48, split="params")
    with pytest.warns(FactorizationWarning, match="positions.weight"):
        got = projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    plan = projector.plan(model, names)
    assert plan.unexpanded == {id(model.positions)}
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class FoldedDraws(nn.Module):
    """Each example's ``m`` draws folded into the batch example-major (a diffusion task's
    ``(n·K, ...)`` calls): a conv with GroupNorm and a linear map see ``n·m`` rows; with
    ``draw_major`` the rows are laid out draw by draw instead, which the hooks cannot split."""

    draw_major = False

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):  # x: (n, m, 2, 5, 5)
        n, m = x.shape[:2]
        rows = x.transpose(0, 1) if self.draw_major else x
        hidden = torch.tanh(self.norm(self.conv(rows.reshape(n * m, 2, 5, 5))))
        out = torch.sin(self.head(hidden.flatten(1))).sum(-1)
        out = out.reshape(m, n).T if self.draw_major else out.reshape(n, m)
        return out.sum(1)


class DrawMajor(FoldedDraws):
    draw_major = True


@pytest.mark.parametrize("model_class", [FoldedDraws, DrawMajor])
def test_rows_folded_into_the_batch_are_positions_of_their_example(model_class):
    torch.manual_seed(0)
    model = model_class().double()
    batch = torch.randn(5, 3, 2, 5, 5, generator=torch.Generator().manual_seed(1)).double()
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(64, variant="sparse", split="params")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = projector.features(model, ModelOutput(), names, model.state_dict(), batch, SEED)
    plan = projector.plan(model, names)
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    moved = [w for w in caught if issubclass(w.category, FactorizationWarning)]
    paths = {row["name"]: row["path"] for row in plan.layout()}
    if model_class is FoldedDraws:  # example-major: every block and the norm from the hooks
        assert not moved and set(paths.values()) <= {"factorized", "hooks"}, paths
    else:  # the safety check sees the draw-major rows disagree and moves them to vmap
        assert moved and paths["conv.weight"] == "vmap" and paths["head.weight"] == "vmap"


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding="valid", dilation=(1, 2)),
        nn.Conv2d(2, 3, 3, padding=1),
    ],
    ids=["conv1d-no-bias", "conv2d-valid-dilated", "conv2d-bias"],
)
def test_whole_conv_gradient_equals_per_example_autograd(conv):
    """The grouped-convolution weight gradient of a whole conv block, rows folded two per
    example, against autograd per example (float64)."""
    torch.manual_seed(0)
    conv = conv.double()
    spatial = (9,) if isinstance(conv, nn.Conv1d) else (7, 8)
    x = torch.randn(3 * 2, conv.in_channels, *spatial, dtype=torch.float64)
    out = conv(x)
    g = torch.randn_like(out)
    call = factorized._Call(
        "w", "conv1d" if isinstance(conv, nn.Conv1d) else "conv2d", conv, x, out
    )
    got = factorized._whole_conv_gradient(call, g, 3, conv.bias is not None)
    want = []
    for i in range(3):
        rows = slice(2 * i, 2 * i + 2)
        params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        grads = torch.autograd.grad(conv(x[rows]), params, g[rows])
        weight = grads[0].reshape(conv.out_channels, -1)
        want.append(torch.cat([weight, grads[1][:, None]], 1) if len(grads) > 1 else weight)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-10)
    # laid out one example per column, for a sparse JL's CSR product: the same numbers
    columns = factorized._whole_conv_gradient(call, g, 3, conv.bias is not None, columns=True)
    assert columns.shape == (*got.shape[1:], 3) and columns.is_contiguous()
    torch.testing.assert_close(columns.permute(2, 0, 1), got, rtol=0, atol=0)
    # one row per example (no folding): the same function of the batch
    single = factorized._whole_conv_gradient(call, g, 6, conv.bias is not None)
    want = [
        torch.autograd.grad(conv(x[i : i + 1]), [conv.weight], g[i : i + 1])[0].flatten(1)
        for i in range(6)
    ]
    torch.testing.assert_close(single[..., : want[0].shape[1]], torch.stack(want), rtol=1e-10,
                               atol=1e-10)  # fmt: skip


class OnePositionLayers(nn.Module):
    """Linear layers on vectors (one position each): ``small`` (6 × 9, whole: pooled), ``twice``
    (6 × 6, pooled, called twice), ``wide`` (300 × 6, masked, its own sparse JL) and ``tied``
    (300 × 300) called twice."""

    def __init__(self):
        super().__init__()
        self.small = nn.Linear(9, 6)
        self.twice = nn.Linear(6, 6)
        self.wide = nn.Linear(6, 300)
        self.tied = nn.Linear(300, 300)

    def forward(self, x):
        hidden = torch.tanh(self.twice(torch.tanh(self.twice(torch.tanh(self.small(x[:, 0]))))))
        hidden = torch.tanh(self.wide(hidden))
        return torch.sin(self.tied(torch.tanh(self.tied(hidden)))).sum(-1)


def test_one_position_products_laid_out_by_columns_equal_the_kronecker_map():
    """On the CPU, FactGraSS forms a one-position call's outer products one example per
    column for the sparse JL (own, a slab of rows at a time, or, when pooled, the fallback's):
    the same features as the explicit map of loop gradients, for a pooled whole block with its
    bias, masked blocks and a block called twice."""
    model, batch = make(OnePositionLayers, positions=1)
    names = [name for name, _ in model.named_parameters()]
    projector = FactorizedProjector(96, variant="sparse", nnz=2)
    projector.fit_split(model, ModelOutput(), names, model.state_dict(), [batch], SEED)
    plan = projector.plan(model, names)
    blocks = {block.name: block for block in plan.blocks}
    assert blocks["small.weight"].pooled and blocks["twice.weight"].pooled
    # the pooled blocks' products through the fallback's sparse JL, several slabs of them
    assert isinstance(plan.fallback_projector, projectors.SparseJLProjector)
    assert 7 // blocks["small.weight"].cols < blocks["small.weight"].rows
    assert not blocks["wide.weight"].pooled and blocks["wide.weight"].sparse_jl
    assert not blocks["tied.weight"].pooled and blocks["tied.weight"].sparse_jl
    calls = []
    term = FactorizedProjector._term

    def recording(self, block, call, grad, n, seed):
        path, value = term(self, block, call, grad, n, seed)
        calls.append((block.name, path))
        return path, value

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FactorizedProjector, "_term", recording)
        # slabs of a few products: a masked block's JL is the sum of many slabs' CSR products
        patch.setattr(projectors, "SLAB_PRODUCTS", 7)
        got = featurize(projector, model, batch)
    # the pooled block's products go to the fallback's CSR product, the masked blocks' through
    # their own sparse JL a slab of rows at a time
    # (the block called twice sums its two calls' products before the fallback maps them)
    assert dict(calls) == {
        "small.weight": factorized.OUTER,
        "twice.weight": factorized.OUTER,
        "wide.weight": factorized.PROJECTED,
        "tied.weight": factorized.PROJECTED,
    }
    assert 7 // blocks["wide.weight"].k_cols < blocks["wide.weight"].k_rows  # several slabs
    # two calls of the tied block for one of each other block (in the safety check and after)
    names_called = [name for name, _ in calls]
    assert names_called.count("tied.weight") == 2 * names_called.count("small.weight") > 0
    assert names_called.count("twice.weight") == names_called.count("tied.weight")
    want = reference_features(projector, plan, loop_gradients(model, ModelOutput(), batch, 5), SEED)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
