"""Choosing which parameters are differentiated."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

ParamSelection = str | nn.Module | Iterable[str | nn.Module] | None
"""Which parameters to attribute through: ``None`` for every parameter that requires grad; a name
pattern in ``fnmatch`` syntax (``"fc2.*"``, ``"encoder.layer.1[01].*"``); a submodule of the model;
or a list mixing patterns and submodules."""


def select_parameters(model: nn.Module, selection: ParamSelection = None) -> list[str]:
    """Names of the parameters of ``model`` chosen by ``selection``, in the model's order.

    Only these parameters are differentiated: the others enter the computation as constants,
    so autograd neither stores nor computes anything for them.

    Raises:
        ValueError: a pattern or module selects nothing, or the selection is empty.
    """
    named = dict(model.named_parameters())
    if selection is None:
        chosen = {name for name, param in named.items() if param.requires_grad}
    else:
        items = [selection] if isinstance(selection, (str, nn.Module)) else list(selection)
        chosen = set()
        for item in items:
            chosen |= _match(model, named, item)
    if not chosen:
        raise ValueError("the parameter selection is empty: no parameter would be differentiated")
    return [name for name in named if name in chosen]


def _match(model: nn.Module, named: dict[str, nn.Parameter], item: str | nn.Module) -> set[str]:
    if isinstance(item, str):
        found = {name for name in named if fnmatch.fnmatchcase(name, item)}
        if not found:
            examples = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise ValueError(
                f"the parameter pattern {item!r} matches no parameter of the model; its "
                f"parameters are named like: {examples}"
            )
        return found
    if isinstance(item, nn.Module):
        ids = {id(param) for param in item.parameters()}
        found = {name for name, param in named.items() if id(param) in ids}
        if not found:
            raise ValueError(
                f"the module {type(item).__name__} has no parameter of the model: pass a "
                "submodule of the model being attributed"
            )
        return found
    raise TypeError(
        f"cannot select parameters with a {type(item).__name__}: use name patterns or submodules"
    )
