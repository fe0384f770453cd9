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
    if not chosen and selection is None and named:
        raise ValueError(
            f"every parameter of the model ({len(named)} tensors) has requires_grad=False, so "
            "none is selected by default (a frozen model, or a PeftModel loaded without "
            "is_trainable=True): name the parameters to attribute through with params= (e.g. "
            "'*lora_*'), or pass the model as it was trained"
        )
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


def last_blocks(model: nn.Module, n: int = 2, head: bool = True) -> list[str]:
    """Names of the parameters of the last ``n`` blocks of each block stack, and of the head.

    A block stack is an ``nn.ModuleList`` of at least two modules of one type (a transformer's
    layers: ``bert.encoder.layer``, ``transformer.h``, T5's ``encoder.block`` and
    ``decoder.block``, CLIP's two towers). The head is every parameter of the modules registered
    after the last block of the last stack (final norm, pooler, classifier or LM head). A head
    tied to the input embeddings (GPT-2's and T5's ``lm_head``) is the same ``Parameter`` as the
    embedding, and ``model.named_parameters()`` lists it once, under the embedding's name
    (``transformer.wte.weight``, ``shared.weight``): it is selected under that name, and its
    gradient then holds both its uses, as output and as input embedding. Pass the result as
    ``params=`` to an estimator.

    Args:
        model: the model.
        n: blocks kept at the end of each stack.
        head: also select the parameters after the last stack.

    Returns:
        Names as ``model.named_parameters()`` gives them, in its order.

    Raises:
        ValueError: the model has no block stack, or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 block, got {n}")
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) >= 2
        and len({type(block) for block in module}) == 1
    ]
    # A stack nested inside a block of another stack (e.g. the sublayers of a T5 block) is part
    # of that block, not a stack of its own.
    stacks = [
        (name, module)
        for name, module in stacks
        if not any(name.startswith(other + ".") for other, _ in stacks if other != name)
    ]
    if not stacks:
        raise ValueError(
            "the model has no stack of blocks (an nn.ModuleList of modules of one type): "
            "select parameters with name patterns instead, e.g. params=['encoder.layer.5.*']"
        )
    chosen: set[int] = set()
    for _, stack in stacks:
        for block in list(stack)[-n:]:
            chosen |= {id(param) for param in block.parameters()}
    if head:
        # Every use of a parameter is listed here, so a tied head appears under its own
        # module's name (``lm_head.weight``) after the blocks, not only under the embedding's.
        every_use = list(model.named_parameters(remove_duplicate=False))
        last_stack_name = stacks[-1][0] + "."
        last_index = max(
            i for i, (name, _) in enumerate(every_use) if name.startswith(last_stack_name)
        )
        chosen |= {id(param) for _, param in every_use[last_index + 1 :]}
    return [name for name, param in model.named_parameters() if id(param) in chosen]
