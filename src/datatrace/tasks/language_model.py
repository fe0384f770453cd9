"""Language modelling: attribute the continuation of a prompt, token by token or as a whole.

The output of a (prompt, continuation) pair is the sum over its continuation tokens of the
per-token margin ``m_t = log p_t/(1 − p_t) = logit_{y_t} − logsumexp_{v≠y_t} logit_v``, with
``p_t`` the model's probability of the token ``y_t`` that actually follows. Prompt and padding
tokens carry the label ``ignore_index`` (−100, as in Hugging Face ``labels``) and count for
nothing.

Out-to-loss weight. The training loss of a sequence is ``L = Σ_t −log p_t = Σ_t softplus(−m_t)``,
so ``∂L/∂m_t = −(1 − p_t)``: every token has its own weight. A single ``Q`` with
``∂L/∂f = −Q`` for ``f = Σ_t m_t`` exists when the margins move together (``dm_t = df/T``), and
then ``dL = −Σ_t (1 − p_t) df/T``, i.e. ``Q = mean_t (1 − p_t)`` over the continuation tokens.
That is the weight used here (each ``1 − p_t`` computed as ``sigmoid(−m_t)``, without cancellation).
With one target token per row (:func:`per_token_targets`) the weight is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.attributions import Attributions
from datatrace.tasks._checks import (
    ID_COLUMNS,
    cast_columns,
    check_id_columns,
    input_vocab_size,
    integer_values,
    run_on_first_example,
)
from datatrace.tasks._inputs import (
    BIDIRECTIONAL_MASKS,
    call_model,
    check_columns,
    model_dtype,
    model_inputs,
    output_field,
)
from datatrace.tasks.base import Task
from datatrace.tasks.classification import classification_margin, margin_curvature

IGNORE_INDEX = -100
"""Label of tokens that are not attributed (prompt and padding), as in Hugging Face ``labels``."""

TOKEN_POSITION = "token_position"
"""Column that restricts each row to one labelled token (its position in ``labels``); added by
:func:`per_token_targets`. The labels themselves stay whole, so that a seq2seq decoder still
reads the true previous tokens."""


_EMPTY_PROMPT_FIX = (
    "a causal LM predicts each token from the tokens before it, so nothing predicts the first "
    "token of a sequence. The prompt needs at least one token: start it with a BOS token "
    "(e.g. tokenizer.bos_token_id)"
)


def token_margins(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token margins ``logit_y − logsumexp_{v≠y} logit_v`` of the labelled tokens.

    Args:
        logits: ``(batch_size, seq_len, vocab_size)``; position ``t`` predicts ``labels[:, t]``.
        labels: ``(batch_size, seq_len)`` token ids, ``ignore_index`` where not attributed.

    Returns:
        ``(margins, counted)``, both ``(batch_size, seq_len)``: the margins (0 where ignored)
        and a float mask of the attributed tokens.
    """
    counted = labels != ignore_index
    safe_labels = torch.where(counted, labels, torch.zeros_like(labels))
    margins = classification_margin(logits.flatten(0, 1), safe_labels.flatten()).view_as(labels)
    counted = counted.to(margins.dtype)
    return margins * counted, counted


