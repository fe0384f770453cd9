"""The public surface: every exported name resolves, optional dependencies stay optional."""

import subprocess
import sys

import datatrace

OPTIONAL = ("transformers", "diffusers", "ray")  # the extras hf, diffusion and ray


def test_every_public_name_resolves():
    missing = [name for name in datatrace.__all__ if not hasattr(datatrace, name)]
    assert missing == []
    assert len(set(datatrace.__all__)) == len(datatrace.__all__)


def test_importing_datatrace_imports_no_optional_dependency():
    probe = f"import sys, datatrace; print(','.join(m for m in {OPTIONAL!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"`import datatrace` imported {loaded}: import them where they are used"
