"""Model families with a ground truth, for studying TRAK's defaults across them.

Each builder trains what its family needs (checkpoints on the whole training set and, for the
LDS, models on random halves kept in a subset experiment under ``out``, so a rerun trains
nothing) and returns a :class:`Family`: what TRAK is given (model, task, parameters, training
data, checkpoints, targets) and the ground truth its scores are judged by:

* ``"LDS"``: masks and outputs of models trained on random halves (mean Spearman over targets);
* ``"MRR"``: for each target, the training examples that are the right answer (mean reciprocal
  rank of the first one among the target's scores).

Families marked ``held_out`` were added to check a rule fitted on the others; each check broke
the rule of its time, and the final damping rule was fitted on all families (docs/trak.md tells
the order). The two shifted-target digits families were added after the per-target damping
factor, to check it (docs/defaults.md); the three regression families (``dt.Regression``)
after both, and nothing was changed after them; nor after the patch transformer on the digits
(``digits-transformer``, 2026-12-04).
Used by ``damping_study.py``; every builder runs on a CPU in minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from datatrace.evaluation.lds import lds
from datatrace.subsets import SubsetExperiment
from datatrace.tasks.base import Task


@dataclass
class Family:
    """One model family: what TRAK attributes and the truth its scores are judged by.

    Attributes:
        name: short name (``digits-mlp``).
        description: one line for tables.
        metric: ``"LDS"`` or ``"MRR"``.
        model: the module (checkpoints are swapped in).
        task: the TRAK task.
        params: parameter selection (``None``: all).
        train: training data.
        checkpoints: state dicts of models trained on all of ``train``.
        targets: target examples, in the order of the truth's columns.
        truth: ``{"masks", "outputs"}`` (LDS) or ``{"relevant": list of index arrays}`` (MRR).
        proj_dims: projection dimensions studied.
        held_out: added to check a rule fitted without it (see the module docstring).
    """

    name: str
    description: str
    metric: str
    model: nn.Module
    task: Task
    params: Any
    train: Any
    checkpoints: list[dict[str, torch.Tensor]]
    targets: Any
    truth: dict[str, Any]
    proj_dims: tuple[int, ...] = (512, 2048)
    held_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        curved = self.task.curvature(np.full(2, 0.5)) is not None
        if curved != (self.name in MARGIN_FAMILIES):
            raise AssertionError(
                f"{self.name}: its task {'has' if curved else 'has no'} curvature; "
                "update MARGIN_FAMILIES"
            )

    @property
    def n_train(self) -> int:
        from datatrace.data import Examples

        return Examples(self.train).n

    def evaluate(self, scores: np.ndarray) -> float:
        """The family's metric of ``(n_targets, n_train)`` scores."""
        return evaluate(self.metric, self.truth, scores)


def evaluate(metric: str, truth: dict[str, Any], scores: np.ndarray) -> float:
    if metric == "LDS":
        return lds(scores, truth["masks"], truth["outputs"], bootstrap=0).mean
    if metric == "MRR":
        return mean_reciprocal_rank(scores, truth["relevant"])
    raise ValueError(f"unknown metric {metric!r}")


def mean_reciprocal_rank(scores: np.ndarray, relevant: list[np.ndarray]) -> float:
    """Mean over targets of ``1 / rank`` of the best-ranked relevant training example; ties are
    broken against the relevant examples (a constant row earns ``1 / (n − r + 1)``)."""
    reciprocal = []
    for row, right in zip(scores, relevant):
        best = row[right].max()
        rank = (
            1
            + int((row > best).sum())
            + int((row[np.setdiff1d(np.arange(len(row)), right)] == best).sum())
        )
        reciprocal.append(1.0 / rank)
    return float(np.mean(reciprocal))


def subset_truth(
    out: Path,
    name: str,
    n_train: int,
    n_outputs: int,
    n_models: int,
    train: Callable[[np.ndarray, int], Any],
    evaluate_model: Callable[[Any], np.ndarray],
    description: dict[str, Any],
    seed: int = 1,
) -> dict[str, np.ndarray]:
    """Masks and outputs of ``n_models`` models trained on random halves (resumable in ``out``)."""
    experiment = SubsetExperiment(
        out / "truth.zarr",
        name,
        n_train=n_train,
        n_outputs=n_outputs,
        n_masks=n_models,
        alpha=0.5,
        seed=seed,
        description=description,
    )
    experiment.run(train, evaluate_model, rows=list(range(n_models)), progress=False)
    results = experiment.results()
    keep = results.rows < n_models
    return {"masks": results.masks[keep], "outputs": results.outputs[keep]}


