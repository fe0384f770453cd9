"""The built-in demo and the bundled data, models and training loop it uses.

Also used by the examples, benchmarks and tests, so that every figure the project reports comes
from the same data and the same training code.
"""

from datatrace.demo.data import Split, digits_split
from datatrace.demo.models import DigitsCNN, DigitsMLP, make_model
from datatrace.demo.run import DemoConfig, DemoResult, run_demo
from datatrace.demo.training import accuracy, train_checkpoints, train_classifier

__all__ = [
    "DemoConfig",
    "DemoResult",
    "DigitsCNN",
    "DigitsMLP",
    "Split",
    "accuracy",
    "digits_split",
    "make_model",
    "run_demo",
    "train_checkpoints",
    "train_classifier",
]
