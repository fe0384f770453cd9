"""glibc's allocator settings while featurizing (datatrace.grads.heap), each in a fresh process:
the settings are process-wide and cannot be undone."""

import os
import platform
import subprocess
import sys

import pytest

# Faults of the second 20 MiB block: a fresh process maps it anew (glibc's mmap threshold starts at
# 128 KiB and its trim threshold follows the largest freed mapping); with the settings it reuses
# the first block's pages.
SCRIPT = """
import resource, sys
import torch
from datatrace.grads import heap

torch.set_num_threads(1)
if sys.argv[1] == "fit":
    import datatrace as dt
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    data = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    dt.TRAK(model, dt.Classification(), proj_dim=16, progress=False).fit(data)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def touch():
    block = torch.empty(5 << 20)  # 20 MiB of float32
    block.fill_(1.0)
    del block

touch()
before = faults()
touch()
print(heap.tuning_active(), faults() - before)
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's",
)


def run(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("DATATRACE_MALLOC_TUNING", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env=clean | env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_featurizing_keeps_freed_blocks_for_reuse():
    active, faults = run("fit")
    assert active
    assert faults < 500  # the second block reuses the first one's pages (5,120 of them)
    # The same process without featurizing first pays for every page again.
    active, faults = run("none")
    assert active
    assert faults > 4000


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
    active, faults = run("fit", **env)
    assert not active
    if "DATATRACE_MALLOC_TUNING" in env:
        assert faults > 4000  # glibc's own behaviour: the block is mapped anew