# ---------------------------------------------------------------------------------------------
# Classifiers of the bundled digits


def digits_family(out: Path, model: str, n_models: int = 200, checkpoints: int = 5) -> Family:
    """A digits classifier (``datatrace.demo`` recipe, 30 epochs): LDS on the 297 test digits."""
    import datatrace as dt
    from datatrace.demo.subsets import DigitsSubsets, _split

    digits = DigitsSubsets(model=model, epochs=30, threads=torch.get_num_threads())
    truth = subset_truth(
        out,
        f"digits-{model}",
        digits.n_train,
        digits.n_outputs,
        n_models,
        digits.train,
        digits.evaluate,
        {**digits.description(), "threads": None},
    )
    train_split, test_split = _split(digits.split_seed)
    nets = [digits.train(np.arange(digits.n_train), seed) for seed in range(checkpoints)]
    names = {"mlp": "MLP", "cnn": "CNN", "cnn-bn": "CNN with batch norm", "resmlp": "residual MLP"}
    n_params = sum(p.numel() for p in nets[0].parameters())
    return Family(
        name=f"digits-{model}",
        description=f"digits {names.get(model, model)} ({n_params:,} parameters), LDS",
        metric="LDS",
        model=nets[0],
        task=dt.Classification(),
        params=None,
        train=train_split.as_tuple(),
        checkpoints=[net.state_dict() for net in nets],
        targets=test_split.as_tuple(),
        truth=truth,
        held_out=model in ("cnn-bn", "resmlp"),
    )


def shifted_digits(images: torch.Tensor, shift: str) -> torch.Tensor:
    """Test digits the classifiers never saw the like of: ``"rotated"`` by 90°, or ``"noisy"``
    (uniform pixel noise of half the intensity range added, clipped to [0, 1]; seeded)."""
    if shift == "rotated":
        return torch.rot90(images, 1, dims=(2, 3)).contiguous()
    if shift == "noisy":
        generator = torch.Generator().manual_seed(0)
        noise = torch.rand(images.shape, generator=generator) * 0.5
        return (images + noise).clamp_(0.0, 1.0)
    raise ValueError(f"unknown shift {shift!r}")


def shifted_digits_family(out: Path, shift: str, n_models: int = 200, checkpoints: int = 5):
    """The digits MLP with targets unlike its training images (:func:`shifted_digits`): LDS of
    their margins (under their own labels) on models trained on random halves."""
    import datatrace as dt
    from datatrace.demo.subsets import DigitsSubsets, _split
    from datatrace.tasks import classification_margin

    digits = DigitsSubsets(model="mlp", epochs=30, threads=torch.get_num_threads())
    train_split, test_split = _split(digits.split_seed)
    images = shifted_digits(test_split.images, shift)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> np.ndarray:
        return classification_margin(model.eval()(images), test_split.labels).numpy()

    truth = subset_truth(
        out,
        f"digits-mlp-{shift}",
        digits.n_train,
        len(images),
        n_models,
        digits.train,
        evaluate,
        {**digits.description(), "threads": None, "targets": shift},
    )
    nets = [digits.train(np.arange(digits.n_train), seed) for seed in range(checkpoints)]
    return Family(
        name=f"digits-mlp-{shift}",
        description=f"digits MLP, {shift} test digits as targets, LDS",
        metric="LDS",
        model=nets[0],
        task=dt.Classification(),
        params=None,
        train=train_split.as_tuple(),
        checkpoints=[net.state_dict() for net in nets],
        targets=(images, test_split.labels),
        truth=truth,
        held_out=True,
    )


# ---------------------------------------------------------------------------------------------
# Fact tracing in tiny language models


