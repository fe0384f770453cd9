"""Fact tracing: do TRAK's top proponents of a model's answer state the fact it answered?

After the fact-tracing experiment of the TRAK paper (mT5 on FTRACE-TREx), at a size that runs on a
CPU in minutes, with facts generated here so that nothing is downloaded::

    python benchmarks/fact_tracing.py                 # tiny GPT-2, 3 models; --help for options
    python benchmarks/fact_tracing.py --model t5      # tiny T5 trained on (prompt → value)

What runs. ``datatrace.demo.facts`` makes fictional entities with a birthplace, an occupation and a
favourite colour; each fact is stated by five paraphrase templates, one held out per fact. Tiny
models built from configs (``GPT2Config`` or ``T5Config``, word-level vocabulary) are trained on
the other four sentences of every fact until they answer the held-out queries (the query
accuracy is printed), with different seeds. The queries, each a (prompt, value) pair, are
attributed to the training sentences:

* TRAK (``CausalLM`` / ``Seq2SeqLM``: the output of a query is the log-odds of its value token),
  ensembled over the models, with every parameter and with only the last block and the head;
* BM25 (``rank_bm25.BM25Okapi``) and TF-IDF cosine (scikit-learn) retrieval of the training
  sentences, with the query's prompt alone and with the prompt followed by the answer;
* random scores.

Relevant training sentences: the four that state the queried fact. Reported: mean reciprocal rank
(MRR) of the first relevant sentence, P@1 (the top sentence is relevant) and recall@k (the
fraction of the four in the top k), for the
held-out-template queries and for "novel" queries whose wording no training sentence uses (the
models rarely answer those, which the accuracy column shows).

Lexical retrieval has an easy job here when it sees the answer: the entity and the value words
pick out the fact's sentences almost uniquely. With the prompt alone it sees the entity but not
which of the entity's facts is asked; TRAK sees the model's answer through its gradient.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
import torch

from datatrace import TRAK, SingularKernelWarning
from datatrace.demo.facts import (
    FactCorpus,
    fact_examples,
    make_facts,
    query_accuracy,
    train_fact_model,
)
from datatrace.grads import last_blocks
from datatrace.tasks import CausalLM, Seq2SeqLM

RECALL_AT = (4, 10)


# ---------------------------------------------------------------------------------------------
# Retrieval


def lexical_scores(corpus: FactCorpus, queries, method: str, with_answer: bool) -> np.ndarray:
    """``(n_queries, n_train)`` BM25 or TF-IDF cosine scores of the training sentences."""
    documents = [s.text for s in corpus.train]
    texts = [q.text if with_answer else q.prompt for q in queries]
    if method == "bm25":
        from rank_bm25 import BM25Okapi

        index = BM25Okapi([d.split() for d in documents])
        return np.stack([index.get_scores(t.split()) for t in texts])
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(token_pattern=r"\S+").fit(documents)
    return (vectorizer.transform(texts) @ vectorizer.transform(documents).T).toarray()


def ranking_metrics(scores: np.ndarray, corpus: FactCorpus, queries) -> dict[str, float]:
    """MRR of the first relevant training sentence and recall@k, averaged over queries. Ties
    are broken against the relevant sentences (a constant score earns no credit)."""
    reciprocal, top, recall = [], [], {k: [] for k in RECALL_AT}
    for row, query in zip(scores, queries):
        relevant = corpus.relevant(query)
        is_relevant = np.zeros(len(row), dtype=bool)
        is_relevant[relevant] = True
        order = np.lexsort((is_relevant, -row))  # by score, relevant last among equals
        ranked_relevant = is_relevant[order]
        reciprocal.append(1.0 / (1 + int(np.argmax(ranked_relevant))))
        top.append(float(ranked_relevant[0]))
        for k in RECALL_AT:
            recall[k].append(ranked_relevant[:k].sum() / len(relevant))
    return {"MRR": float(np.mean(reciprocal)), "P@1": float(np.mean(top))} | {
        f"R@{k}": float(np.mean(values)) for k, values in recall.items()
    }


# ---------------------------------------------------------------------------------------------


def damping_value(text: str) -> float | str:
    """``"auto"`` (TRAK's default rule) or a damping relative to the mean diagonal of ΦᵀΦ."""
    return text if text == "auto" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["gpt2", "t5"], default="gpt2")
    parser.add_argument("--entities", type=int, default=60)
    parser.add_argument("--models", type=int, default=3, help="models in the TRAK ensemble")
    parser.add_argument("--epochs", type=int, default=None, help="default: 80 gpt2, 60 t5")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument(
        "--damping",
        type=damping_value,
        default="auto",
        help='"auto" (the default) or a relative value',
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", SingularKernelWarning)
    epochs = args.epochs or (80 if args.model == "gpt2" else 60)
    started = time.perf_counter()

    corpus = make_facts(args.entities, args.seed)
    print(
        f"{len(corpus.facts)} facts, {len(corpus.train)} training sentences, "
        f"{len(corpus.queries)} queries, vocabulary {len(corpus.vocab)}; model {args.model} "
        f"width {args.width} × {args.layers} layers, {epochs} epochs, {args.models} models"
    )
    models = []
    for index in range(args.models):
        tick = time.perf_counter()
        model = train_fact_model(
            corpus, args.model, args.seed + index, epochs, args.width, args.layers
        )
        models.append(model)
        print(
            f"  model {index}: {time.perf_counter() - tick:.0f} s, query accuracy "
            f"held-out {query_accuracy(model, corpus, corpus.queries, args.model):.2f}, novel "
            f"{query_accuracy(model, corpus, corpus.novel_queries, args.model):.2f}"
        )
    n_params = sum(p.numel() for p in models[0].parameters())

    query_sets = {"held-out template": corpus.queries, "novel wording": corpus.novel_queries}
    task = CausalLM() if args.model == "gpt2" else Seq2SeqLM()
    train_data = fact_examples(corpus, corpus.train, args.model, whole=args.model == "gpt2")
    selections = {"all": None, "last block + head": last_blocks(models[0], 1)}
    rows: list[tuple[str, str, dict]] = []
    for label, params in selections.items():
        tick = time.perf_counter()
        trak = TRAK(
            models[0],
            task,
            proj_dim=args.proj_dim,
            damping=args.damping,
            params=params,
            progress=False,
            seed=args.seed,
        ).fit(train_data, [m.state_dict() for m in models])
        for set_name, queries in query_sets.items():
            scores = trak.score(fact_examples(corpus, queries, args.model, whole=False)).scores
            rows.append((f"TRAK ({label})", set_name, ranking_metrics(scores, corpus, queries)))
        seconds = time.perf_counter() - tick
        print(f"  TRAK ({label}, {sum(trak.features_.sizes):,} parameters): {seconds:.0f} s")
    for set_name, queries in query_sets.items():
        for method in ("bm25", "tfidf"):
            for with_answer in (False, True):
                scores = lexical_scores(corpus, queries, method, with_answer)
                seen = "prompt + answer" if with_answer else "prompt"
                name = f"{'BM25' if method == 'bm25' else 'TF-IDF'} ({seen})"
                rows.append((name, set_name, ranking_metrics(scores, corpus, queries)))
        noise = np.random.default_rng(args.seed).random((len(queries), len(corpus.train)))
        rows.append(("random", set_name, ranking_metrics(noise, corpus, queries)))

    machine = platform.processor() or platform.machine()
    print()
    print(
        f"Fact tracing, {args.model} ({n_params:,} parameters), {len(corpus.train)} training "
        f"sentences, {len(corpus.queries)} queries per set, TRAK k={args.proj_dim}, "
        f"damping {args.damping}, {args.models} models; {machine}, "
        f"{args.threads} thread(s), total {time.perf_counter() - started:.0f} s"
    )
    columns = ["MRR", "P@1", *(f"R@{k}" for k in RECALL_AT)]
    for set_name in query_sets:
        print(f"\nqueries: {set_name}\n")
        print("| method | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns))
        for name, row_set, metrics in rows:
            if row_set == set_name:
                print(f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
