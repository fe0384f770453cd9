"""Attribute a tiny T5's answers to the (prompt → answer) pairs it was trained on.

A T5 built from a ``T5Config`` (2 encoder and 2 decoder layers, 64 wide, word-level vocabulary)
learns to complete paraphrased statements of generated facts ("zorvik is a native of" →
"velmora"), as in the fact-tracing experiment of the TRAK paper (mT5 there). A fifth paraphrase
of every fact is held out; TRAK with ``Seq2SeqLM`` explains the model's answers to those
held-out prompts: the output is the sum over answer tokens of their log-odds. About two minutes
on one CPU thread::

    pip install "datatrace[hf]"
    python examples/seq2seq_lm.py
"""

from __future__ import annotations

import argparse
import time

import torch

from datatrace import TRAK
from datatrace.demo.facts import fact_examples, make_facts, query_accuracy, train_fact_model
from datatrace.tasks import Seq2SeqLM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    corpus = make_facts(args.entities, seed=0)
    model = train_fact_model(corpus, "t5", seed=0, epochs=args.epochs)
    print(
        f"T5 trained on {len(corpus.train)} (prompt → answer) pairs "
        f"({time.perf_counter() - started:.0f} s); held-out query accuracy "
        f"{query_accuracy(model, corpus, corpus.queries, 't5'):.2f}"
    )
    train = fact_examples(corpus, corpus.train, "t5", whole=False)
    queries = corpus.queries[:4]

    # --- Attribution: the lines to write for a seq2seq model of your own. ------------------
    # Batches: the encoder's input_ids and attention_mask, and labels (the target ids padded
    # with -100); decoder inputs are the labels shifted right, as in the model's own training.
    trak = TRAK(model, Seq2SeqLM(), proj_dim=256)  # model built with attn_implementation="eager"
    trak.fit(train)
    answers = trak.score(fact_examples(corpus, queries, "t5", whole=False))
    # ---------------------------------------------------------------------------------------

    for j, query in enumerate(queries):
        print(f"\nQUERY {query.prompt!r} → {query.value!r}")
        ranking = answers.proponents(j, k=4)
        for i, score in zip(ranking.indices, ranking.scores):
            sentence = corpus.train[i]
            mark = "*" if sentence.fact == query.fact else " "
            print(f"  {mark} {score:+.4f}  {sentence.prompt!r} → {sentence.value!r}")
    print("  (* states the queried fact)")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