def facts_family(
    out: Path,
    kind: str,
    entities: int = 60,
    width: int = 64,
    layers: int = 2,
    epochs: int | None = None,
    checkpoints: int = 3,
    novel: bool = False,
    name: str | None = None,
    held_out: bool = False,
) -> Family:
    """GPT-2 or T5 trained on generated facts (``benchmarks/fact_tracing.py``): MRR of the
    training sentences that state each held-out query's fact."""
    from datatrace.demo.facts import fact_examples, make_facts, train_fact_model
    from datatrace.tasks import CausalLM, Seq2SeqLM

    corpus = make_facts(entities, 0)
    epochs = epochs or (80 if kind == "gpt2" else 60)
    nets = [
        train_fact_model(corpus, kind, seed, epochs, width, layers) for seed in range(checkpoints)
    ]
    queries = corpus.novel_queries if novel else corpus.queries
    n_params = sum(p.numel() for p in nets[0].parameters())
    return Family(
        name=name or f"facts-{kind}",
        description=(
            f"{'GPT-2' if kind == 'gpt2' else 'T5'} fact tracing ({n_params:,} parameters, "
            f"{len(corpus.train)} sentences), MRR"
        ),
        metric="MRR",
        model=nets[0],
        task=CausalLM() if kind == "gpt2" else Seq2SeqLM(),
        params=None,
        train=fact_examples(corpus, corpus.train, kind, whole=kind == "gpt2"),
        checkpoints=[net.state_dict() for net in nets],
        targets=fact_examples(corpus, queries, kind, whole=False),
        truth={"relevant": [np.asarray(corpus.relevant(q)) for q in queries]},
        proj_dims=(512, 2048),
        held_out=held_out,
    )


# ---------------------------------------------------------------------------------------------
# Text classifier: the pretrained MiniLM encoder with a head trained on subsets


