"""Generated facts for fact tracing: fictional entities, their attributes, paraphrased sentences.

Every fact ``(entity, relation, value)`` is stated by several paraphrase templates. For each fact
one template is held out: the training set holds the sentences of the other templates, and the
held-out template's prompt (the sentence up to the value) is a query whose answer is the value.
Every template appears in the training set for other facts, so a model can learn to answer it
from the fact's other sentences. A second query set uses wording that no training sentence uses.

Text is tokenised by words (lower case) into a small vocabulary, for tiny models built from
configs. Everything is deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from datatrace.tasks.language_model import causal_lm_examples, seq2seq_examples

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

# Fictional values: none of these words carries a meaning a model could have learnt elsewhere.
CITIES = (
    "velmora ostrik quenby darvash lumetra sorvel pindra kaltho ebrisk nauvel tarrow zemlin"
).split()
OCCUPATIONS = (
    "baker pilot sculptor nurse carpenter botanist judge fisher tailor chemist weaver surveyor"
).split()
COLOURS = "crimson amber teal violet ochre indigo scarlet olive silver coral".split()

# Each template ends with the value, so that its prompt is the text before "{value}".
RELATIONS: dict[str, dict] = {
    "birthplace": {
        "values": CITIES,
        "templates": [
            "{entity} was born in {value}",
            "the birthplace of {entity} is {value}",
            "{entity} is a native of {value}",
            "the hometown of {entity} is the city of {value}",
            "records say that {entity} came into the world in {value}",
        ],
        "novel": "asked where life began , {entity} names {value}",
    },
    "occupation": {
        "values": OCCUPATIONS,
        "templates": [
            "{entity} works as a {value}",
            "the job of {entity} is {value}",
            "by profession {entity} is a {value}",
            "{entity} earns a living as a {value}",
            "everyone in town knows {entity} as the local {value}",
        ],
        "novel": "on weekdays {entity} can be found busy being a {value}",
    },
    "colour": {
        "values": COLOURS,
        "templates": [
            "the favourite colour of {entity} is {value}",
            "the colour {entity} likes best is {value}",
            "{entity} always wears something {value}",
            "of all colours {entity} prefers {value}",
            "the walls in the home of {entity} are painted {value}",
        ],
        "novel": "if {entity} could choose a single shade it would be {value}",
    },
}

_SYLLABLES = "ka lo mi ren sa tu vo ne ri da po lin mar tes vi gor".split()


def entity_names(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct fictional one-word names built from syllables."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4)))
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str


@dataclass(frozen=True)
class Sentence:
    """A sentence split at its value: ``prompt + " " + value`` is the full text."""

    fact: int
    template: int
    prompt: str
    value: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.value}"


@dataclass
class FactCorpus:
    """Facts, training sentences and queries, with a word vocabulary.

    Attributes:
        facts: every fact.
        train: training sentences (``len(RELATIONS[r]["templates"]) − 1`` per fact).
        queries: one per fact, with the fact's held-out template.
        novel_queries: one per fact, with wording no training sentence uses.
        vocab: word → id (special tokens first).
    """

    facts: list[Fact]
    train: list[Sentence]
    queries: list[Sentence]
    novel_queries: list[Sentence]
    vocab: dict[str, int] = field(default_factory=dict)

    def relevant(self, query: Sentence) -> np.ndarray:
        """Indices of the training sentences that state the query's fact."""
        return np.array([i for i, s in enumerate(self.train) if s.fact == query.fact])

    def encode(self, text: str) -> list[int]:
        return [self.vocab[word] for word in text.split()]

    @property
    def pad_id(self) -> int:
        return self.vocab[PAD]

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]


