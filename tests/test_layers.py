"""The package's layers (DESIGN.md, Architecture): each imports only the layers before it.

The known exceptions are listed with their reason; a new import against the data flow fails here
and has to be either removed or added below with a reason.
"""

import ast
from pathlib import Path

import datatrace

PACKAGE = Path(datatrace.__file__).parent

# In data-flow order; the store and the result object are one layer.
LAYERS = [
    "tasks",
    "grads",
    "store|attributions",
    "methods",
    "evaluation",
    "subsets",
    "applications",
    "report|cli|demo",
]

# (importing module, imported module prefix): why the import runs against the data flow.
EXCEPTIONS = {
    # The CLIP task computes its embedding at a checkpoint and reuses grads' module state.
    ("datatrace.tasks.clip", "datatrace.grads"),
    # A language-model helper returns per-token scores as an Attributions object.
    ("datatrace.tasks.language_model", "datatrace.attributions"),
    # Featurization writes chunks, partial Grams and provenance into the store.
    ("datatrace.grads.featurize", "datatrace.store"),
    # Sharded featurization: chunks go to the store through subsets' backends and row claims,
    # and whether a partial Gram is primal or dual follows the kernel's rule.
    ("datatrace.grads.distributed", "datatrace.store"),
    ("datatrace.grads.distributed", "datatrace.subsets.backends"),
    ("datatrace.grads.distributed", "datatrace.subsets.claims"),
    ("datatrace.grads.distributed", "datatrace.methods.kernel"),
    # The store keeps the kernel's statistics and neighbour diagnostics next to the Gram.
    ("datatrace.store.store", "datatrace.methods.kernel"),
    # Estimators take a backend to shard featurization (DESIGN: backends "also used to shard
    # featurization"); the backend protocol lives with subsets.
    ("datatrace.methods.trak", "datatrace.subsets.backends"),
    ("datatrace.methods.baselines", "datatrace.subsets.backends"),
    # Datamodels choose λ by cross-validating the LDS and predict subset outputs with it.
    ("datatrace.methods.datamodels", "datatrace.evaluation.lds"),
    # Counterfactual removal trains models on masks through a subset experiment.
    ("datatrace.evaluation.counterfactual", "datatrace.subsets"),
    # The diffusion application writes its report with the shared HTML and image helpers.
    ("datatrace.applications.diffusion.report", "datatrace.report"),
}


# Top-level modules, by the layer they belong to: the estimator base is the methods' (it builds
# featurizers and stores), the fit command's configuration the CLI's; the rest sit below every
# layer and import none of them.
TOP_LEVEL = {"_estimator": "methods", "fit_config": "cli"}
BELOW_EVERY_LAYER = {"_arguments", "_moved", "_settings", "_subset_data", "data", "progress"}


def _layer(module: str) -> int | None:
    """The layer's index; -1 below every layer; ``None`` for what is not datatrace's."""
    parts = module.split(".")
    if parts[0] != "datatrace":
        return None
    if len(parts) == 1:  # ``from datatrace import X``: the public names, re-exported from the top
        return len(LAYERS) - 1
    name = TOP_LEVEL.get(parts[1], parts[1])
    if parts[1] in BELOW_EVERY_LAYER:
        return -1
    for i, names in enumerate(LAYERS):
        if name in names.split("|"):
            return i
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "datatrace" or name.startswith("datatrace.")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def test_every_module_belongs_to_a_layer():
    for module, _ in _modules():
        if module != "datatrace":
            assert _layer(module) is not None, (
                f"{module} is in no layer of DESIGN.md's layout; move it into one (or name its "
                "layer in TOP_LEVEL)"
            )


def test_no_import_against_the_data_flow():
    wrong = []
    for module, path in _modules():
        mine = _layer(module)
        if mine is None or module == "datatrace":
            continue
        for imported in _imports(path):
            theirs = _layer(imported)
            if theirs is None or theirs <= mine:
                continue
            if any(module == a and imported.startswith(b) for a, b in EXCEPTIONS):
                continue
            wrong.append(f"{module} imports {imported}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_exceptions_are_still_needed():
    present = {(module, imported) for module, path in _modules() for imported in _imports(path)}
    stale = [
        (a, b) for a, b in EXCEPTIONS if not any(m == a and i.startswith(b) for m, i in present)
    ]
    assert not stale, f"exceptions no longer used, remove them: {stale}"


def test_public_names_resolve_to_what_their_modules_define():
    import importlib

    for name, module in datatrace._EXPORTS.items():
        assert getattr(datatrace, name) is getattr(importlib.import_module(module), name)
        assert _layer(module) is not None, f"{name} is exported from {module}, outside the layers"
