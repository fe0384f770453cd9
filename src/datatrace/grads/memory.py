"""The batch size of featurizing from a memory budget (``batch_size="auto"``).

Featurizing one batch holds, besides the model's parameters and buffers:

- the tensors autograd saves for the backward pass, and the gradients flowing back through them:
  measured, not guessed: a forward pass of the task's output on a probe of 1 and of 2 examples,
  with every selected parameter requiring gradients (what featurizing differentiates), counts
  the bytes of the distinct tensors that autograd saves
  (``torch.autograd.graph.saved_tensors_hooks``); the difference is the part that grows with
  the batch (weights saved for the backward pass do not). Per example, ``ACTIVATION_FACTOR``
  times that: the saved tensors, the gradients of the same size in the backward pass, and the
  hooked layers' inputs and output gradients that the factorised projections read;
- per-example gradients where they are formed: ``PER_EXAMPLE_GRADIENT_FACTOR × p × itemsize``
  for the parameters that go through vmap (all of them for the ``sparse``, ``dense`` and other
  per-example projectors), for the gradient and the projection's working copy;
- the factorised blocks' products (``Σ_t`` of the masked or whole factors, and the sparse JL's
  working copy of them): ``PRODUCT_FACTOR × Σ_l k'_out·k'_in × itemsize``;
- the features: ``FEATURE_FACTOR × k × 4`` bytes per example (float32 features, their float64
  energies in the pilot pass, the concatenation).

The batch size is the largest ``B ≤ MAX_AUTO_BATCH`` (and ``≤ n``) with
``fixed + B · per_example ≤ budget``, rounded down to a multiple of 8 above 8 (vectorised kernels
like aligned sizes). The budget defaults to half the free memory of a CUDA device, or, on the
CPU, a quarter of the available RAM capped at ``DEFAULT_CPU_BUDGET``. It is an estimate: the
allocator's fragmentation and temporary buffers of individual kernels are not counted, so the
budget is what featurizing is sized to, not a hard limit; ``benchmarks/perf_featurize.py
--batch-size MODEL=auto`` reports the peak next to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from datatrace.data import batch_size_of, map_tensors
from datatrace.grads.per_example import _Bound, _eval_mode, module_state
from datatrace.tasks.base import Task

# Bytes per example of featurizing, in units of the saved activations of one example.
ACTIVATION_FACTOR = 3
# ... in units of the per-example gradient of the vmap path's parameters.
PER_EXAMPLE_GRADIENT_FACTOR = 3
# ... in units of the products one example's factorised blocks form before their sparse JL.
PRODUCT_FACTOR = 2
# ... in units of the float32 features of one example.
FEATURE_FACTOR = 4
# The largest batch "auto" picks: beyond it, a batch is no faster per example.
MAX_AUTO_BATCH = 1024
# The CPU budget when none is given: at most this much (and at most a quarter of what is free).
DEFAULT_CPU_BUDGET = 4 << 30


def default_budget(device: torch.device) -> int:
    """Bytes featurizing may use on ``device`` when no budget is given."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return min(DEFAULT_CPU_BUDGET, available_ram() // 4)


def available_ram() -> int:
    """Free RAM in bytes (``MemAvailable`` on Linux; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def saved_bytes(
    model: nn.Module,
    task: Task,
    param_names: Sequence[str],
    state: Mapping[str, torch.Tensor],
    batch: Any,
) -> int:
    """Bytes of the distinct tensors autograd saves in one forward pass of ``task.output`` on
    ``batch``, differentiating ``param_names``."""
    params = {"model." + name: t.detach() for name, t in module_state(model, state).items()}
    for name in param_names:
        params["model." + name].requires_grad_(True)
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device.type)
        seen[key] = max(seen.get(key, 0), storage.nbytes())
        return tensor

    with _eval_mode(model), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            functional_call(_Bound(model, task.output), params, (batch,))
    return sum(seen.values())


def activation_bytes(
    model: nn.Module,
    task: Task,
    param_names: Sequence[str],
    state: Mapping[str, torch.Tensor],
    batch: Any,
) -> tuple[int, int]:
    """``(fixed, per_example)`` saved bytes, from probes of the first 1 and 2 examples of
    ``batch`` (copied, so that a probe's storage is its own); everything counts per example
    when ``batch`` holds a single one."""

    def probe(count: int) -> int:
        few = map_tensors(lambda tensor: tensor[:count].clone(), batch)
        return saved_bytes(model, task, param_names, state, few)

    one = probe(1)
    if batch_size_of(batch) < 2:
        return 0, one
    per_example = max(probe(2) - one, 0)
    return max(one - per_example, 0), per_example


def choose_batch_size(fixed: int, per_example: int, budget: int, n: int) -> int:
    """The largest batch within ``budget`` (module docstring), between 1 and ``min(n,
    MAX_AUTO_BATCH)``."""
    room = budget - fixed
    largest = room // max(per_example, 1) if room > 0 else 1
    size = int(max(1, min(largest, n, MAX_AUTO_BATCH)))
    return size - size % 8 if size > 8 else size
