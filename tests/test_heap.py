"""glibc's allocator settings while featurizing (datatrace.grads.heap), each in a fresh process:
the settings are process-wide and cannot be undone."""

import os
import platform
import subprocess
import sys

import pytest

# Page faults of a batch-like pattern (four 20 MiB blocks alive at once, then freed), in its
# fourth round, after a fit: with the settings the heap keeps the freed pages; with glibc's own
# (after the fit's allocations) the round usually maps and zeroes the 80 MiB again.
SCRIPT = """
import resource, sys
import torch
from datatrace.grads import heap

torch.set_num_threads(1)
import datatrace as dt
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 4))
data = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
dt.TRAK(model, dt.Classification(), proj_dim=16, progress=False).fit(data)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def batch():
    blocks = [torch.empty(5 << 20) for _ in range(4)]
    for block in blocks:
        block.fill_(1.0)
    del blocks

for _ in range(3):
    batch()
before = faults()
batch()
print(heap.tuning_active(), faults() - before)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)


def run(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("DATATRACE_MALLOC_TUNING", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_featurizing_keeps_freed_blocks_for_reuse():
    active, faults = run()
    assert active
    assert faults < 500  # the round reuses the earlier rounds' pages
    # With glibc's own settings the round maps and zeroes its 20,480 pages again in most runs
    # (measured: 4 of 6; in the others glibc's dynamic thresholds happened to keep them), so
    # that is not asserted.


@glibc_only
@pytest.mark.parametrize(
    "env",
    [
        {"DATATRACE_MALLOC_TUNING": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "1048576"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
    ],
    ids=["opt-out", "user-variable", "tunable"],
)
def test_users_settings_are_left_alone(env):
    active, _ = run(**env)
    assert not active
