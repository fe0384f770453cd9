"""CausalLM and Seq2SeqLM on tiny GPT-2 and T5 models built from configs."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import PAD, VOCAB, loop_grads, tiny_gpt2, tiny_t5, train_steps
from datatrace import TRAK
from datatrace.grads import PerExampleGradients, last_blocks, select_parameters
from datatrace.tasks import (
    IGNORE_INDEX,
    CausalLM,
    Seq2SeqLM,
    causal_lm_examples,
    per_token_targets,
    score_per_token,
    seq2seq_examples,
)
from datatrace.tasks.base import fuses_out_to_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def token_lists(n, low, high, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, rng.integers(low, high + 1)).tolist() for _ in range(n)]


def causal_batch(n=6, seed=0):
    return causal_lm_examples(token_lists(n, 2, 4, seed), token_lists(n, 1, 4, seed + 1), PAD)


def seq2seq_batch(n=6, seed=0):
    return seq2seq_examples(token_lists(n, 2, 5, seed), token_lists(n, 1, 4, seed + 1), PAD)


def log_odds(logits, targets):
    """log p/(1 − p) of each target token, the textbook way (float64)."""
    log_p = torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    return log_p - torch.log1p(-log_p.exp()), log_p.exp()


def reference_causal(model, batch):
    """(sum of token log-odds, mean of 1 − p) over continuation tokens, from the model's logits
    with HF's own labels convention (logits at t − 1 predict labels at t)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    counted = labels != IGNORE_INDEX
    odds, p = log_odds(logits[:, :-1], labels.clamp_min(0))
    return (odds * counted).sum(1), ((1 - p) * counted).sum(1) / counted.sum(1)


def reference_seq2seq(model, batch):
    """As above, with T5 building decoder inputs from the labels itself (``labels=``)."""
    logits = model(**batch).logits
    counted = batch["labels"] != IGNORE_INDEX
    odds, p = log_odds(logits, batch["labels"].clamp_min(0))
    return (odds * counted).sum(1), ((1 - p) * counted).sum(1) / counted.sum(1)


CASES = {
    "causal": (tiny_gpt2, CausalLM, causal_batch, reference_causal),
    "seq2seq": (tiny_t5, Seq2SeqLM, seq2seq_batch, reference_seq2seq),
}


@pytest.mark.parametrize("case", CASES)
def test_per_example_gradients_match_autograd_loop(case):
    make_model, make_task, make_batch, reference = CASES[case]
    model, batch = make_model(), make_batch()
    names = select_parameters(model)
    got = PerExampleGradients(model, make_task(), names).gradients(model.state_dict(), batch)
    want = loop_grads(model, lambda m, example: reference(m, example)[0], batch, names)
    for name in names:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_output_and_out_to_loss_match_logits(case):
    make_model, make_task, make_batch, reference = CASES[case]
    model, batch = make_model(), make_batch(n=8, seed=3)
    runner = PerExampleGradients(model, make_task(), select_parameters(model))
    with torch.no_grad():
        want_output, want_out_to_loss = reference(model, batch)
    state = model.state_dict()
    torch.testing.assert_close(
        runner.outputs(state, batch).double(), want_output, rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        runner.out_to_loss(state, batch).double(), want_out_to_loss, rtol=1e-4, atol=1e-6
    )
    # both from one forward pass (what featurizing through hooks uses)
    task = make_task()
    assert fuses_out_to_loss(task)
    with torch.no_grad():
        output, out_to_loss = task.output_and_out_to_loss(model.eval(), batch)
    torch.testing.assert_close(output.double(), want_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_to_loss.double(), want_out_to_loss, rtol=1e-4, atol=1e-6)


def test_prompt_and_padding_tokens_do_not_count():
    model = tiny_gpt2()
    batch = causal_lm_examples([[5, 6, 7]], [[8, 9]], PAD)
    longer = causal_lm_examples([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10]], [[8, 9], [11]], PAD)
    task = CausalLM()
    with torch.no_grad():
        alone = task.output(model, batch)
        padded = task.output(model, {k: v[:1] for k, v in longer.items()})
        prompt_changed = dict(batch, labels=batch["labels"].clone())
        prompt_changed["labels"][0, 3] = IGNORE_INDEX  # attribute only the last token
        last_only = task.output(model, prompt_changed)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last_only, alone)


