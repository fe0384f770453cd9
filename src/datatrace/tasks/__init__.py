"""Tasks: what output of a model is attributed (``output``) and its out-to-loss weight."""

from datatrace.tasks.base import Task
from datatrace.tasks.classification import (
    Classification,
    classification_margin,
    margin_out_to_loss,
)
from datatrace.tasks.clip import CLIPContrastive, CLIPNegatives, contrastive_margins
from datatrace.tasks.diffusion import Diffusion
from datatrace.tasks.language_model import (
    IGNORE_INDEX,
    CausalLM,
    Seq2SeqLM,
    TokenRows,
    causal_lm_examples,
    per_token_targets,
    score_per_token,
    seq2seq_examples,
    token_margins,
)
from datatrace.tasks.text import TextClassification

__all__ = [
    "IGNORE_INDEX",
    "CLIPContrastive",
    "CLIPNegatives",
    "CausalLM",
    "Classification",
    "Diffusion",
    "Seq2SeqLM",
    "Task",
    "TextClassification",
    "TokenRows",
    "causal_lm_examples",
    "classification_margin",
    "contrastive_margins",
    "margin_out_to_loss",
    "per_token_targets",
    "score_per_token",
    "seq2seq_examples",
    "token_margins",
]
