"""Tasks: what output of a model is attributed (``output``), its out-to-loss weight, and the
checks of a batch before it is featurized (``check_batch``)."""

from datatrace.tasks._checks import InputDtypeWarning
from datatrace.tasks.base import Task
from datatrace.tasks.classification import (
    Classification,
    ClassLogit,
    centred_class_logit,
    classification_margin,
    margin_out_to_loss,
    per_class_targets,
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
from datatrace.tasks.regression import Regression
from datatrace.tasks.text import TextClassification

__all__ = [
    "IGNORE_INDEX",
    "CLIPContrastive",
    "CLIPNegatives",
    "CausalLM",
    "ClassLogit",
    "Classification",
    "Diffusion",
    "InputDtypeWarning",
    "Regression",
    "Seq2SeqLM",
    "Task",
    "TextClassification",
    "TokenRows",
    "causal_lm_examples",
    "centred_class_logit",
    "classification_margin",
    "contrastive_margins",
    "margin_out_to_loss",
    "per_class_targets",
    "per_token_targets",
    "score_per_token",
    "seq2seq_examples",
    "token_margins",
]
