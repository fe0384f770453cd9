"""Tiny Hugging Face models built from configs, and helpers shared by the task tests."""

import torch
from torch import nn

VOCAB = 64
PAD = 0


def tiny_bert(num_labels=3, seed=0, attn="eager"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        attn_implementation=attn,
    )
    return BertForSequenceClassification(config).eval()


def tiny_distilbert(num_labels=3, seed=0):
    """A classifier whose forward takes no token_type_ids."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return DistilBertForSequenceClassification(config).eval()


def tiny_gpt2(seed=0, attn="eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=PAD,
        eos_token_id=1,
        decoder_start_token_id=PAD,
        attn_implementation="eager",
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=PAD,
        ),
        vision_config=dict(
            image_size=8,
            patch_size=4,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        projection_dim=8,
        attn_implementation="eager",
    )
    return CLIPModel(config).eval()


def padded_tokens(n, width, seed=0, low=3):
    """Random token ids ``(n, width)`` with right padding of random length, and the mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, VOCAB, (n, width), generator=generator)
    lengths = torch.randint(width // 2, width + 1, (n,), generator=generator)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def loop_grads(model, output_of_one, batch, names):
    """Reference per-example gradients: one torch.autograd.grad per example, of
    ``output_of_one(model, example)`` computed the model's usual way (no vmap)."""
    params = dict(model.named_parameters())
    n = len(next(iter(batch.values())))
    rows = []
    for i in range(n):
        example = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(
            output_of_one(model, example).sum(), [params[k] for k in names], allow_unused=True
        )
        rows.append([torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)])
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(names)}


def train_steps(model: nn.Module, loss_of_batch, steps, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of_batch(model).backward()
        optimizer.step()
    return model.eval()