def text_family(out: Path, n_models: int = 100, checkpoints: int = 3, epochs: int = 150) -> Family:
    """``benchmarks/lds_text.py``: MiniLM's pooler and classifier trained on docstrings; LDS."""
    from datatrace.demo.text import (
        encoder_states,
        head_logits,
        minilm_classifier,
        text_corpus,
        tokenize,
        train_head,
    )
    from datatrace.tasks import TextClassification, classification_margin

    n_test = 60
    corpus = text_corpus("docstrings", per_class=60, seed=0)
    order = np.random.default_rng(0).permutation(len(corpus.texts))
    train_texts, test_texts = corpus.subset(order[n_test:]), corpus.subset(order[:n_test])
    model, tokenizer = minilm_classifier(len(corpus.class_names), seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = tokenize(tokenizer, train_texts), tokenize(tokenizer, test_texts)
    train_states, test_states = encoder_states(model, train), encoder_states(model, test)
    n_train = len(train_texts.texts)

    def fit_head(indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        model.load_state_dict(initial)
        rows = torch.as_tensor(indices)
        train_head(model, train_states[rows], train["labels"][rows], epochs, seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def test_margins(state: dict[str, torch.Tensor]) -> np.ndarray:
        model.load_state_dict(state)
        return classification_margin(head_logits(model, test_states), test["labels"]).numpy()

    truth = subset_truth(
        out,
        "text",
        n_train,
        n_test,
        n_models,
        fit_head,
        test_margins,
        {"task": "minilm-docstrings", "epochs": epochs},
    )
    states = [fit_head(np.arange(n_train), seed=100 + c) for c in range(checkpoints)]
    return Family(
        name="text-minilm",
        description=f"MiniLM text classifier (head, {n_train} docstrings), LDS",
        metric="LDS",
        model=model,
        task=TextClassification(),
        params=["bert.pooler.*", "classifier.*"],
        train=train,
        checkpoints=states,
        targets=test,
        truth=truth,
        proj_dims=(128, 2048),
    )


# ---------------------------------------------------------------------------------------------
# Diffusion


def _scheduler(timesteps: int):
    from datatrace.applications.diffusion.training import require_diffusers

    return require_diffusers().DDPMScheduler(num_train_timesteps=timesteps)


def ddpm_memorised_family(
    out: Path,
    output: str,
    n_unique: int = 260,
    n_memorised: int = 4,
    copies: int = 10,
    train_steps: int = 3000,
    samples: int = 256,
    step: int = 90,
    checkpoints: int = 1,
) -> Family:
    """A DDPM (100 noise levels) on ``n_unique`` digits plus ``n_memorised`` digits repeated
    ``copies`` times each; the samples that reproduce a repeated digit are the targets at
    sampling step ``step``, and every copy of that digit is a right answer (MRR)."""
    from datatrace.applications.diffusion import (
        DiffusionTargets,
        DiffusionTrainingExamples,
        sample_with_trajectory,
    )
    from datatrace.applications.diffusion.training import digits_images, tiny_unet, train_denoiser
    from datatrace.tasks import Diffusion

    images, _ = digits_images(8)
    order = np.random.default_rng(0).permutation(len(images))
    unique = images[order[:n_unique]]
    memorised = images[order[n_unique : n_unique + n_memorised]]
    train_images = torch.cat([unique, memorised.repeat_interleave(copies, 0)])
    copy_of = np.concatenate([np.full(n_unique, -1), np.repeat(np.arange(n_memorised), copies)])
    scheduler = _scheduler(100)
    cache = out / "ddpm-memorised.pt"
    if cache.exists():
        states = torch.load(cache)
    else:
        states = []
        for seed in range(checkpoints):
            net = tiny_unet(block_out_channels=(16, 32), seed=seed)
            states.append(
                train_denoiser(
                    net, scheduler, train_images, steps=train_steps, lr=5e-3, seed=seed
                ).state_dict()
            )
        out.mkdir(parents=True, exist_ok=True)
        torch.save(states, cache)
    net = tiny_unet(block_out_channels=(16, 32))
    net.load_state_dict(states[0])
    trajectory = sample_with_trajectory(
        net, scheduler, samples, seed=1, num_inference_steps=100, progress=False
    )
    distances = ((trajectory.samples[:, None] - memorised[None]) ** 2).flatten(2).mean(2)
    close = (distances.min(1).values < 0.02).nonzero().flatten().numpy()
    nearest = distances.argmin(1).numpy()
    targets = DiffusionTargets.from_trajectory(trajectory, step, n_draws=10, seed=0)
    targets = torch.utils.data.Subset(targets, close.tolist())
    relevant = [np.flatnonzero(copy_of == nearest[j]) for j in close]
    return Family(
        name=f"ddpm-memorised-{output}",
        description=(
            f"DDPM memorisation ({output}, t = {step} of 100; {len(close)} of {samples} samples "
            f"reproduce a repeated digit), MRR"
        ),
        metric="MRR",
        model=net,
        task=Diffusion(scheduler, output),
        params=None,
        train=DiffusionTrainingExamples(train_images, scheduler, n_timesteps=10, seed=0),
        checkpoints=states,
        targets=targets,
        truth={"relevant": relevant},
        proj_dims=(512, 2048),
    )


def ddpm_lds_family(out: Path, output: str, n_models: int = 40, checkpoints: int = 3) -> Family:
    """``benchmarks/lds_diffusion.py``'s set-up: 100 digits, 40 DDPMs on random halves, the
    negated denoising loss of x̂_0(t) at 7 steps of 16 samples; LDS."""
    import lds_diffusion as bench
    from datatrace.applications.diffusion import (
        DiffusionTargets,
        DiffusionTrainingExamples,
        sample_with_trajectory,
    )
    from datatrace.tasks import Diffusion

    recipe = bench.Recipe(
        n_train=100,
        train_steps=400,
        batch_size=64,
        lr=5e-3,
        train_timesteps=1000,
        same_seed=True,
        data_seed=0,
    )
    scheduler = bench.scheduler_for(recipe)
    full = [bench.train_full(recipe, seed) for seed in range(checkpoints)]
    trajectory = sample_with_trajectory(
        full[0], scheduler, 16, seed=1, num_inference_steps=bench.INFERENCE_STEPS, progress=False
    )
    truth = subset_truth(
        out,
        "ddpm-lds",
        recipe.n_train,
        len(bench.STEPS) * 16,
        n_models,
        functools.partial(bench.train_model, recipe),
        functools.partial(bench.evaluate_model, recipe, trajectory, 10),
        {"recipe": str(recipe)},
        seed=0,
    )
    targets = torch.utils.data.ConcatDataset(
        [
            DiffusionTargets.from_trajectory(trajectory, step, n_draws=10, seed=0)
            for step in bench.STEPS
        ]
    )
    return Family(
        name=f"ddpm-lds-{output}",
        description=f"DDPM on 100 digits ({output}), LDS over 7 sampling steps",
        metric="LDS",
        model=full[0],
        task=Diffusion(scheduler, output),
        params=None,
        train=DiffusionTrainingExamples(
            bench.training_data(recipe), scheduler, n_timesteps=10, seed=0
        ),
        checkpoints=[net.state_dict() for net in full],
        targets=targets,
        truth=truth,
        proj_dims=(512, 2048),
    )


# ---------------------------------------------------------------------------------------------
# Classifier recipes: the training and evaluation they share


class AdamClassifierRecipe:
    """``train`` and ``evaluate`` of a recipe whose ``data()`` gives ``(x, y, x_test, y_test)``
    tensors and ``network(seed)`` a fresh classifier: Adam (lr 3e-3, batch 64, weight decay 1e-4)
    for ``self.epochs``, the network initialised from ``seed``; test margins."""

    def train(self, indices: np.ndarray, seed: int) -> nn.Module:
        from datatrace.demo.data import Split
        from datatrace.demo.training import train_classifier

        x, y, _, _ = self.data()
        rows = torch.as_tensor(indices)
        torch.manual_seed(seed)
        return train_classifier(
            self.network(seed),
            Split(x[rows], y[rows]),
            epochs=self.epochs,
            lr=3e-3,
            batch_size=64,
            weight_decay=1e-4,
            seed=seed,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        from datatrace.tasks import classification_margin

        _, _, x, y = self.data()
        return classification_margin(model.eval()(x), y).numpy()


# ---------------------------------------------------------------------------------------------
# A 1-D CNN on generated sequences (a held-out family)


@dataclass(frozen=True)
class MotifSequences(AdamClassifierRecipe):
    """Sequences of 4 channels × 48 positions: Gaussian noise with one of 5 class motifs (6
    positions long) planted at a random position and amplitude; 5% of labels flipped. Trains
    a two-layer 1-D CNN with Adam; deterministic in every seed."""

    n_train: int = 2000
    n_test: int = 200
    epochs: int = 15
    seed: int = 0

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        n = self.n_train + self.n_test
        motifs = torch.randn((5, 4, 6), generator=generator)
        labels = torch.randint(0, 5, (n,), generator=generator)
        sequences = torch.randn((n, 4, 48), generator=generator)
        starts = torch.randint(0, 48 - 6, (n,), generator=generator)
        amplitude = 0.6 + 0.8 * torch.rand((n,), generator=generator)
        for i in range(n):
            sequences[i, :, starts[i] : starts[i] + 6] += amplitude[i] * motifs[labels[i]]
        flip = torch.rand((n,), generator=generator) < 0.05
        labels[flip] = torch.randint(0, 5, (int(flip.sum()),), generator=generator)
        return (
            sequences[: self.n_train],
            labels[: self.n_train],
            sequences[self.n_train :],
            labels[self.n_train :],
        )

    @staticmethod
    def model(seed: int, outputs: int = 5) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv1d(4, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveMaxPool1d(1),
            nn.Flatten(),
            nn.Linear(32, outputs),
        )

    def network(self, seed: int) -> nn.Module:
        return self.model(seed)


def generated_family(
    out: Path, recipe: Any, name: str, what: str, n_models: int = 200, checkpoints: int = 5
) -> Family:
    """A family on generated data: ``recipe`` has ``data()``, ``train``, ``evaluate``,
    ``n_train`` and ``n_test``, and optionally ``task()`` (default ``Classification()``); LDS on
    its test rows."""
    import datatrace as dt

    truth = subset_truth(
        out, name, recipe.n_train, recipe.n_test, n_models, recipe.train, recipe.evaluate,
        {"recipe": str(recipe)},
    )  # fmt: skip
    task = recipe.task() if hasattr(recipe, "task") else dt.Classification()
    nets = [recipe.train(np.arange(recipe.n_train), seed) for seed in range(checkpoints)]
    x, y, x_test, y_test = recipe.data()
    n_params = sum(p.numel() for p in nets[0].parameters())
    return Family(
        name=name,
        description=f"{what} ({n_params:,} parameters), LDS",
        metric="LDS",
        model=nets[0],
        task=task,
        params=None,
        train=(x, y),
        checkpoints=[net.state_dict() for net in nets],
        targets=(x_test, y_test),
        truth=truth,
        held_out=True,
    )


# ---------------------------------------------------------------------------------------------
# A residual MLP on generated tabular data (a held-out family)


class TabularResidualMLP(nn.Module):
    """``20 → 64``, three pre-norm residual blocks, layer norm, ``→ 4``."""

    def __init__(self, features: int = 20, width: int = 64, depth: int = 3, classes: int = 4):
        super().__init__()
        from datatrace.demo.models import ResidualBlock

        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(x)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


@dataclass(frozen=True)
class TabularClasses(AdamClassifierRecipe):
    """scikit-learn's ``make_classification`` (20 features, 8 informative, 4 classes, 2% of
    labels flipped), standardised; a residual MLP trained with Adam; deterministic."""

    n_train: int = 2000
    n_test: int = 200
    epochs: int = 30

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=self.n_train + self.n_test,
            n_features=20,
            n_informative=8,
            n_redundant=4,
            n_classes=4,
            flip_y=0.02,
            class_sep=1.0,
            random_state=0,
        )
        x = (x - x[: self.n_train].mean(0)) / x[: self.n_train].std(0)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        return x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :]

    def network(self, seed: int) -> nn.Module:
        return TabularResidualMLP()


# ---------------------------------------------------------------------------------------------
# MLP regressors (held-out families: built after the rule was fixed)


def regression_mlp(features: int = 10, width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 1),
    )  # fmt: skip


@dataclass(frozen=True)
class RegressionRecipe:
    """A regression problem, inputs and targets standardised, and an MLP ``d → 64 → 64 → 1``
    (tanh) trained on the squared error with Adam; deterministic. Attributed with
    :class:`datatrace.Regression` (the prediction, ``Q`` the residual); the truth is the test
    predictions of models trained on random halves. ``dataset``:

    - ``"friedman1"``: scikit-learn's ``make_friedman1`` (10 features, 5 of them used:
      ``10 sin(π x₁x₂) + 20 (x₃ − ½)² + 10 x₄ + 5 x₅``, noise 1), 2,000 + 200 rows;
    - ``"diabetes"``: scikit-learn's bundled diabetes data (10 features, disease progression
      after a year), 350 + 92 rows, in the file's order.
    """

    dataset: str = "friedman1"
    epochs: int = 30

    @property
    def n_train(self) -> int:
        return 2000 if self.dataset == "friedman1" else 350

    @property
    def n_test(self) -> int:
        return 200 if self.dataset == "friedman1" else 92

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from sklearn import datasets

        if self.dataset == "friedman1":
            x, y = datasets.make_friedman1(
                n_samples=self.n_train + self.n_test, noise=1.0, random_state=0
            )
        else:
            x, y = datasets.load_diabetes(return_X_y=True)
        x = (x - x[: self.n_train].mean(0)) / x[: self.n_train].std(0)
        y = (y - y[: self.n_train].mean()) / y[: self.n_train].std()
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        return x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :]

    def task(self) -> Task:
        import datatrace as dt

        return dt.Regression()

    def train(self, indices: np.ndarray, seed: int) -> nn.Module:
        x, y, _, _ = self.data()
        rows = torch.as_tensor(indices)
        x, y = x[rows], y[rows]
        torch.manual_seed(seed)
        model = self.model(seed) if hasattr(self, "model") else regression_mlp(x.shape[1])
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        order = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            for batch in torch.randperm(len(x), generator=order).split(64):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[batch]).squeeze(1), y[batch])
                loss.backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        _, _, x, _ = self.data()
        return model.eval()(x).squeeze(1).numpy()


