"""Attribute a tiny CLIP's image–caption matches to its training pairs.

A CLIP model built from a ``CLIPConfig`` (a 2-layer vision transformer on 8×8 images and a 2-layer
text transformer, ~100 k parameters) is trained contrastively on the bundled digits, each image
paired with a caption such as "a handwritten seven" or "the digit seven drawn by hand". TRAK
explains the contrastive margin of test pairs (``CLIPContrastive``: the pair's similarity
against a pool of negatives embedded under each checkpoint) in terms of training pairs.
About two minutes on one CPU thread::

    pip install "datatrace[hf]"
    python examples/clip_digits.py              # --help for options
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from datatrace import TRAK
from datatrace.demo import digits_split
from datatrace.tasks import CLIPContrastive

DIGITS = "zero one two three four five six seven eight nine".split()
TEMPLATES = (
    "a handwritten {}",
    "the digit {} drawn by hand",
    "a small picture of a {}",
    "number {} written with a pen",
)
SPECIAL = ["<pad>", "<bos>", "<unk>", "<eos>"]  # eos is not id 2: CLIP reads id 2 as "legacy"
VOCAB = {
    w: i
    for i, w in enumerate(
        SPECIAL + sorted({w for t in TEMPLATES for w in t.split()} - {"{}"} | set(DIGITS))
    )
}


def captions(labels: torch.Tensor, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(DIGITS[int(y)]) for y in labels]


def encode(texts: list[str]) -> dict[str, torch.Tensor]:
    ids = [[VOCAB["<bos>"], *(VOCAB[w] for w in t.split()), VOCAB["<eos>"]] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, sequence in enumerate(ids):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def tiny_clip(seed: int) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        pad_token_id=VOCAB["<pad>"],
        bos_token_id=VOCAB["<bos>"],
        eos_token_id=VOCAB["<eos>"],
    )
    vision = dict(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=32, attn_implementation="eager"
    )
    return CLIPModel(config)


def train_clip(pairs: dict, seed: int, epochs: int, batch_size: int = 128) -> nn.Module:
    model = tiny_clip(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    n = len(pairs["input_ids"])
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(n, generator=generator).split(batch_size):
            logits = model(**{k: v[rows] for k, v in pairs.items()}).logits_per_image
            target = torch.arange(len(rows))
            loss = (
                nn.functional.cross_entropy(logits, target)
                + nn.functional.cross_entropy(logits.T, target)
            ) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    prompts = encode([TEMPLATES[0].format(d) for d in DIGITS])
    text = model.get_text_features(**prompts)
    image = model.get_image_features(pixel_values=images)
    text = getattr(text, "pooler_output", text)
    image = getattr(image, "pooler_output", image)
    similarity = nn.functional.normalize(image, dim=-1) @ nn.functional.normalize(text, dim=-1).T
    return float((similarity.argmax(1) == labels).float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=256)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    train_split, test_split = digits_split()
    train_split = train_split.subset(range(args.n_train))
    train_captions = captions(train_split.labels, seed=0)
    test_captions = captions(test_split.labels, seed=1)
    train = {"pixel_values": train_split.images, **encode(train_captions)}
    test = {"pixel_values": test_split.images[:20], **encode(test_captions[:20])}

    models = [train_clip(train, seed, args.epochs) for seed in range(args.checkpoints)]
    accuracy = zero_shot_accuracy(models[0], test_split.images, test_split.labels)
    print(
        f"{args.checkpoints} CLIP models trained on {args.n_train} pairs "
        f"({time.perf_counter() - started:.0f} s); zero-shot test accuracy {accuracy:.2f}"
    )

    # --- Attribution: the lines to write for a CLIP model of your own. ---------------------
    task = CLIPContrastive(train, pool_size=args.pool_size)  # negatives: 256 training pairs,
    trak = TRAK(models[0], task, proj_dim=args.proj_dim)  # embedded under each checkpoint
    trak.fit(train, [m.state_dict() for m in models])
    attributions = trak.score(test)  # (n_test_pairs, n_train_pairs)
    # ---------------------------------------------------------------------------------------
    print(f"attributed in {time.perf_counter() - started:.0f} s in all\n")

    for j in range(4):
        print(
            f"TEST pair {j}: image of a {DIGITS[int(test_split.labels[j])]}, "
            f"caption {test_captions[j]!r}"
        )
        ranking = attributions.proponents(j, k=3)
        for i, score in zip(ranking.indices, ranking.scores):
            print(
                f"   +{score:9.4f} train pair {i}: image of a "
                f"{DIGITS[int(train_split.labels[i])]}, caption {train_captions[i]!r}"
            )
    top = attributions.top(5).indices
    same = (train_split.labels[torch.as_tensor(top)] == test_split.labels[:20, None]).float()
    print(
        f"\nof the top-5 proponents of the 20 test pairs, {same.mean():.0%} show the same digit "
        f"(10% by chance)"
    )


if __name__ == "__main__":
    main()
