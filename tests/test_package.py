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


def test_the_module_paths_before_the_layout_still_import_the_same_objects():
    import importlib
    import pickle
    import subprocess
    import sys
    import warnings

    from datatrace._moved import MOVED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old, new in MOVED.items():
            module = importlib.import_module(new)
            stand_in = importlib.import_module(old)
            public = [n for n in dir(module) if not n.startswith("_")]
            assert public and all(getattr(stand_in, n) is getattr(module, n) for n in public), old
        from datatrace.evaluate import lds

        from datatrace.methods.datamodels import Datamodels

        assert lds is importlib.import_module("datatrace.evaluation.lds").lds
        # a pickle written when Datamodels lived in datatrace.datamodels
        old_pickle = pickle.dumps(Datamodels(), protocol=0).replace(  # text: no lengths
            b"datatrace.methods.datamodels", b"datatrace.datamodels"
        )
        assert b"datatrace.datamodels" in old_pickle
        assert type(pickle.loads(old_pickle)) is Datamodels
    # the attribute form, in a fresh interpreter, warns once and names the new path
    code = (
        "import warnings, datatrace.trak\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert datatrace.trak.TRAK is datatrace.TRAK\n"
        "assert any('datatrace.methods.trak' in str(x.message) for x in w), w\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
