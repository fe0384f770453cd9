"""Attribute a tiny GPT-2's answers, and each token of a sentence, to its training sentences.

A GPT-2 built from a ``GPT2Config`` (2 layers, 64 wide, word-level vocabulary) learns generated
facts about fictional people ("zorvik was born in velmora", "the job of zorvik is baker", ...),
each stated by four paraphrases; a fifth paraphrase of every fact is held out. TRAK with
``CausalLM`` then explains

* the model's answer to held-out queries (prompt "zorvik is a native of", continuation
  "velmora"): the output is the log-odds of the continuation tokens;
* every token of a held-out sentence separately (``score_per_token``), which shows which training
  sentences support the entity's name and which the fact.

About 1–2 minutes on one CPU thread (``benchmarks/fact_tracing.py`` measures this at scale)::

    pip install "datatrace[hf]"
    python examples/causal_lm.py
"""

from __future__ import annotations

import argparse
import time

import torch

from datatrace import TRAK
from datatrace.demo.facts import fact_examples, make_facts, query_accuracy, train_fact_model
from datatrace.tasks import CausalLM, causal_lm_examples, score_per_token


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entities", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    corpus = make_facts(args.entities, seed=0)
    model = train_fact_model(corpus, "gpt2", seed=0, epochs=args.epochs)
    print(
        f"GPT-2 trained on {len(corpus.train)} sentences ({time.perf_counter() - started:.0f} s); "
        f"held-out query accuracy {query_accuracy(model, corpus, corpus.queries, 'gpt2'):.2f}"
    )
    # Training examples: whole sentences (prompt = the start token, continuation = the words).
    train = fact_examples(corpus, corpus.train, "gpt2", whole=True)

    # --- Attribution: the lines to write for a causal LM of your own. ----------------------
    # Batches: input_ids, attention_mask and labels = the token ids, -100 on prompt and padding
    # (causal_lm_examples builds them from token ids; a tokenizer's output works the same way).
    trak = TRAK(model, CausalLM(), proj_dim=256)  # model built with attn_implementation="eager"
    trak.fit(train)
    queries = corpus.queries[:3]
    answers = trak.score(fact_examples(corpus, queries, "gpt2", whole=False))
    # ---------------------------------------------------------------------------------------

    for j, query in enumerate(queries):
        print(f"\nQUERY {query.prompt!r} → {query.value!r}")
        ranking = answers.proponents(j, k=4)
        for i, score in zip(ranking.indices, ranking.scores):
            sentence = corpus.train[i]
            mark = "*" if sentence.fact == query.fact else " "
            print(f"  {mark} {score:+.4f}  {sentence.text}")
    print("  (* states the queried fact)")

    held_out = corpus.queries[0]
    ids = corpus.encode(held_out.text)
    sentence = causal_lm_examples([[corpus.bos_id]], [ids], corpus.pad_id)
    per_token = score_per_token(trak, sentence)
    rows = per_token.info["token_rows"]
    print(f"\nPER TOKEN of the held-out sentence {held_out.text!r}:")
    words = held_out.text.split()
    for r, position in enumerate(rows["position"]):
        top = per_token.proponents(r, k=1).indices[0]
        print(f"  {words[position - 1]:>12}  ← {corpus.train[top].text}")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