@dataclass(frozen=True)
class MotifAmplitude(RegressionRecipe):
    """Sequences of 4 channels × 48 positions of Gaussian noise with one motif (6 positions long)
    planted at a random position with an amplitude uniform in ``[0, 2]``; the target is the
    amplitude plus noise of 0.1, standardised. A two-layer 1-D CNN (``MotifSequences``' with one
    output) trained on the squared error with Adam; deterministic."""

    dataset: str = "motif-amplitude"
    epochs: int = 15

    @property
    def n_train(self) -> int:
        return 2000

    @property
    def n_test(self) -> int:
        return 200

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        n = self.n_train + self.n_test
        motif = torch.randn((4, 6), generator=generator)
        sequences = torch.randn((n, 4, 48), generator=generator)
        starts = torch.randint(0, 48 - 6, (n,), generator=generator)
        amplitude = 2 * torch.rand((n,), generator=generator)
        for i in range(n):
            sequences[i, :, starts[i] : starts[i] + 6] += amplitude[i] * motif
        y = amplitude + 0.1 * torch.randn((n,), generator=generator)
        y = (y - y[: self.n_train].mean()) / y[: self.n_train].std()
        return (
            sequences[: self.n_train],
            y[: self.n_train],
            sequences[self.n_train :],
            y[self.n_train :],
        )

    @staticmethod
    def model(seed: int) -> nn.Module:
        return MotifSequences.model(seed, outputs=1)


