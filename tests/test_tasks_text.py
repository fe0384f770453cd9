"""TextClassification on tiny Hugging Face classifiers built from configs."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import (
    loop_grads,
    padded_tokens,
    tiny_bert,
    tiny_distilbert,
    train_steps,
)
from datatrace import TRAK
from datatrace.grads import PerExampleGradients, last_blocks, select_parameters
from datatrace.tasks import TextClassification

pytestmark = pytest.mark.usefixtures("one_thread")


def text_batch(n=10, width=9, seed=0, token_types=True):
    ids, mask = padded_tokens(n, width, seed)
    batch = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        batch["token_type_ids"] = (torch.arange(width)[None, :] >= width // 2).long().repeat(n, 1)
    batch["labels"] = torch.arange(n) % 3
    return batch


def reference_margin(model, example):
    """log p_y/(1 − p_y) from the logits of the model called the usual way (2-D mask)."""
    inputs = {k: v for k, v in example.items() if k != "labels"}
    log_p = torch.log_softmax(model(**inputs).logits.double(), -1)
    log_p_true = log_p.gather(1, example["labels"][:, None]).squeeze(1)
    return log_p_true - torch.log1p(-log_p_true.exp())


@pytest.mark.parametrize(
    "make_model, token_types",
    [(tiny_bert, True), (tiny_distilbert, False)],
    ids=["bert", "distilbert-no-token-types"],
)
def test_per_example_gradients_match_autograd_loop(make_model, token_types):
    model = make_model()
    batch = text_batch(token_types=token_types)
    names = select_parameters(model)
    got = PerExampleGradients(model, TextClassification(), names).gradients(
        model.state_dict(), batch
    )
    want = loop_grads(model, reference_margin, batch, names)
    for name in names:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_and_out_to_loss_match_logits(attn):
    model = tiny_bert(attn=attn)
    batch = text_batch(n=12)
    runner = PerExampleGradients(model, TextClassification(), select_parameters(model))
    output = runner.outputs(model.state_dict(), batch)
    with torch.no_grad():
        want = reference_margin(model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        p_true = torch.softmax(model(**inputs).logits.double(), -1)[
            torch.arange(12), batch["labels"]
        ]
    torch.testing.assert_close(output.double(), want, rtol=1e-4, atol=1e-5)
    out_to_loss = runner.out_to_loss(model.state_dict(), batch)
    torch.testing.assert_close(out_to_loss.double(), 1 - p_true, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        fused_output, fused_out_to_loss = TextClassification().output_and_out_to_loss(
            model.eval(), batch
        )
    torch.testing.assert_close(fused_output.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_out_to_loss.double(), 1 - p_true, rtol=1e-4, atol=1e-6)
    # Gradients under vmap work with SDPA too: the padding mask is passed as a 4-D mask.
    grads = runner.gradients(model.state_dict(), {k: v[:3] for k, v in batch.items()})
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_label_and_ignored_columns_are_configurable():
    model = tiny_bert()
    batch = text_batch(n=6)
    renamed = {**batch, "target": batch.pop("labels"), "example_id": torch.arange(6)}
    task = TextClassification(label_key="target", ignore=["example_id"])
    runner = PerExampleGradients(model, task, select_parameters(model, "classifier.*"))
    with torch.no_grad():
        want = reference_margin(model, {**batch, "labels": renamed["target"]})
    torch.testing.assert_close(
        runner.outputs(model.state_dict(), renamed).double(), want, rtol=1e-4, atol=1e-5
    )


def test_batch_errors_say_what_to_pass():
    model = tiny_bert()
    task = TextClassification()
    with pytest.raises(TypeError, match="dict of tensors"):
        task.output(model, (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2)))
    with pytest.raises(KeyError, match="labels"):
        task.output(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_last_blocks_selects_last_layers_and_head():
    model = tiny_bert()
    names = last_blocks(model, 1)
    assert names, "nothing selected"
    assert all(
        n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in names
    )
    assert any(n.startswith("classifier.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.0.") for n in names)
    assert last_blocks(model, 1, head=False) == [n for n in names if ".layer.1." in n]
    with pytest.raises(ValueError, match="at least 1"):
        last_blocks(model, 0)


@pytest.fixture(scope="module")
def trained_classifier():
    """A tiny BERT fit to 40 short random 'sentences' with 3 classes (memorised)."""
    train = text_batch(n=40, width=10, seed=1)
    train["labels"] = torch.tensor(np.random.default_rng(0).integers(0, 3, 40))
    inputs = {k: v for k, v in train.items() if k != "labels"}

    def loss(model):
        return torch.nn.functional.cross_entropy(model(**inputs).logits, train["labels"])

    model = train_steps(tiny_bert(seed=3), loss, steps=150, lr=1e-2)
    return model, train


@pytest.mark.filterwarnings("ignore::datatrace.SingularKernelWarning")
def test_duplicated_training_example_is_its_own_top_proponent(trained_classifier):
    model, train = trained_classifier
    # Damping 1e-3 × the mean diagonal of ΦᵀΦ: as λ → 0, φ_iᵀ(ΦᵀΦ + λI)⁻¹Φᵀ → e_iᵀ when Φ has
    # full row rank, so a duplicated training example picks itself out. The default damping
    # (1.0, chosen for LDS) pulls the scores towards plain gradient products, where a few
    # examples with large gradients can outrank the duplicate (measured: 50-70 % self-top).
    trak = TRAK(model, TextClassification(), proj_dim=512, damping=1e-3, progress=False)
    scores = trak.fit(train).score(train).scores
    kernel_part = scores / trak.out_to_loss_.mean(0)[None, :]
    assert kernel_part.argmax(1).tolist() == list(range(40))
    assert scores.argmax(1).tolist() == list(range(40))
