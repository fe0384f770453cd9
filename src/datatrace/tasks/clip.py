"""CLIP: the contrastive margin of an image–text pair against a pool of negatives.

For a pair with normalised embeddings ``u`` (image) and ``v`` (text), the model's logit scale
``s`` and a pool of negative pairs ``(U_j, V_j)`` embedded under the same checkpoint:

    m_image = s⟨u, v⟩ − logsumexp_j s⟨u, V_j⟩      (the pair's text against the pool's texts)
    m_text  = s⟨v, u⟩ − logsumexp_j s⟨v, U_j⟩      (the pair's image against the pool's images)
    f = m_image + m_text,   Q = (sigmoid(−m_image) + sigmoid(−m_text)) / 2

Each margin is that of the softmax cross-entropy of the CLIP loss with the pool as the batch's
other pairs: ``−log p = softplus(−m)``, ``∂(−log p)/∂m = −(1 − p) = −sigmoid(−m)``; ``Q`` is the
mean of the two directions' ``1 − p`` (as in the TRAK reference implementation). The pool's
embeddings are constants (computed once per checkpoint, without gradients), so the gradient of
``f`` flows through the pair's own embeddings only. Per-example gradients see one pair at a time,
so the other pairs of a batch cannot serve as negatives: the pool is what does.

The pool is an explicit object, :class:`CLIPNegatives`, built with the checkpoint it belongs to:
either by the task itself from pool data (``CLIPContrastive(pool_data)``: ``Task.for_checkpoint``
embeds the same sampled pairs under each checkpoint) or by the user, one per checkpoint, with
``CLIPNegatives.from_data(model, data, checkpoint)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from datatrace._arguments import non_negative_integer
from datatrace.data import Examples, batch_to
from datatrace.grads.checkpoints import Checkpoint, load_checkpoint
from datatrace.tasks._checks import cast_columns, check_id_columns
from datatrace.tasks._inputs import call_model, check_columns, model_dtype, model_inputs
from datatrace.tasks.base import Task

Embedder = Callable[[nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, ...]]
"""``embed(model, batch) -> (image_embeds, text_embeds, logit_scale)``: normalised
``(batch_size, d)`` embeddings and the scalar by which similarities are multiplied."""

DEFAULT_POOL_SIZE = 256
"""Pairs in a pool built from data: enough that the logsumexp over negatives is dominated by the
hard ones, small enough that embedding it once per checkpoint costs little."""

SAME_PAIR_COSINE = 1 - 1e-5
"""A pool pair whose image and text embeddings both have this cosine with the example's is the
example itself and is not used as its own negative."""

# CLIP-style models do not use bidirectional padding masks for their text tower (it is causal),
# but a 2-D ``attention_mask`` stays 2-D; no column is converted.
_NO_MASK_CONVERSION: tuple[str, ...] = ()


def hf_clip_embed(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Embeddings of a Hugging Face ``CLIPModel`` (or any model whose output has normalised
    ``image_embeds`` and ``text_embeds`` and which has a ``logit_scale`` parameter)."""
    output = call_model(model, model_inputs(batch, (), torch.float32, _NO_MASK_CONVERSION))
    return output.image_embeds, output.text_embeds, model.logit_scale.exp()


