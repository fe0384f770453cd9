"""Low-rank adapters (LoRA): only the adapters are differentiated, through the layer hooks, and a
checkpoint may hold the adapters alone."""

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from datatrace.grads.factorized import FactorizationWarning


class LoRALinear(nn.Module):
    """A frozen linear layer plus ``scale · B A x``, as PEFT builds it."""

    def __init__(self, inputs, outputs, rank=3, scale=0.5):
        super().__init__()
        self.base = nn.Linear(inputs, outputs).requires_grad_(False)
        self.lora_A = nn.Linear(inputs, rank, bias=False)
        self.lora_B = nn.Linear(rank, outputs, bias=False)
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))


class Adapted(nn.Module):
    """Tokens → embedding (frozen) → two adapted layers at every position → mean → head (frozen)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8).requires_grad_(False)
        self.first = LoRALinear(8, 8)
        self.second = LoRALinear(8, 8)
        self.head = nn.Linear(8, 3).requires_grad_(False)

    def forward(self, ids):
        hidden = torch.tanh(self.first(self.embed(ids)))
        return self.head(torch.tanh(self.second(hidden)).mean(1))


def adapted(seed=0):
    torch.manual_seed(seed)
    model = Adapted().double()
    with torch.no_grad():  # a fresh B is zero in PEFT; a trained one is not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model.eval()


def data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (n, 6), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def adapters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def scores(model, projector, checkpoints=None, proj_dim=4096):
    trak = dt.TRAK(
        model, dt.Classification(), projector=projector, proj_dim=proj_dim,
        damping_absolute=1e-3, progress=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", FactorizationWarning)
        trak.fit(data(40, 1), checkpoints)
    return trak, trak.score(data(5, 2)).scores


def test_only_the_adapters_are_differentiated_through_the_hooks_exactly():
    model = adapted()
    trak, got = scores(model, "auto")
    assert trak.features_.param_names == [
        "first.lora_A.weight", "first.lora_B.weight", "second.lora_A.weight",
        "second.lora_B.weight",
    ]  # fmt: skip
    rows = {row["name"]: row["path"] for row in trak.features_.projector.layout()}
    assert all(rows[name] != "vmap" for name in trak.features_.param_names), rows
    _, want = scores(model, "identity")  # the adapters' exact per-example gradients
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_a_checkpoint_of_the_adapters_alone_takes_the_frozen_weights_from_the_model():
    model, other = adapted(), adapted(seed=1)
    _, own = scores(model, "auto", [model.state_dict()])
    _, from_adapters = scores(model, "auto", [adapters(model)])
    np.testing.assert_array_equal(from_adapters, own)
    # other adapters on the same frozen weights: other scores, equal to loading them in place
    _, swapped = scores(model, "auto", [adapters(other)])
    loaded = adapted()
    loaded.load_state_dict({**loaded.state_dict(), **adapters(other)})
    _, want = scores(loaded, "auto")
    np.testing.assert_allclose(swapped, want, rtol=1e-6, atol=1e-9)
    assert not np.allclose(swapped, own)
    # a trainable parameter missing is still refused
    partial = adapters(model)
    partial.pop("second.lora_B.weight")
    with pytest.raises(ValueError, match=re.escape("missing parameters second.lora_B.weight")):
        scores(model, "auto", [partial])


def test_peft_models_and_adapter_checkpoints():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from datatrace.tasks import causal_lm_examples

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip

    def lora(seed):
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(config)
        settings = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(base, settings)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.2)
        return model.eval()

    gen = torch.Generator().manual_seed(1)
    continuations = torch.randint(1, 50, (12, 5), generator=gen).tolist()
    train = causal_lm_examples([[1, 2]] * 12, continuations, pad_token_id=0)
    model = lora(0)

    def fit(projector, checkpoints=None):
        trak = dt.TRAK(
            model, dt.CausalLM(), projector=projector, proj_dim=4096, damping_absolute=1e-3,
            progress=False,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", FactorizationWarning)
            return trak.fit(train, checkpoints).score(train).scores

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in name for name in names)
    got, want = fit("auto"), fit("identity")
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    # Adapter checkpoints: another adapter as a module, and as its model's trainable entries.
    other = lora(1)
    as_module = fit("auto", [other])
    as_entries = fit("auto", [{n: p for n, p in other.state_dict().items() if ".lora_" in n}])
    np.testing.assert_array_equal(as_module, as_entries)
    assert not np.allclose(as_module, got)
    # PEFT's own adapter format (adapter names left out) is refused with how to load it.
    saved = peft.get_peft_model_state_dict(other)
    with pytest.raises(ValueError, match=re.escape("PeftModel.from_pretrained")):
        fit("auto", [saved])


def test_a_model_with_every_parameter_frozen_is_refused_with_advice():
    model = adapted().requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False.*params="):
        dt.TRAK(model, dt.Classification(), progress=False).fit(data(8, 1))
    trak = dt.TRAK(model, dt.Classification(), params="*lora_*", progress=False).fit(data(8, 1))
    assert len(trak.features_.param_names) == 4