# ---------------------------------------------------------------------------------------------
# A binary classifier with one logit and a recurrent network (held out: built after the rule,
# its per-target factor and the regression families, nothing changed after them)


@dataclass(frozen=True)
class BinaryCancer:
    """scikit-learn's bundled breast-cancer data (30 features, malignant or benign), standardised,
    450 + 119 rows in a fixed shuffled order; an MLP ``30 → 64 → 64 → 1`` (ReLU) with one logit,
    trained on the binary cross-entropy with Adam; deterministic. Attributed with
    :class:`datatrace.Classification` on the single logit (margin ``±z``)."""

    n_train: int = 450
    n_test: int = 119
    epochs: int = 40

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_breast_cancer

        x, y = load_breast_cancer(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
        x = (x - x[: self.n_train].mean(0)) / x[: self.n_train].std(0)
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        return x[: self.n_train], y[: self.n_train], x[self.n_train :], y[self.n_train :]

    @staticmethod
    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )  # fmt: skip

    def train(self, indices: np.ndarray, seed: int) -> nn.Module:
        x, y, _, _ = self.data()
        rows = torch.as_tensor(indices)
        x, y = x[rows], y[rows].float()
        model = self.model(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        order = torch.Generator().manual_seed(seed)
        for _ in range(self.epochs):
            for batch in torch.randperm(len(x), generator=order).split(32):
                optimizer.zero_grad()
                logits = model(x[batch]).squeeze(1)
                F.binary_cross_entropy_with_logits(logits, y[batch]).backward()
                optimizer.step()
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        from datatrace.tasks import classification_margin

        _, _, x, y = self.data()
        return classification_margin(model.eval()(x), y).numpy()


class GRUClassifier(nn.Module):
    """A one-layer GRU over the positions of ``(batch, channels, length)`` sequences, its last
    hidden state into a linear head."""

    def __init__(self, channels: int = 4, hidden: int = 32, classes: int = 5):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(sequences.transpose(1, 2))
        return self.head(last[0])


@dataclass(frozen=True)
class MotifSequencesGRU(MotifSequences):
    """:class:`MotifSequences`' data (1,000 + 200 sequences, 24 positions) classified by a GRU
    (:class:`GRUClassifier`), trained with Adam at 1e-2; deterministic."""

    n_train: int = 1000
    n_test: int = 200
    epochs: int = 40
    length: int = 24

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, x_test, y_test = MotifSequences(
            n_train=self.n_train, n_test=self.n_test, seed=self.seed
        ).data()
        # The motif sits anywhere in 48 positions; keep the 24 around it.
        both = torch.cat([x, x_test])
        energy = both.pow(2).sum(1).unfold(1, 6, 1).sum(2)  # (n, 43) windows
        start = (energy.argmax(1) - (self.length - 6) // 2).clamp(0, 48 - self.length)
        index = start[:, None] + torch.arange(self.length)
        cropped = torch.gather(both, 2, index[:, None, :].expand(-1, both.shape[1], -1))
        return cropped[: self.n_train], y, cropped[self.n_train :], y_test

    @staticmethod
    def model(seed: int, outputs: int = 5) -> nn.Module:
        torch.manual_seed(seed)
        return GRUClassifier(classes=outputs)

    def train(self, indices: np.ndarray, seed: int) -> nn.Module:
        from datatrace.demo.data import Split
        from datatrace.demo.training import train_classifier

        x, y, _, _ = self.data()
        rows = torch.as_tensor(indices)
        return train_classifier(
            self.model(seed), Split(x[rows], y[rows]), epochs=self.epochs, lr=1e-2,
            batch_size=64, weight_decay=1e-4, seed=seed,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A patch transformer on the digits (a held-out family: attention, layer norm, GELU)


class DigitsPatchTransformer(nn.Module):
    """The 8×8 digit as 16 patches of 2×2 pixels, embedded to 32 with a learnt position, two
    pre-norm encoder layers (4 heads, feed-forward 64, GELU, no dropout), mean-pooled, layer
    norm, ``→ 10``."""

    def __init__(self, width: int = 32, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.position = nn.Parameter(torch.zeros(16, width))
        layer = nn.TransformerEncoderLayer(
            width, 4, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        hidden = self.encoder(self.embed(patches) + self.position)
        return self.head(self.norm(hidden.mean(1)))


@dataclass(frozen=True)
class DigitsTransformer(AdamClassifierRecipe):
    """The digits split of ``datatrace.demo`` (1,500 training, 297 test images) and a
    :class:`DigitsPatchTransformer` trained with Adam; deterministic in every seed."""

    n_train: int = 1500
    n_test: int = 297
    epochs: int = 30

    def data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from datatrace.demo.subsets import _split

        train, test = _split(0)
        return train.images, train.labels, test.images, test.labels

    def network(self, seed: int) -> nn.Module:
        return DigitsPatchTransformer()


# Families whose task has a curvature (Task.curvature: classifiers' margins, language models):
# TRAK's default kernel there is the Gauss–Newton ΦᵀRΦ. Checked against each built family's task
# in ``Family.__post_init__``.
MARGIN_FAMILIES = {
    "digits-mlp", "digits-mlp-rotated", "digits-mlp-noisy", "digits-cnn", "text-minilm",
    "facts-gpt2", "facts-t5", "digits-cnn-bn", "digits-resmlp", "sequences-cnn1d",
    "tabular-resmlp", "facts-gpt2-wide", "cancer-binary", "sequences-gru", "digits-transformer",
}  # fmt: skip


def generated(name: str, recipe: Any, what: str) -> Callable[[Path], Family]:
    """The builder of a :func:`generated_family`."""
    return functools.partial(generated_family, recipe=recipe, name=name, what=what)


BUILDERS: dict[str, Callable[[Path], Family]] = {
    "digits-mlp": functools.partial(digits_family, model="mlp"),
    "digits-mlp-rotated": functools.partial(shifted_digits_family, shift="rotated"),
    "digits-mlp-noisy": functools.partial(shifted_digits_family, shift="noisy"),
    "digits-cnn": functools.partial(digits_family, model="cnn"),
    "text-minilm": text_family,
    "facts-gpt2": functools.partial(facts_family, kind="gpt2"),
    "facts-t5": functools.partial(facts_family, kind="t5"),
    "ddpm-memorised-loss": functools.partial(ddpm_memorised_family, output="loss"),
    "ddpm-memorised-square_norm": functools.partial(ddpm_memorised_family, output="square_norm"),
    "ddpm-lds-loss": functools.partial(ddpm_lds_family, output="loss"),
    "ddpm-lds-square_norm": functools.partial(ddpm_lds_family, output="square_norm"),
    # added to check the first rule (loss curvature); they showed the ensemble-size term
    "digits-cnn-bn": functools.partial(digits_family, model="cnn-bn"),
    "digits-resmlp": functools.partial(digits_family, model="resmlp"),
    "sequences-cnn1d": generated(
        "sequences-cnn1d", MotifSequences(), "1-D CNN on generated sequences"
    ),
    # added to check the second rule (redundancy ramp over 0.5-0.85)
    "tabular-resmlp": generated(
        "tabular-resmlp", TabularClasses(), "residual MLP on generated tabular data"
    ),
    "facts-gpt2-wide": functools.partial(
        facts_family, kind="gpt2", entities=100, width=128, name="facts-gpt2-wide", held_out=True
    ),
    # held out from the rule and the per-target factor: regression (dt.Regression)
    "friedman-regression": generated(
        "friedman-regression",
        RegressionRecipe("friedman1"),
        "MLP regressor on Friedman's first problem",
    ),
    "motif-regression": generated(
        "motif-regression", MotifAmplitude(), "1-D CNN regressor of a motif's amplitude"
    ),
    "diabetes-regression": generated(
        "diabetes-regression",
        RegressionRecipe("diabetes", epochs=40),
        "MLP regressor on scikit-learn's diabetes data",
    ),
    # held out from everything above: one logit, and a recurrent network
    "cancer-binary": generated(
        "cancer-binary",
        BinaryCancer(),
        "binary MLP (one logit) on scikit-learn's breast-cancer data",
    ),
    "sequences-gru": generated("sequences-gru", MotifSequencesGRU(), "GRU on generated sequences"),
    # held out from everything above (2026-12-04): attention, layer norm and GELU
    "digits-transformer": generated(
        "digits-transformer", DigitsTransformer(), "patch transformer on the digits"
    ),
}
