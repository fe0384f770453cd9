"""CLIPContrastive and its pool of negatives, on a tiny CLIP built from a config."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _hf_models import loop_grads, padded_tokens, tiny_clip, train_steps
from datatrace import TRAK
from datatrace.grads import GradientFeatures, PerExampleGradients, select_parameters
from datatrace.grads.projectors import make_projector
from datatrace.tasks import CLIPContrastive, CLIPNegatives, Task

pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n=8, seed=0):
    """Random image–text pairs: 1×8×8 images and right-padded captions."""
    ids, mask = padded_tokens(n, 6, seed)
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 1, 8, 8, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
    }


def in_batch_margins(model, batch):
    """Independent reference: margins of each pair against the other pairs of the batch, read
    from the model's own ``logits_per_image`` (logit scale included)."""
    logits = model(**batch).logits_per_image.double()
    n = len(logits)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    diagonal = logits.diagonal()
    against_texts = logits.masked_fill(~off_diagonal, float("-inf")).logsumexp(1)
    against_images = logits.T.masked_fill(~off_diagonal, float("-inf")).logsumexp(1)
    return diagonal - against_texts, diagonal - against_images


def test_output_and_out_to_loss_match_in_batch_logits():
    model, batch = tiny_clip(), pairs(10)
    # The pool is the batch itself: each pair is recognised and left out of its own negatives,
    # so the margins are the in-batch ones of the CLIP loss.
    task = CLIPContrastive(batch, pool_size=None).for_checkpoint(model, 0)
    runner = PerExampleGradients(model, task, select_parameters(model))
    with torch.no_grad():
        image_margin, text_margin = in_batch_margins(model, batch)
    state = model.state_dict()
    torch.testing.assert_close(
        runner.outputs(state, batch).double(), image_margin + text_margin, rtol=1e-4, atol=1e-4
    )
    want_q = (torch.sigmoid(-image_margin) + torch.sigmoid(-text_margin)) / 2
    torch.testing.assert_close(
        runner.out_to_loss(state, batch).double(), want_q, rtol=1e-4, atol=1e-6
    )
    with torch.no_grad():
        output, out_to_loss = task.output_and_out_to_loss(model.eval(), batch)
    torch.testing.assert_close(output.double(), image_margin + text_margin, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_to_loss.double(), want_q, rtol=1e-4, atol=1e-6)


def test_per_example_gradients_match_autograd_loop():
    model, batch, pool_data = tiny_clip(), pairs(6), pairs(12, seed=1)
    task = CLIPContrastive(pool_data, pool_size=8).for_checkpoint(model, 0)
    names = select_parameters(model)
    got = PerExampleGradients(model, task, names).gradients(model.state_dict(), batch)
    negatives = task.negatives

    def reference(model, example):
        out = model(**example)
        scale = model.logit_scale.exp()
        positive = scale * (out.image_embeds * out.text_embeds).sum(-1)
        vs_texts = (scale * out.image_embeds @ negatives.text_embeds.T).logsumexp(-1)
        vs_images = (scale * out.text_embeds @ negatives.image_embeds.T).logsumexp(-1)
        return 2 * positive - vs_texts - vs_images

    want = loop_grads(model, reference, batch, names)
    for name in names:
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=1e-3, atol=1e-6)


def test_pool_is_embedded_under_each_checkpoint():
    model, data = tiny_clip(seed=0), pairs(12)
    other = tiny_clip(seed=1)
    checkpoints = [model.state_dict(), other.state_dict()]
    task = CLIPContrastive(data, pool_size=5, seed=3)
    features = GradientFeatures(
        model, task, make_projector("identity", None), params="logit_scale", progress=False
    )
    for index, checkpoint in enumerate(checkpoints):
        prepared = features.gradients_for(features.load(checkpoint), index).task
        want = CLIPNegatives.from_data(model, data, checkpoint, size=5, seed=3)
        torch.testing.assert_close(prepared.negatives.image_embeds, want.image_embeds)
        torch.testing.assert_close(prepared.negatives.text_embeds, want.text_embeds)
    assert task.negatives is None, "for_checkpoint must leave the task it is called on unchanged"
    first = CLIPNegatives.from_data(model, data, checkpoints[0], size=5, seed=3)
    second = CLIPNegatives.from_data(model, data, checkpoints[1], size=5, seed=3)
    assert not torch.allclose(first.image_embeds, second.image_embeds)
    # Explicit pools: one per checkpoint, and a clear error when one is missing.
    explicit = CLIPContrastive(pools=[first, second])
    assert explicit.for_checkpoint(model, 1).negatives is second
    with pytest.raises(ValueError, match="one CLIPNegatives per checkpoint"):
        explicit.for_checkpoint(model, 2)
    with pytest.raises(RuntimeError, match="for_checkpoint"):
        CLIPContrastive(data).output(model, data)
    with pytest.raises(ValueError, match="not both or neither"):
        CLIPContrastive()


class _RecordingTask(Task):
    """Test double: records the parameter it sees in for_checkpoint (tasks are otherwise
    stateless; the record is the point of the test)."""

    def __init__(self, seen):
        self.seen = seen

    def for_checkpoint(self, model, checkpoint):
        self.seen.append((checkpoint, model.logit_scale.detach().clone()))
        bound = copy.copy(self)
        bound.offset = model.logit_scale.detach().clone()
        return bound

    def output(self, model, batch):
        return model.logit_scale * batch["pixel_values"].sum((1, 2, 3)) + self.offset

    def out_to_loss(self, model, batch):
        return torch.ones(len(batch["pixel_values"]))


def test_for_checkpoint_is_called_once_per_checkpoint_with_its_parameters():
    model, data = tiny_clip(), pairs(6)
    states = [copy.deepcopy(model.state_dict()) for _ in range(2)]
    states[1]["logit_scale"] = torch.tensor(7.0)
    seen = []
    trak = TRAK(
        model,
        _RecordingTask(seen),
        projector="identity",
        params="logit_scale",
        progress=False,
        batch_size=2,
    )
    trak.fit(data, states)
    assert [c for c, _ in seen] == [0, 1]
    assert [float(v) for _, v in seen] == [float(states[0]["logit_scale"]), 7.0]


@pytest.fixture(scope="module")
def trained_clip():
    """A tiny CLIP fit contrastively to 32 random pairs."""
    data = pairs(32, seed=5)

    def loss(model):
        logits = model(**data).logits_per_image
        target = torch.arange(len(logits))
        return (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        ) / 2

    return train_steps(tiny_clip(seed=6), loss, steps=150, lr=1e-2), data


@pytest.mark.filterwarnings("ignore::datatrace.SingularKernelWarning")
def test_duplicated_training_pair_is_its_own_top_proponent(trained_clip):
    model, data = trained_clip
    task = CLIPContrastive(data, pool_size=None)
    # Small damping, as in tests/test_tasks_text.py.
    trak = TRAK(model, task, proj_dim=512, damping=1e-3, progress=False).fit(data)
    scores = trak.score(data).scores
    assert (scores / trak.out_to_loss_.mean(0)).argmax(1).tolist() == list(range(32))
    assert scores.argmax(1).tolist() == list(range(32))