def sequence_output(margins: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``f = Σ_t m_t`` over attributed tokens, ``(batch_size,)``."""
    return (margins * counted).sum(-1)


def sequence_out_to_loss(margins: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``Q = mean_t (1 − p_t) = mean_t sigmoid(−m_t)`` over attributed tokens (0 if none)."""
    weights = torch.sigmoid(-margins) * counted
    return weights.sum(-1) / counted.sum(-1).clamp_min(1)


class _LanguageModel(Task):
    """Shared by the causal and seq2seq tasks: the margins of the labelled tokens."""

    bidirectional_masks: tuple[str, ...] = ()

    # Positions by which the logits lag the labels they predict.
    label_shift = 0

    def __init__(
        self,
        label_key: str = "labels",
        logits_key: str = "logits",
        ignore_index: int = IGNORE_INDEX,
        ignore: Sequence[str] = (),
        position_key: str = TOKEN_POSITION,
    ):
        self.label_key = label_key
        self.logits_key = logits_key
        self.ignore_index = ignore_index
        self.ignore = tuple(ignore)
        self.position_key = position_key

    def _inputs(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict:
        excluded = (self.label_key, self.position_key, *self.ignore)
        return model_inputs(batch, excluded, model_dtype(model), self.bidirectional_masks)

    def _aligned(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T, V)`` and the labels ``(B, T)`` they predict."""
        raise NotImplementedError

    def token_margins(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margins, counted)`` of every label position, each ``(batch_size, seq_len)``.

        With a ``position_key`` column, only the token at that position of ``labels`` counts.
        """
        batch = check_columns(batch, [self.label_key], type(self).__name__)
        logits, labels = self._aligned(model, batch)
        if self.position_key in batch:
            position = batch[self.position_key] - self.label_shift
            only = torch.arange(labels.shape[1], device=labels.device)[None, :] == position[:, None]
            labels = torch.where(only, labels, torch.full_like(labels, self.ignore_index))
        return token_margins(logits, labels, self.ignore_index)

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return sequence_output(*self.token_margins(model, batch))

    def check_batch(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """The batch checked (see :meth:`Task.check_batch`): ``labels`` ``(batch_size,
        seq_len)`` integers, each ``ignore_index`` or a token id below the vocabulary size (the
        last dimension of the logits of one forward pass of the first sequence, which also shows
        whether the inputs fit the model); id columns non-negative integers; other floating
        columns in the model's dtype."""
        name = type(self).__name__
        batch = check_columns(batch, [self.label_key], name)
        what = f"the labels (column {self.label_key!r})"
        keep = (self.label_key, self.position_key, *self.ignore)
        checked = cast_columns(batch, model_dtype(model), keep=keep)
        columns = (*ID_COLUMNS, self.position_key)
        checked.update(check_id_columns(checked, columns, input_vocab_size(model)))
        hint = f"labels are token ids (or {self.ignore_index} where a token is not attributed)"
        labels = integer_values(batch[self.label_key], what, hint)
        checked[self.label_key] = labels
        if labels.dim() != 2:
            raise ValueError(
                f"{what} have shape {tuple(labels.shape)}: {name} takes (batch_size, seq_len) "
                "token ids, one row per sequence"
            )
        input_ids = checked.get("input_ids")
        if self.label_shift and input_ids is not None and input_ids.shape != labels.shape:
            raise ValueError(
                f"{what} have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}: "
                f"{name} reads labels[t] as the token at position t of input_ids (the model "
                "shifts them), so both have one entry per position; causal_lm_examples builds "
                "them"
            )
        attributed = labels != self.ignore_index
        negative = attributed & (labels < 0)
        if negative.any():
            raise ValueError(
                f"{what} hold {int(labels[negative][0])}, neither a token id nor ignore_index "
                f"({self.ignore_index}): mark the tokens that are not attributed (prompt, "
                "padding) with ignore_index"
            )
        # The probe needs no labels (a seq2seq decoder reads them): none, so that labels out of
        # range reach the check below rather than the model.
        probe = {key: value for key, value in checked.items() if key != self.position_key}
        probe[self.label_key] = torch.full_like(labels, self.ignore_index)
        logits, _ = run_on_first_example(model, self._aligned, probe, name)
        vocab_size = logits.shape[-1]
        too_large = attributed & (labels >= vocab_size)
        if too_large.any():
            raise ValueError(
                f"{what} hold the token id {int(labels[too_large][0])}, out of range: the "
                f"model's logits cover {vocab_size} tokens (ids 0 … {vocab_size - 1}). Use "
                "the model's own tokenizer"
            )
        return checked

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return sequence_out_to_loss(*self.token_margins(model, batch))

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray:
        """``Q(1 − Q)`` of the sequence's ``Q = mean_t σ(−m_t)``: the cross-entropy's curvature
        in one token's margin, with the sequence's mean ``Q`` in place of each token's (the
        tokens' own are not kept)."""
        return margin_curvature(out_to_loss)

    def output_and_out_to_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        margins, counted = self.token_margins(model, batch)
        return sequence_output(margins, counted), sequence_out_to_loss(margins.detach(), counted)

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "label_key": self.label_key,
            "logits_key": self.logits_key,
            "ignore_index": self.ignore_index,
            "ignore": list(self.ignore),
            "position_key": self.position_key,
        }


class CausalLM(_LanguageModel):
    """Attribute a decoder-only (GPT-style) model's continuation of a prompt.

    Batches are dicts of tensors: ``input_ids`` (prompt then continuation, padded), the model's
    other inputs (``attention_mask``, ...) and ``labels``: the same token ids where a token is
    attributed and ``ignore_index`` on prompt and padding tokens (:func:`causal_lm_examples`
    builds them). As in Hugging Face, ``labels[t]`` is predicted by the logits at ``t − 1``, so
    a label at position 0 is never predicted and counts for nothing: give every sequence a
    prompt of at least one token (a BOS token).
    The model must use eager attention (``attn_implementation="eager"``): transformers builds
    causal masks for SDPA with a branch on tensor values that ``vmap`` cannot take.

    Args:
        label_key: the column of labels.
        logits_key: the field of the model's output holding ``(B, T, V)`` logits.
        ignore_index: label of tokens that are not attributed.
        ignore: other columns that are not model inputs.
    """

    label_shift = 1

    def _aligned(self, model, batch):
        logits = output_field(call_model(model, self._inputs(model, batch)), self.logits_key)
        return logits[:, :-1], batch[self.label_key][:, 1:]


class Seq2SeqLM(_LanguageModel):
    """Attribute an encoder-decoder (T5-style) model's output sequence given its input.

    Batches are dicts of tensors: the encoder's ``input_ids`` and ``attention_mask`` (the prompt)
    and ``labels``, the target token ids padded with ``ignore_index`` (:func:`seq2seq_examples`
    builds them). ``decoder_input_ids`` are the labels shifted right behind the model's
    ``decoder_start_token_id`` (padding as ``pad_token_id``), as in the model's own training,
    unless the batch holds a ``decoder_input_ids`` column. Logits at ``t`` predict ``labels[t]``.
    The decoder's causal masks need eager attention (``attn_implementation="eager"``).

    Args: as :class:`CausalLM`.
    """

    bidirectional_masks = BIDIRECTIONAL_MASKS

    def _aligned(self, model, batch):
        labels = batch[self.label_key]
        inputs = self._inputs(model, batch)
        if "decoder_input_ids" not in inputs:
            inputs["decoder_input_ids"] = self._shift_right(model, labels)
        logits = output_field(call_model(model, inputs), self.logits_key)
        return logits, labels

    def _shift_right(self, model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        # Written without in-place writes so that it runs under vmap (T5's own version does not).
        config = getattr(model, "config", None)
        start = getattr(config, "decoder_start_token_id", None)
        pad = getattr(config, "pad_token_id", None)
        if start is None or pad is None:
            raise ValueError(
                "cannot build decoder_input_ids: the model's config has no "
                "decoder_start_token_id or pad_token_id. Add a decoder_input_ids column to the "
                "batch (the labels shifted right behind the start token)"
            )
        first = torch.full_like(labels[:, :1], start)
        shifted = torch.cat([first, labels[:, :-1]], dim=1)
        return torch.where(shifted == self.ignore_index, torch.full_like(shifted, pad), shifted)


def _token_lists(
    prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and continuations as lists of Python ints (from lists, tensors or arrays).

    Raises:
        ValueError: different counts, none, or token ids that are not integers.
    """
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations must have the same length")
    if not len(prompts):
        raise ValueError("prompts and continuations are empty: give at least one example")
    converted = []
    for what, lists in (("prompt", prompts), ("continuation", continuations)):
        rows = []
        for row, ids in enumerate(lists):
            ids = ids.tolist() if torch.is_tensor(ids) or isinstance(ids, np.ndarray) else list(ids)
            if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
                raise ValueError(
                    f"{what} {row} holds {ids[:5]}: token ids must be integers (encode texts "
                    "with the tokenizer first)"
                )
            rows.append([int(i) for i in ids])
        converted.append(rows)
    return converted[0], converted[1]


def causal_lm_examples(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """A causal-LM batch of (prompt, continuation) pairs of token ids, right-padded.

    Every prompt needs at least one token: a causal LM predicts the token at ``t`` from the
    tokens before it, so with an empty prompt nothing would predict the first continuation
    token. To attribute a whole sequence, use the tokenizer's BOS token as the prompt.

    Args:
        prompts: ``n`` lists of token ids, each non-empty.
        continuations: ``n`` lists of token ids to attribute, each non-empty.
        pad_token_id: id written on padding positions of ``input_ids``.
        ignore_index: label of prompt and padding tokens.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``(n, max_len)``; ``labels`` holds
        the continuation's ids and ``ignore_index`` on prompt and padding.

    Raises:
        ValueError: the lengths differ, or a prompt or continuation is empty.
    """
    prompts, continuations = _token_lists(prompts, continuations)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {row} is empty: {_EMPTY_PROMPT_FIX}")
    sequences = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), ignore_index, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        if not continuation:
            raise ValueError(f"continuation {row} is empty: there is nothing to attribute")
        n_prompt, n_total = len(prompt), len(prompt) + len(continuation)
        input_ids[row, :n_total] = torch.tensor(sequences[row])
        attention_mask[row, :n_total] = 1
        labels[row, n_prompt:n_total] = torch.tensor(list(continuation))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def seq2seq_examples(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """A seq2seq batch: prompts as encoder inputs, continuations as labels (right-padded).

    Returns:
        ``{"input_ids", "attention_mask"}`` ``(n, max_prompt_len)`` and ``labels``
        ``(n, max_continuation_len)`` padded with ``ignore_index``.
    """
    prompts, continuations = _token_lists(prompts, continuations)
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(
                f"prompt {row} is empty: the encoder needs at least one token (e.g. the "
                "tokenizer's EOS token)"
            )
    n = len(prompts)
    prompt_width = max(len(p) for p in prompts)
    label_width = max(len(c) for c in continuations)
    input_ids = torch.full((n, prompt_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, prompt_width), dtype=torch.long)
    labels = torch.full((n, label_width), ignore_index, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        if not continuation:
            raise ValueError(f"continuation {row} is empty: there is nothing to attribute")
        input_ids[row, : len(prompt)] = torch.tensor(list(prompt))
        attention_mask[row, : len(prompt)] = 1
        labels[row, : len(continuation)] = torch.tensor(list(continuation))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class TokenRows:
    """Which target and token each row of a per-token batch stands for.

    Attributes:
        target: ``(n_rows,)`` row of the original batch.
        position: ``(n_rows,)`` position of the token in that row's ``labels``.
        token: ``(n_rows,)`` the token id.
    """

    target: np.ndarray
    position: np.ndarray
    token: np.ndarray

    def as_info(self) -> dict[str, list[int]]:
        return {
            "target": self.target.tolist(),
            "position": self.position.tolist(),
            "token": self.token.tolist(),
        }


def per_token_targets(
    batch: Mapping[str, torch.Tensor],
    label_key: str = "labels",
    ignore_index: int = IGNORE_INDEX,
    position_key: str = TOKEN_POSITION,
) -> tuple[dict[str, torch.Tensor], TokenRows]:
    """One row per attributed token: each row repeats its sequence, and a ``position_key``
    column says which of its labelled tokens the row attributes.

    Attributing these rows with :class:`CausalLM` or :class:`Seq2SeqLM` gives per-token
    attributions: row ``r`` explains the margin of token ``rows.token[r]`` at
    ``rows.position[r]`` of ``labels`` in target ``rows.target[r]``.

    Args:
        batch: columns of ``n_targets`` rows, with ``labels`` ``(n_targets, seq_len)``.
        label_key: the column of labels.
        ignore_index: label of tokens that are not attributed.
        position_key: name of the added column of token positions.

    Returns:
        ``(rows_batch, rows)``: the expanded batch (``n_rows`` rows, every column repeated, plus
        ``position_key``) and the :class:`TokenRows` that say which target and token each row is.

    Raises:
        ValueError: a sequence has no attributed token (it would get no row at all).
    """
    labels = batch[label_key]
    attributed = labels != ignore_index
    empty = torch.nonzero(~attributed.any(dim=1)).flatten().tolist()
    if empty:
        raise ValueError(
            f"sequence {empty[0]} of the batch has no attributed token: all its {label_key!r} "
            f"are ignore_index ({ignore_index}), so it would get no per-token row"
            + (f" (nor would sequences {empty[1:]})" if len(empty) > 1 else "")
            + ". Label at least one token of it (e.g. its continuation), or drop it from the batch"
        )
    targets, positions = torch.nonzero(attributed, as_tuple=True)
    expanded = {name: column[targets] for name, column in batch.items()}
    expanded[position_key] = positions
    tokens = labels[targets, positions]
    return expanded, TokenRows(targets.numpy(), positions.numpy(), tokens.numpy())


def score_per_token(
    estimator: Any,
    batch: Mapping[str, torch.Tensor],
    label_key: str = "labels",
    ignore_index: int = IGNORE_INDEX,
    position_key: str = TOKEN_POSITION,
) -> Attributions:
    """Per-token attributions of a fitted estimator (e.g. ``TRAK``) for a batch of sequences.

    Args:
        estimator: a fitted estimator whose task is :class:`CausalLM` or :class:`Seq2SeqLM`.
        batch: ``n_targets`` sequences, as for the estimator's ``score``; every sequence needs
            at least one attributed token, and (causal LM) none at position 0 of ``labels``.
        label_key, ignore_index, position_key: as in :func:`per_token_targets`.

    Returns:
        :class:`~datatrace.Attributions` with one row per attributed token, ``(n_rows, n_train)``;
        ``info["token_rows"]`` holds the ``target``, ``position`` and ``token`` of each row.

    Raises:
        ValueError: a sequence has no attributed token, or a causal LM's token is attributed at
            a position that no earlier token predicts (an empty prompt).
    """
    expanded, rows = per_token_targets(batch, label_key, ignore_index, position_key)
    # A causal LM's logits lag its labels: a token labelled before that lag has no logits, and
    # its row would be all zeros.
    label_shift = getattr(getattr(estimator, "task", None), "label_shift", 0)
    unpredicted = rows.target[rows.position < label_shift]
    if len(unpredicted):
        raise ValueError(
            f"sequence {int(unpredicted[0])} of the batch attributes its first token (position "
            f"0 of {label_key!r}; an empty prompt): {_EMPTY_PROMPT_FIX}"
        )
    result = estimator.score(expanded)
    return Attributions(
        result.scores,
        result.method,
        result.out_to_loss,
        {**result.info, "token_rows": rows.as_info()},
    )