def make_facts(n_entities: int = 60, seed: int = 0) -> FactCorpus:
    """Each entity gets one value per relation (drawn at random); see the module docstring."""
    rng = np.random.default_rng(seed)
    facts, train, queries, novel = [], [], [], []
    for entity in entity_names(n_entities, seed):
        for relation, spec in RELATIONS.items():
            value = str(rng.choice(spec["values"]))
            index = len(facts)
            facts.append(Fact(entity, relation, value))
            held_out = int(rng.integers(len(spec["templates"])))
            if not all(t.endswith(" {value}") for t in [*spec["templates"], spec["novel"]]):
                raise ValueError(f"every template of {relation!r} must end with ' {{value}}'")
            for t, template in enumerate(spec["templates"]):
                prompt = template.replace(" {value}", "").format(entity=entity)
                sentence = Sentence(index, t, prompt, value)
                (queries if t == held_out else train).append(sentence)
            prompt = spec["novel"].replace(" {value}", "").format(entity=entity)
            novel.append(Sentence(index, -1, prompt, value))
    words = sorted({w for s in train + queries + novel for w in s.text.split()})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    return FactCorpus(facts, train, queries, novel, vocab)


def tiny_gpt2(corpus: FactCorpus, seed: int, width: int = 64, layers: int = 2) -> nn.Module:
    """A GPT-2 built from a config for the corpus' vocabulary (eager attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(corpus.vocab),
        n_embd=width,
        n_layer=layers,
        n_head=4,
        n_positions=24,
        bos_token_id=corpus.bos_id,
        eos_token_id=corpus.eos_id,
        pad_token_id=corpus.pad_id,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def tiny_t5(corpus: FactCorpus, seed: int, width: int = 64, layers: int = 2) -> nn.Module:
    """A T5 built from a config for the corpus' vocabulary (eager attention)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(corpus.vocab),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        pad_token_id=corpus.pad_id,
        eos_token_id=corpus.eos_id,
        decoder_start_token_id=corpus.pad_id,
        attn_implementation="eager",
    )
    return T5ForConditionalGeneration(config)


def fact_examples(corpus: FactCorpus, sentences: list[Sentence], kind: str, whole: bool) -> dict:
    """Batches for the task: the whole sentence (training, causal LM) or the value given the
    prompt (queries; and training pairs of the seq2seq model)."""
    prompts = [[corpus.bos_id, *corpus.encode(s.prompt)] for s in sentences]
    values = [corpus.encode(s.value) for s in sentences]
    if kind == "gpt2":
        if whole:
            sequences = [[*corpus.encode(s.text), corpus.eos_id] for s in sentences]
            return causal_lm_examples([[corpus.bos_id]] * len(sentences), sequences, corpus.pad_id)
        return causal_lm_examples(prompts, values, corpus.pad_id)
    return seq2seq_examples([[*p[1:], corpus.eos_id] for p in prompts], values, corpus.pad_id)


def lm_loss(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens."""
    if kind == "gpt2":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
    return model(**batch).loss


def train_fact_model(
    corpus: FactCorpus,
    kind: str = "gpt2",
    seed: int = 0,
    epochs: int = 80,
    width: int = 64,
    layers: int = 2,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> nn.Module:
    """Train a tiny ``"gpt2"`` (on whole training sentences) or ``"t5"`` (prompt → value) on
    the corpus' training sentences with AdamW and a one-cycle schedule; returns it in eval mode."""
    model = (tiny_gpt2 if kind == "gpt2" else tiny_t5)(corpus, seed, width, layers)
    data = fact_examples(corpus, corpus.train, kind, whole=True)
    n = len(corpus.train)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, batch_size):
            rows = order[lo : lo + batch_size]
            optimizer.zero_grad()
            lm_loss(model, {k: v[rows] for k, v in data.items()}, kind).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def query_accuracy(model: nn.Module, corpus: FactCorpus, queries, kind: str) -> float:
    """Fraction of queries whose most likely next token is the value."""
    batch = fact_examples(corpus, queries, kind, whole=False)
    if kind == "gpt2":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        first = (labels != -100).float().argmax(1)
        rows = torch.arange(len(labels))
        predicted = logits[rows, first - 1].argmax(-1)
        return float((predicted == labels[rows, first]).float().mean())
    logits = model(**batch).logits
    return float((logits[:, 0].argmax(-1) == batch["labels"][:, 0]).float().mean())
