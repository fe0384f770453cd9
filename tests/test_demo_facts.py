"""The generated facts of datatrace.demo.facts, and the offline text of datatrace.demo.text."""

import numpy as np

from datatrace.demo.facts import RELATIONS, make_facts
from datatrace.demo.text import MIN_WORDS, STDLIB_AREAS, docstring_corpus


def test_each_query_has_its_facts_other_paraphrases_in_training():
    corpus = make_facts(12, seed=3)
    assert len(corpus.facts) == 12 * len(RELATIONS)
    train_texts = {s.text for s in corpus.train}
    for query in corpus.queries:
        relevant = corpus.relevant(query)
        n_templates = len(RELATIONS[corpus.facts[query.fact].relation]["templates"])
        assert len(relevant) == n_templates - 1
        assert query.text not in train_texts
        assert {corpus.train[i].template for i in relevant} | {query.template} == set(
            range(n_templates)
        )
        assert all(corpus.train[i].value == query.value for i in relevant)
    # Every template is seen in training (for other facts), so held-out queries are answerable.
    for relation, spec in RELATIONS.items():
        seen = {s.template for s in corpus.train if corpus.facts[s.fact].relation == relation}
        assert seen == set(range(len(spec["templates"])))


def test_novel_queries_share_no_template_word_with_training():
    corpus = make_facts(12, seed=3)
    entities = {f.entity for f in corpus.facts}
    values = {f.value for f in corpus.facts}
    train_words = {w for s in corpus.train for w in s.text.split()} - entities - values
    for query in corpus.novel_queries:
        shared = set(query.prompt.split()) & train_words
        assert shared <= {"a"}, shared
    assert all(corpus.encode(s.text) for s in corpus.train + corpus.queries + corpus.novel_queries)


def test_docstring_corpus_is_real_labelled_text():
    corpus = docstring_corpus(per_class=6, seed=0)
    assert corpus.class_names == list(STDLIB_AREAS)
    assert np.bincount(corpus.labels).tolist() == [6] * len(STDLIB_AREAS)
    assert all(len(text.split()) >= MIN_WORDS for text in corpus.texts)
    assert len(set(corpus.texts)) == len(corpus.texts)
