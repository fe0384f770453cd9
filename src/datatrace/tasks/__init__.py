"""Tasks: what output of a model is attributed (``output``) and its out-to-loss weight."""

from datatrace.tasks.base import Task
from datatrace.tasks.classification import (
    Classification,
    classification_margin,
    margin_out_to_loss,
)

__all__ = ["Classification", "Task", "classification_margin", "margin_out_to_loss"]