class CLIPNegatives:
    """A pool of negative pairs for :class:`CLIPContrastive`, embedded under one checkpoint.

    Args:
        image_embeds: ``(n_pool, d)`` normalised image embeddings.
        text_embeds: ``(n_pool, d)`` normalised text embeddings of the same pairs.
        checkpoint: optional label of the checkpoint they were computed under (informative).
    """

    def __init__(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, checkpoint: Any = None
    ):
        if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                "image_embeds and text_embeds must both be (n_pool, d) with the same shape, got "
                f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
            )
        if len(image_embeds) < 1:
            raise ValueError("the pool of negatives is empty: pass at least one pair")
        self.image_embeds = image_embeds.detach()
        self.text_embeds = text_embeds.detach()
        self.checkpoint = checkpoint

    def __len__(self) -> int:
        return len(self.image_embeds)

    def __repr__(self) -> str:
        return f"CLIPNegatives(n_pool={len(self)}, dim={self.image_embeds.shape[1]})"

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        data: Any,
        checkpoint: Checkpoint | None = None,
        *,
        size: int | None = DEFAULT_POOL_SIZE,
        seed: int = 0,
        batch_size: int = 64,
        embed: Embedder = hf_clip_embed,
        device: torch.device | str | None = None,
    ) -> CLIPNegatives:
        """Embed a sample of ``data`` under ``checkpoint`` (the model's own parameters if None).

        Args:
            model: the CLIP model; not modified.
            data: image–text pairs as a dict of columns (``pixel_values``, ``input_ids``, ...).
            checkpoint: state dict, module or file whose parameters embed the pool.
            size: pairs sampled (without replacement, seeded) from ``data``; ``None`` for all.
            seed: seed of the sample (the same pairs for every checkpoint).
            batch_size: pairs per forward pass.
            embed: how to get normalised embeddings and the logit scale from the model.
            device: where to run (default: the model's device).
        """
        # Imported here: datatrace.grads imports the tasks package.
        from datatrace.grads.per_example import module_state

        if device is None:
            device = next(model.parameters()).device
        bound = _Embed(model, embed)
        if checkpoint is None:
            run = bound
        else:
            state = module_state(model, load_checkpoint(checkpoint, model, device))
            params = {"model." + name: tensor for name, tensor in state.items()}

            def run(batch):
                return functional_call(bound, params, (batch,))

        training = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                images, texts = [], []
                for batch in _pool_batches(data, size, seed, batch_size):
                    image, text = run(batch_to(batch, device))
                    images.append(image)
                    texts.append(text)
        finally:
            for module, mode in training:
                module.training = mode
        label = checkpoint if isinstance(checkpoint, (str, int)) else None
        return cls(torch.cat(images), torch.cat(texts), label)

    def to(self, device: torch.device | str) -> CLIPNegatives:
        return CLIPNegatives(
            self.image_embeds.to(device), self.text_embeds.to(device), self.checkpoint
        )


class _Embed(nn.Module):
    def __init__(self, model: nn.Module, embed: Embedder):
        super().__init__()
        self.model = model
        self._embed = embed

    def forward(self, batch):
        image, text, _ = self._embed(self.model, batch)
        return image, text


def _pool_batches(data: Any, size: int | None, seed: int, batch_size: int):
    non_negative_integer("seed", seed, " (of the pool sample)")
    examples = Examples(data)
    if size is None or size >= examples.n:
        indices = np.arange(examples.n)
    else:
        indices = np.sort(np.random.default_rng(seed).choice(examples.n, size, replace=False))
    for lo in range(0, len(indices), batch_size):
        rows = [examples.read(int(i), int(i) + 1) for i in indices[lo : lo + batch_size]]
        yield {name: torch.cat([row[name] for row in rows]) for name in rows[0]}