@pytest.mark.parametrize("case", CASES)
def test_per_token_rows_sum_to_the_sequence_output(case):
    make_model, make_task, make_batch, _ = CASES[case]
    model, batch, task = make_model(), make_batch(), make_task()
    rows_batch, rows = per_token_targets(batch)
    n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
    assert len(rows.target) == n_tokens == len(rows_batch["labels"])
    for r in range(n_tokens):
        assert rows_batch["token_position"][r] == rows.position[r]
        assert batch["labels"][rows.target[r], rows.position[r]] == rows.token[r]
        assert torch.equal(rows_batch["labels"][r], batch["labels"][rows.target[r]])
    with torch.no_grad():
        per_token = task.output(model, rows_batch)
        whole = task.output(model, batch)
    summed = torch.zeros_like(whole).index_add_(0, torch.as_tensor(rows.target), per_token)
    torch.testing.assert_close(summed, whole, rtol=1e-4, atol=1e-4)


def test_sdpa_causal_model_falls_back_to_one_example_at_a_time_with_the_advice():
    """transformers' 'sdpa' masks branch on tensor values, which vmap refuses: the gradients
    come one example at a time, equal to the eager twin's, and the warning says how to get vmap
    back."""
    from datatrace.grads.per_example import VmapFallbackWarning

    model, eager = tiny_gpt2(attn="sdpa"), tiny_gpt2(attn="eager")  # the same weights
    names = select_parameters(model, "transformer.ln_f.*")
    with pytest.warns(VmapFallbackWarning, match="attn_implementation='eager'"):
        got = PerExampleGradients(model, CausalLM(), names).gradients(
            model.state_dict(), causal_batch()
        )
    want = PerExampleGradients(eager, CausalLM(), names).gradients(
        eager.state_dict(), causal_batch()
    )
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def trained_gpt2():
    """A tiny GPT-2 that has memorised 30 random (prompt, continuation) pairs."""
    train = causal_lm_examples(token_lists(30, 2, 3, 10), token_lists(30, 2, 3, 11), PAD)

    def loss(model):
        logits = model(input_ids=train["input_ids"], attention_mask=train["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), train["labels"][:, 1:].flatten()
        )

    return train_steps(tiny_gpt2(seed=4), loss, steps=200, lr=1e-2), train


@pytest.mark.filterwarnings("ignore::datatrace.SingularKernelWarning")
def test_duplicated_training_example_is_its_own_top_proponent(trained_gpt2):
    model, train = trained_gpt2
    # Small damping, as in tests/test_tasks_text.py: self-retrieval is a property of the
    # near-undamped kernel.
    trak = TRAK(model, CausalLM(), proj_dim=512, damping=1e-3, progress=False).fit(train)
    scores = trak.score(train).scores
    assert (scores / trak.out_to_loss_.mean(0)).argmax(1).tolist() == list(range(30))
    assert scores.argmax(1).tolist() == list(range(30))
    per_token = score_per_token(trak, {k: v[:3] for k, v in train.items()})
    rows = per_token.info["token_rows"]
    assert per_token.n_targets == len(rows["target"]) == int((train["labels"][:3] >= 0).sum())
    assert set(rows["target"]) == {0, 1, 2}


def untied_gpt2():
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2().config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def two_layer_t5():
    """tiny_t5 with 2 encoder and 2 decoder blocks (a stack needs two); its head is tied to
    ``shared`` (transformers always ties T5's)."""
    from transformers import T5ForConditionalGeneration

    config = tiny_t5().config
    config.num_layers = config.num_decoder_layers = 2
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).eval()


def names_under(model, *prefixes):
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def test_last_blocks_selects_a_tied_lm_head_under_the_embedding_name():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    want = names_under(model, "transformer.h.1.", "transformer.ln_f.") | {"transformer.wte.weight"}
    assert set(last_blocks(model, 1)) == want
    assert set(last_blocks(model, 1, head=False)) == names_under(model, "transformer.h.1.")

    untied = untied_gpt2()
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    want = names_under(untied, "transformer.h.1.", "transformer.ln_f.") | {"lm_head.weight"}
    assert set(last_blocks(untied, 1)) == want


