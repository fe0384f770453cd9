"""The diffusion task against the scheduler's own noising and a loop of torch.autograd.grad."""

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from diffusers import DDPMScheduler

from datatrace.applications.diffusion import DiffusionTargets, DiffusionTrainingExamples
from datatrace.applications.diffusion.training import digits_images, tiny_text_unet, tiny_unet
from datatrace.grads import PerExampleGradients, select_parameters
from datatrace.tasks.diffusion import (
    OUTPUT_FUNCTIONS,
    Diffusion,
    add_noise,
    denoising_target,
)

N_CLASSES = 10
# The CPU attention kernel has no vmap batching rule: torch warns ("There is a performance
# drop") and loops over examples; the tests with attention silence that warning.
TEXT_TOKENS, TEXT_DIM = 5, 12


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def images():
    return digits_images(8)[0][:6]


def batch_of(examples, indices):
    items = [examples[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_noising_and_targets_match_the_scheduler(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 3, 5, 5, generator=generator)
    noise = torch.randn(7, 3, 5, 5, generator=generator)
    timesteps = torch.randint(0, 1000, (7,), generator=generator)
    torch.testing.assert_close(
        add_noise(scheduler.alphas_cumprod, x0, noise, timesteps),
        scheduler.add_noise(x0, noise, timesteps),
    )
    want = {
        "epsilon": noise,
        "sample": x0,
        "v_prediction": scheduler.get_velocity(x0, noise, timesteps),
    }[prediction_type]
    got = denoising_target(prediction_type, scheduler.alphas_cumprod, x0, noise, timesteps)
    torch.testing.assert_close(got, want)


def reference_outputs(model, scheduler, batch):
    """One example and one draw at a time, noised by the scheduler's own add_noise."""
    values = {"loss": [], "square_norm": [], "l2_norm": [], "linf_norm": []}
    for x0, timesteps, noise in zip(batch["x0"], batch["timesteps"], batch["noise"]):
        totals = dict.fromkeys(values, 0.0)
        for t, eps in zip(timesteps, noise):
            t = t.reshape(1)
            prediction = model(scheduler.add_noise(x0[None], eps[None], t), t).sample
            totals["loss"] -= torch.nn.functional.mse_loss(prediction, eps[None]).item()
            totals["square_norm"] += prediction.pow(2).mean().item()
            totals["l2_norm"] += prediction.norm().item()
            totals["linf_norm"] += prediction.abs().max().item()
        for name, total in totals.items():
            values[name].append(total)
    return {name: torch.tensor(rows) for name, rows in values.items()}


def test_outputs_match_an_independent_computation(scheduler, images):
    model = tiny_unet(block_out_channels=(8, 16)).eval()
    examples = DiffusionTrainingExamples(images, scheduler, n_timesteps=3, seed=4)
    batch = batch_of(examples, range(len(images)))
    with torch.no_grad():
        want = reference_outputs(model, scheduler, batch)
        for output, expected in want.items():
            task = Diffusion(scheduler, output)
            torch.testing.assert_close(task.output(model, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.out_to_loss(model, batch), torch.ones(len(images)))


def test_draw_weights_average_the_targets_draws(scheduler, images):
    model = tiny_unet(block_out_channels=(8, 16)).eval()
    targets = DiffusionTargets(images, 300, n_draws=4, seed=2)
    batch = batch_of(targets, range(len(images)))
    torch.testing.assert_close(batch["draw_weights"], torch.full((len(images), 4), 0.25))
    task = Diffusion(scheduler)
    summed = {key: value for key, value in batch.items() if key != "draw_weights"}
    with torch.no_grad():
        per_draw = task.per_draw(model, batch)
        torch.testing.assert_close(task.output(model, batch), per_draw.mean(1))
        torch.testing.assert_close(task.output(model, summed), per_draw.sum(1))
        with pytest.raises(ValueError, match="draw_weights"):
            task.output(model, {**batch, "draw_weights": batch["draw_weights"][:, :2]})


class PlainDenoiser(nn.Module):
    """Not a diffusers model: ``model(x_t, t)`` returns a bare tensor, and with
    ``learned_variance`` twice the channels (the prediction, then the variance)."""

    def __init__(self, learned_variance: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2 if learned_variance else 1, 3, padding=1)
        self.time = nn.Linear(1, 1)

    def forward(self, sample, timestep):
        scale = self.time(timestep.float().reshape(-1, 1) / 1000).reshape(-1, 1, 1, 1)
        return self.conv(sample) * scale


@pytest.mark.parametrize("learned_variance", [False, True])
def test_any_denoiser_with_the_same_call_signature(scheduler, images, learned_variance):
    model = PlainDenoiser(learned_variance)
    examples = DiffusionTrainingExamples(images, scheduler, n_timesteps=3, seed=5)
    batch = batch_of(examples, range(len(images)))
    want = []
    with torch.no_grad():
        for x0, timesteps, noise in zip(batch["x0"], batch["timesteps"], batch["noise"]):
            noisy = scheduler.add_noise(x0.expand(3, -1, -1, -1), noise, timesteps)
            prediction = model(noisy, timesteps)[:, :1]
            want.append(-((prediction - noise) ** 2).flatten(1).mean(1).sum())
        got = Diffusion(scheduler).output(model, batch)
    torch.testing.assert_close(got, torch.stack(want))
    names = [name for name, _ in model.named_parameters()]
    task = Diffusion(scheduler, "square_norm")
    per_example = PerExampleGradients(model, task, names).gradients(model.state_dict(), batch)
    loop = loop_gradients(model, task, names, batch)
    for name in names:
        torch.testing.assert_close(per_example[name], loop[name], rtol=1e-4, atol=1e-6)


def loop_gradients(model, task, names, batch):
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(batch["x0"])):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        grads = torch.autograd.grad(task.output(model, one).sum(), [params[n] for n in names])
        rows.append(dict(zip(names, grads)))
    return {n: torch.stack([row[n] for row in rows]) for n in names}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(
    ("attention", "conditional", "output"),
    [
        (False, False, "loss"),
        (False, False, "square_norm"),
        (False, False, "linf_norm"),
        (True, True, "loss"),
    ],
    ids=["unet-loss", "unet-square-norm", "unet-linf-norm", "attention-class-conditional"],
)
def test_per_example_gradients_match_autograd_loop(
    scheduler, images, attention, conditional, output
):
    model = tiny_unet(
        block_out_channels=(8, 16),
        attention=attention,
        num_class_embeds=N_CLASSES if conditional else None,
        seed=1,
    ).eval()
    condition = {"class_labels": torch.arange(len(images)) % N_CLASSES} if conditional else None
    examples = DiffusionTrainingExamples(
        images, scheduler, n_timesteps=2, seed=0, condition=condition
    )
    batch = batch_of(examples, range(len(images)))
    task = Diffusion(scheduler, output)
    names = select_parameters(model, ["conv_in.*", "*time_embedding*", "conv_out.*"])
    got = PerExampleGradients(model, task, names).gradients(model.state_dict(), batch)
    want = loop_gradients(model, task, names, batch)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    assert any(want[name].abs().max() > 0 for name in names)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_text_conditional_gradients_match_autograd_loop(scheduler, images):
    model = tiny_text_unet(TEXT_DIM).eval()
    embeddings = torch.randn(
        len(images), TEXT_TOKENS, TEXT_DIM, generator=torch.Generator().manual_seed(0)
    )
    examples = DiffusionTrainingExamples(
        images, scheduler, n_timesteps=2, seed=1, condition={"encoder_hidden_states": embeddings}
    )
    batch = batch_of(examples, range(len(images)))
    assert batch["encoder_hidden_states"].shape == (len(images), TEXT_TOKENS, TEXT_DIM)
    task = Diffusion(scheduler)
    # The cross-attention keys see the model only through the text embeddings.
    names = select_parameters(model, ["conv_in.*", "*attn2.to_k*", "conv_out.*"])
    got = PerExampleGradients(model, task, names).gradients(model.state_dict(), batch)
    want = loop_gradients(model, task, names, batch)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    keys = [name for name in names if "attn2.to_k" in name]
    assert keys and all(want[name].abs().max() > 0 for name in keys)
    with torch.no_grad():
        other_text = {**batch, "encoder_hidden_states": batch["encoder_hidden_states"].flip(0)}
        assert not torch.allclose(task.output(model, batch), task.output(model, other_text))


def test_class_conditional_model_needs_its_labels(scheduler, images):
    model = tiny_unet(block_out_channels=(8, 16), num_class_embeds=N_CLASSES).eval()
    task = Diffusion(scheduler)
    labelled = DiffusionTrainingExamples(
        images,
        scheduler,
        n_timesteps=2,
        condition={"class_labels": torch.zeros(len(images), dtype=torch.long)},
    )
    unlabelled = DiffusionTrainingExamples(images, scheduler, n_timesteps=2)
    with torch.no_grad():
        first = task.output(model, batch_of(labelled, [0]))
        relabelled = {**batch_of(labelled, [0]), "class_labels": torch.tensor([3])}
        assert not torch.allclose(first, task.output(model, relabelled))
        with pytest.raises(ValueError, match="class_labels"):
            task.output(model, batch_of(unlabelled, [0]))


def test_config_and_errors(scheduler):
    task = Diffusion(scheduler, "square_norm")
    config = task.config()
    assert config["output"] == "square_norm" and config["num_train_timesteps"] == 1000
    other = Diffusion(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    assert other.config()["schedule"] != config["schedule"]
    with pytest.raises(ValueError, match="unknown diffusion output"):
        Diffusion(scheduler, "likelihood")
    with pytest.raises(TypeError, match="alphas_cumprod"):
        Diffusion(object())
    assert set(OUTPUT_FUNCTIONS) >= {"loss", "square_norm"}