def contrastive_margins(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    negatives: CLIPNegatives,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_image, m_text)`` of each pair against the pool, each ``(batch_size,)``.

    Args:
        image_embeds, text_embeds: ``(batch_size, d)`` normalised embeddings of the pairs.
        logit_scale: scalar multiplying cosine similarities.
        negatives: the pool, embedded under the same checkpoint.
    """
    pool_images = negatives.image_embeds.to(image_embeds)
    pool_texts = negatives.text_embeds.to(text_embeds)
    positive = logit_scale * (image_embeds * text_embeds).sum(-1)
    image_vs_texts = logit_scale * image_embeds @ pool_texts.T
    text_vs_images = logit_scale * text_embeds @ pool_images.T
    same_pair = (image_embeds @ pool_images.T > SAME_PAIR_COSINE) & (
        text_embeds @ pool_texts.T > SAME_PAIR_COSINE
    )
    blocked = torch.full_like(image_vs_texts, float("-inf"))
    image_vs_texts = torch.where(same_pair, blocked, image_vs_texts)
    text_vs_images = torch.where(same_pair, blocked, text_vs_images)
    return positive - image_vs_texts.logsumexp(-1), positive - text_vs_images.logsumexp(-1)


class CLIPContrastive(Task):
    """Attribute the contrastive margin of image–text pairs of a CLIP model.

    Batches are dicts of columns: the model's inputs (``pixel_values``, ``input_ids``,
    ``attention_mask``, ...) with one pair per row. See the module docstring for ``f`` and ``Q``.
    The text tower's causal mask needs eager attention (``attn_implementation="eager"``).

    Args:
        pool_data: pairs (a dict of columns) from which each checkpoint's pool of negatives is
            built by :meth:`for_checkpoint` (the same ``pool_size`` pairs, sampled with
            ``seed``, embedded under each checkpoint). Usually the training set.
        pools: instead of ``pool_data``, one :class:`CLIPNegatives` per checkpoint, in the order
            of the checkpoints given to ``fit`` (each built under its own checkpoint).
        pool_size: pairs sampled from ``pool_data`` (``None`` for all).
        seed: seed of that sample.
        embed: how to get normalised embeddings and the logit scale (default: HF ``CLIPModel``).
        ignore: columns that are not model inputs.
    """

    def __init__(
        self,
        pool_data: Any = None,
        *,
        pools: Sequence[CLIPNegatives] | None = None,
        pool_size: int | None = DEFAULT_POOL_SIZE,
        seed: int = 0,
        embed: Embedder = hf_clip_embed,
        ignore: Sequence[str] = (),
    ):
        if (pool_data is None) == (pools is None):
            raise ValueError(
                "give the negatives either as pool_data (pairs embedded under each checkpoint) "
                "or as pools=[CLIPNegatives per checkpoint], not both or neither"
            )
        if pools is not None:
            pools = list(pools)
            if not pools or not all(isinstance(p, CLIPNegatives) for p in pools):
                raise TypeError("pools must be a non-empty list of CLIPNegatives")
        self.pool_data = pool_data
        self.pools = pools
        self.pool_size = pool_size
        self.seed = seed
        self.embed = embed
        self.ignore = tuple(ignore)
        self.negatives: CLIPNegatives | None = pools[0] if pools and len(pools) == 1 else None

    def for_checkpoint(self, model: nn.Module, checkpoint: int) -> CLIPContrastive:
        """A copy of the task holding the pool of negatives of checkpoint ``checkpoint``
        (``model`` has that checkpoint's parameters in place)."""
        if self.pools is not None:
            if not 0 <= checkpoint < len(self.pools):
                raise ValueError(
                    f"no pool of negatives for checkpoint {checkpoint}: {len(self.pools)} "
                    "given. Pass one CLIPNegatives per checkpoint, in the order of the "
                    "checkpoints"
                )
            pool = self.pools[checkpoint]
        else:
            pool = CLIPNegatives.from_data(
                model, self.pool_data, size=self.pool_size, seed=self.seed, embed=self.embed
            )
        bound = copy.copy(self)
        bound.negatives = pool
        return bound

    def margins(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_image, m_text)`` of each pair, each ``(batch_size,)``."""
        if self.negatives is None:
            raise RuntimeError(
                "this CLIPContrastive has no pool of negatives for the current checkpoint: "
                "estimators prepare it per checkpoint; to call the task directly, use "
                "task.for_checkpoint(model, checkpoint_index).output(model, batch)"
            )
        batch = check_columns(batch, [], type(self).__name__)
        inputs = {k: v for k, v in batch.items() if k not in self.ignore}
        image, text, scale = self.embed(model, inputs)
        return contrastive_margins(image, text, scale, self.negatives)

    def check_batch(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """The batch checked (see :meth:`Task.check_batch`): a dict of columns, id columns
        (``input_ids``, ...) non-negative integers, floating columns (``pixel_values``) in the
        model's dtype. No forward pass: CLIP batches carry no labels."""
        batch = check_columns(batch, [], type(self).__name__)
        checked = cast_columns(batch, model_dtype(model), keep=self.ignore)
        checked.update(check_id_columns(checked))
        return checked

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        image_margin, text_margin = self.margins(model, batch)
        return image_margin + text_margin

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return clip_out_to_loss(*self.margins(model, batch))

    def output_and_out_to_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_margin, text_margin = self.margins(model, batch)
        weights = clip_out_to_loss(image_margin.detach(), text_margin.detach())
        return image_margin + text_margin, weights

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "negatives": "pools" if self.pools is not None else "pool_data",
            "n_pools": None if self.pools is None else len(self.pools),
            "pool_size": self.pool_size,
            "seed": self.seed,
            "embed": getattr(self.embed, "__qualname__", type(self.embed).__name__),
        }


def clip_out_to_loss(image_margin: torch.Tensor, text_margin: torch.Tensor) -> torch.Tensor:
    """``Q``: the mean of ``sigmoid(−margin)`` of the two directions, ``(batch_size,)``."""
    return (torch.sigmoid(-image_margin) + torch.sigmoid(-text_margin)) / 2