def test_last_blocks_of_t5_selects_both_stacks_and_the_tied_head():
    model = two_layer_t5()
    assert model.lm_head.weight is model.shared.weight
    names = last_blocks(model, 1)
    want = names_under(
        model, "encoder.block.1.", "decoder.block.1.", "decoder.final_layer_norm."
    ) | {"shared.weight"}
    assert set(names) == want
    assert names == [name for name, _ in model.named_parameters() if name in want]


@pytest.mark.parametrize("case", ["causal", "seq2seq"])
def test_gradients_through_last_blocks_include_the_tied_head(case):
    """The tied weight's gradient is the autograd one, both uses (output and input) summed."""
    make_model = {"causal": tiny_gpt2, "seq2seq": two_layer_t5}[case]
    _, make_task, make_batch, reference = CASES[case]
    model, batch = make_model(), make_batch(n=3)
    names = last_blocks(model, 1)
    got = PerExampleGradients(model, make_task(), names).gradients(model.state_dict(), batch)
    want = loop_grads(model, lambda m, example: reference(m, example)[0], batch, names)
    tied = "transformer.wte.weight" if case == "causal" else "shared.weight"
    assert want[tied].abs().sum() > 0
    for name in names:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-3, atol=1e-6)


def test_empty_causal_prompt_is_refused():
    with pytest.raises(ValueError, match=r"prompt 1 is empty: .*at least one token.*BOS"):
        causal_lm_examples([[5, 6], []], [[8], [9, 10]], PAD)


@pytest.mark.parametrize("make", [causal_lm_examples, seq2seq_examples])
def test_example_lists_that_cannot_make_a_batch_are_refused(make):
    with pytest.raises(ValueError, match="are empty: give at least one example"):
        make([], [], PAD)
    with pytest.raises(ValueError, match=r"continuation 0 holds \['a'\]: token ids must be"):
        make([[5]], [["a"]], PAD)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        make([[]], [[8]], PAD)
    # token ids as tensors or arrays make the same batch as lists
    listed = make([[5, 6]], [[8, 9]], PAD)
    tensors = make([torch.tensor([5, 6])], [np.array([8, 9])], PAD)
    assert all(torch.equal(listed[key], tensors[key]) for key in listed)


@pytest.fixture(scope="module")
def causal_trak():
    train = causal_lm_examples(token_lists(6, 1, 3, 20), token_lists(6, 1, 3, 21), PAD)
    return TRAK(tiny_gpt2(), CausalLM(), proj_dim=32, progress=False).fit(train)


def test_per_token_scores_refuse_a_first_token_nothing_predicts(causal_trak):
    batch = causal_lm_examples([[5, 6], [7]], [[8], [9, 10]], PAD)
    # As an empty prompt would give: sequence 1 is all continuation, from position 0.
    batch["labels"][1, :2] = batch["input_ids"][1, :2]
    with pytest.raises(ValueError, match=r"sequence 1 .*position 0.*at least one token.*BOS"):
        score_per_token(causal_trak, batch)
    # With a one-token prompt every row gets scores.
    batch = causal_lm_examples([[5, 6], [1]], [[8], [7, 9, 10]], PAD)
    per_token = score_per_token(causal_trak, batch)
    assert per_token.info["token_rows"]["target"] == [0, 1, 1, 1]
    assert (np.abs(per_token.scores).max(1) > 0).all()


def test_per_token_rows_refuse_a_sequence_with_no_attributed_token(causal_trak):
    batch = causal_lm_examples([[5, 6], [7], [3]], [[8], [9, 10], [11]], PAD)
    batch["labels"][1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"sequence 1 .*no attributed token.*drop it"):
        per_token_targets(batch)
    with pytest.raises(ValueError, match=r"sequence 1 .*no attributed token"):
        score_per_token(causal_trak, batch)


def test_seq2seq_per_token_scores_start_at_position_0():
    """A seq2seq label at position 0 is predicted (from the decoder start token): no refusal."""
    model = tiny_t5()
    train = seq2seq_batch(n=6, seed=5)
    trak = TRAK(model, Seq2SeqLM(), proj_dim=32, progress=False).fit(train)
    batch = seq2seq_batch(n=2, seed=6)
    per_token = score_per_token(trak, batch)
    rows = per_token.info["token_rows"]
    assert rows["position"].count(0) == 2
    assert (np.abs(per_token.scores).max(1) > 0).all()
