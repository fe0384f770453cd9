"""Malformed data through the estimators, featurization and `datatrace unlearn`.

Each case, drawn by hypothesis, must get a ValueError or TypeError whose message says what is
wrong and what to do, and must write nothing: the store directory passed is not created, or stays
byte for byte what it was. Models are tiny (a linear classifier of 4 features, 3 classes).
"""

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

import datatrace as dt
from _hf_models import VOCAB, padded_tokens, tiny_bert, tiny_gpt2
from datatrace.cli import app
from datatrace.grads.featurize import FINGERPRINT_EXAMPLES
from datatrace.tasks import IGNORE_INDEX, InputDtypeWarning, causal_lm_examples

pytestmark = pytest.mark.usefixtures("one_thread")

N_FEATURES, N_CLASSES = 4, 3
# Chunks of two batches: a later batch of the training set is featurized after chunk 0 is stored.
# More training examples than the provenance fingerprints, so that a fixed label can resume.
N_TRAIN, BATCH, CHUNK = FINGERPRINT_EXAMPLES + 8, 2, 4
N_TARGETS = 6
EXAMPLES = settings(max_examples=25, deadline=None)
ESTIMATORS = (dt.TRAK, dt.GradientDot)


@dataclass(frozen=True)
class Malformed:
    """Data (a data set or one column of it) wrong in one way, the error it must raise and
    fragments of that error's message.

    Attributes:
        row: the example that is wrong, where only one is (else ``None``).
    """

    value: Any
    error: type[Exception]
    fragments: tuple[str, ...]
    row: int | None = None


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file and folder under ``path`` with its bytes (``b""`` for a folder); for a file,
    its own bytes; ``None`` where nothing is there."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {
        str(entry.relative_to(path)): entry.read_bytes() if entry.is_file() else b""
        for entry in sorted(path.rglob("*"))
    }


def assert_refused(call, error: type[Exception], fragments, *untouched: Path) -> None:
    """``call()`` raises ``error`` with each of ``fragments`` in its message, and each path of
    ``untouched`` is after the call exactly what it was before."""
    before = [snapshot(path) for path in untouched]
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{missing} not in the message: {message}"
    assert [snapshot(path) for path in untouched] == before, f"written before: {message}"


# -- malformed labels ----------------------------------------------------------------------------


def classes(n: int, n_classes: int) -> st.SearchStrategy[torch.Tensor]:
    return st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n).map(torch.tensor)


@st.composite
def bad_label_values(
    draw, n: int, n_classes: int, rows: st.SearchStrategy[int], batch: int, base=None
):
    """Labels ``(n,)`` (``base``, or drawn) with one row (drawn from ``rows``) that is not a
    class of a model of ``n_classes`` logits: too large, negative, not a whole number, NaN or
    infinite. The data is checked in batches of ``batch`` rows, so messages name the row within
    its batch."""
    labels = draw(classes(n, n_classes)) if base is None else base.clone()
    row = draw(rows)
    at = f"example {row}"
    kind = draw(st.sampled_from(["too large", "negative", "fraction", "not finite"]))
    if kind == "too large":
        labels[row] = value = draw(st.integers(n_classes, 1000))
        fragments = (
            f"hold {value} (at {at}), out of range",
            f"outputs {n_classes} logits",
            f"class indices 0 … {n_classes - 1}",
            "subtract 1",
        )
        return Malformed(labels, ValueError, fragments, row)
    if kind == "negative":
        labels[row] = value = draw(st.integers(-1000, -1))
        fragments = (f"negative value ({value} at {at})", "class indices 0, 1, …, n_classes − 1")
        return Malformed(labels, ValueError, fragments, row)
    labels = labels.to(draw(st.sampled_from([torch.float32, torch.float64])))
    if kind == "fraction":
        # Fractions down to a rounding error (0.1 · 3 · 10 = 3.0000000000000004), shown in full.
        labels[row] += draw(st.floats(1e-15, 0.99))
        assume(labels[row] != labels[row].round())
    else:
        labels[row] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    fragments = (
        "floating point and not whole numbers",
        f"({labels[row].numpy()!s} at {at})",
        "pass hard classes",
    )
    return Malformed(labels, ValueError, fragments, row)


@st.composite
def bad_label_shapes(draw, n: int, n_classes: int, batch: int):
    """Labels of ``n`` examples that are not one class per example: a column ``(n, 1)``,
    one-hot or soft ``(n, C)``, or with more dimensions. The data is checked in batches of
    ``batch`` rows, so messages give the shape per example, ``(n, ...)``."""
    labels = draw(classes(n, n_classes))
    rows = "n"
    kind = draw(st.sampled_from(["column", "one-hot", "soft", "3-d"]))
    if kind == "column":
        fragments = (f"have shape ({rows}, 1)", f"shape ({rows},)", "labels.squeeze(1)")
        return Malformed(labels[:, None], ValueError, fragments)
    if kind == "one-hot":
        dtype = draw(st.sampled_from([torch.int64, torch.float32]))
        one_hot = nn.functional.one_hot(labels, n_classes).to(dtype)
        return Malformed(one_hot, ValueError, ("look one-hot", "labels.argmax(1)"))
    if kind == "soft":
        seed = draw(st.integers(0, 2**16))
        scores = torch.rand(n, n_classes, generator=torch.Generator().manual_seed(seed)) + 0.1
        fragments = ("Soft labels or per-class scores are not supported", "argmax(1)")
        return Malformed(scores / scores.sum(1, keepdim=True), ValueError, fragments)
    shape = (n, *draw(st.lists(st.integers(1, 3), min_size=2, max_size=3)))
    labels = labels.reshape(n, *[1] * (len(shape) - 1)).expand(shape)
    fragments = (
        f"have shape (n, {', '.join(map(str, shape[1:]))})",
        f"expected one integer class per example, shape ({rows},)",
    )
    return Malformed(labels, ValueError, fragments)


@st.composite
def bad_label_lengths(draw, n: int, n_classes: int):
    """Labels of another number of examples than the inputs."""
    length = draw(st.integers(1, 2 * n).filter(lambda length: length != n))
    fragments = (f"different lengths {sorted({length, n})}", "one row per example")
    return Malformed(draw(classes(length, n_classes)), ValueError, fragments)


def complex_labels(n: int, n_classes: int) -> st.SearchStrategy[Malformed]:
    fragments = ("are complex numbers", "pass hard classes")
    return classes(n, n_classes).map(
        lambda labels: Malformed(labels.to(torch.complex64), TypeError, fragments)
    )


def malformed_labels(n: int, first_batch: int) -> st.SearchStrategy[Malformed]:
    """Labels of ``n`` examples for the 3-class model, malformed so that the estimators' check
    of the first batch (``first_batch`` rows) refuses them."""
    return st.one_of(
        bad_label_values(n, N_CLASSES, st.integers(0, first_batch - 1), first_batch),
        bad_label_shapes(n, N_CLASSES, first_batch),
        bad_label_lengths(n, N_CLASSES),
        complex_labels(n, N_CLASSES),
    )


# -- classification through the estimators --------------------------------------------------------


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(N_FEATURES, N_CLASSES)


MODEL = linear_model()


def dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_FEATURES, generator=generator), torch.arange(n) % N_CLASSES


TRAIN, TARGETS = dataset(N_TRAIN, 0), dataset(N_TARGETS, 1)


def estimator(
    kind,
    store: Path | None,
    model: nn.Module = MODEL,
    task=None,
    batch_size=BATCH,
    projector="auto",
):
    task = dt.Classification() if task is None else task
    return kind(
        model,
        task,
        projector=projector,
        proj_dim=8,
        store=store,
        batch_size=batch_size,
        chunk_size=CHUNK,
        progress=False,
    )


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Each estimator fitted on TRAIN into a store on disk: kind → (estimator, store path)."""
    stores = {}
    for kind in ESTIMATORS:
        path = tmp_path_factory.mktemp("fitted") / "store"
        stores[kind] = (estimator(kind, path).fit(TRAIN), path)
    return stores


@EXAMPLES
@given(bad=malformed_labels(N_TRAIN, BATCH), kind=st.sampled_from(ESTIMATORS))
def test_malformed_training_labels_are_refused_and_no_store_is_created(bad, kind, tmp_path_factory):
    store = tmp_path_factory.mktemp("refused") / "store"
    fit = estimator(kind, store).fit
    assert_refused(lambda: fit((TRAIN[0], bad.value)), bad.error, bad.fragments, store)
    assert not store.exists()


@EXAMPLES
@given(
    bad=st.one_of(
        bad_label_values(N_TARGETS, N_CLASSES, st.integers(0, N_TARGETS - 1), BATCH),
        bad_label_shapes(N_TARGETS, N_CLASSES, BATCH),
    ),
    kind=st.sampled_from(ESTIMATORS),
)
def test_malformed_target_labels_are_refused_and_the_store_is_unchanged(bad, kind, fitted):
    # A bad label in a later batch of the targets is refused by featurization, not by the
    # estimator's check of the first batch: both before the scores are saved.
    fitted_estimator, store = fitted[kind]
    saved = {"name": "refused"} if kind is dt.TRAK else {}  # TRAK saves named scores
    score = partial(fitted_estimator.score, (TARGETS[0], bad.value), **saved)
    assert_refused(score, bad.error, bad.fragments, store)


@pytest.fixture(scope="module")
def clean_fit(tmp_path_factory):
    """The features TRAIN gets, and the scores of TARGETS, with the per-example projector
    (``"sparse"``, which featurizes nothing before the first chunk: the default's split is
    measured on the first examples, whose batches are checked then)."""
    store = tmp_path_factory.mktemp("clean") / "store"
    fitted_estimator = estimator(dt.TRAK, store, projector="sparse").fit(TRAIN)
    features = zarr.open_group(str(store), mode="r")["features/0/features"][:]
    return features, fitted_estimator.score(TARGETS).scores


@EXAMPLES
@given(bad=bad_label_values(N_TRAIN, N_CLASSES, st.integers(BATCH, N_TRAIN - 1), BATCH, TRAIN[1]))
def test_a_bad_label_in_a_later_batch_stops_before_its_chunk_is_stored(
    bad, clean_fit, tmp_path_factory
):
    store = tmp_path_factory.mktemp("later") / "store"
    with pytest.raises(bad.error) as raised:
        estimator(dt.TRAK, store, projector="sparse").fit((TRAIN[0], bad.value))
    message = str(raised.value)
    assert all(fragment in message for fragment in bad.fragments), message
    if bad.row < FINGERPRINT_EXAMPLES:
        # The examples the provenance fingerprints are checked before the store is created, so
        # that it never records a bad one (and then refuses the corrected data).
        assert not store.exists()
        return
    group = zarr.open_group(str(store), mode="r")
    finished = bad.row // CHUNK  # the chunks before the bad row's
    n_chunks = -(-N_TRAIN // CHUNK)
    assert group["features/0/done"][:].tolist() == [1] * finished + [0] * (n_chunks - finished)
    clean_features, clean_scores = clean_fit
    np.testing.assert_array_equal(
        group["features/0/features"][: finished * CHUNK], clean_features[: finished * CHUNK]
    )
    # With the label fixed (in the same dtype: the store recognises its training set by its
    # values), the store resumes from its finished chunks to the clean scores.
    fixed = bad.value.clone()
    fixed[bad.row] = TRAIN[1][bad.row]
    resumed = estimator(dt.TRAK, store, projector="sparse").fit((TRAIN[0], fixed))
    resumed = resumed.score(TARGETS).scores
    np.testing.assert_array_equal(resumed, clean_scores)


@EXAMPLES
@given(bad=bad_label_values(N_TRAIN, N_CLASSES, st.integers(0, N_TRAIN - 1), BATCH, TRAIN[1]))
def test_the_per_layer_projector_refuses_bad_pilot_examples_before_storing_features(
    bad, tmp_path_factory
):
    # The per-layer projectors (the default for large models) measure their split of k on the
    # first examples (PILOT_EXAMPLES, more than this training set): their batches are checked
    # then, before any feature is stored.
    store = tmp_path_factory.mktemp("pilot") / "store"
    with pytest.raises(bad.error) as raised:
        estimator(dt.TRAK, store, projector="tensorsketch").fit((TRAIN[0], bad.value))
    message = str(raised.value)
    assert all(fragment in message for fragment in bad.fragments), message
    assert not (store / "features").exists()


@EXAMPLES
@given(
    input_dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16]),
    label_dtype=st.sampled_from([torch.int32, torch.uint8, torch.float32, torch.float64]),
)
def test_other_dtypes_are_converted_and_score_as_converted_by_hand(input_dtype, label_dtype):
    (inputs, labels), (target_inputs, target_labels) = TRAIN, TARGETS
    by_hand = (
        estimator(dt.TRAK, None)
        .fit((inputs.to(input_dtype).float(), labels))
        .score((target_inputs.to(input_dtype).float(), target_labels))
        .scores
    )
    name = str(input_dtype).removeprefix("torch.")
    cast = f"the inputs are {name} but the model's parameters are float32: casting the inputs"
    with pytest.warns(InputDtypeWarning, match=cast):
        converted = (
            estimator(dt.TRAK, None)
            .fit((inputs.to(input_dtype), labels.to(label_dtype)))
            .score((target_inputs.to(input_dtype), target_labels.to(label_dtype)))
            .scores
        )
    np.testing.assert_array_equal(converted, by_hand)


EMPTY_FORMS = {
    "tensors": (torch.zeros(0, N_FEATURES), torch.zeros(0, dtype=torch.long)),
    "arrays": (np.zeros((0, N_FEATURES), np.float32), np.zeros(0, np.int64)),
    "dataset": TensorDataset(torch.zeros(0, N_FEATURES), torch.zeros(0, dtype=torch.long)),
    "list": [],
}


@pytest.mark.parametrize("form", EMPTY_FORMS)
@pytest.mark.parametrize("kind", ESTIMATORS, ids=lambda kind: kind.__name__)
def test_empty_training_set_and_empty_targets_each_get_one_message(form, kind, fitted, tmp_path):
    empty = EMPTY_FORMS[form]
    store = tmp_path / "store"
    message = ("the training set is empty (0 examples)", "at least one training example")
    assert_refused(lambda: estimator(kind, store).fit(empty), ValueError, message, store)
    assert not store.exists()
    fitted_estimator, fitted_store = fitted[kind]
    message = ("no targets: the targets hold 0 examples", "score needs at least one")
    assert_refused(lambda: fitted_estimator.score(empty), ValueError, message, fitted_store)


@EXAMPLES
@given(content=st.binary(max_size=64), kind=st.sampled_from(ESTIMATORS))
def test_a_store_path_that_is_a_file_is_refused_and_the_file_unchanged(
    content, kind, tmp_path_factory
):
    store = tmp_path_factory.mktemp("file") / "store"
    store.write_bytes(content)
    message = ("is a file, not a datatrace store directory", "choose a directory path")
    assert_refused(lambda: estimator(kind, store).fit(TRAIN), NotADirectoryError, message, store)


# Names a foreign directory may hold; zarr.json has a test of its own.
ENTRY_NAMES = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,10}", fullmatch=True).filter(
    lambda name: not name.endswith(".partial") and name != "zarr.json"
)


@EXAMPLES
@given(
    files=st.dictionaries(ENTRY_NAMES, st.binary(max_size=32), min_size=1, max_size=6),
    folder=st.none() | ENTRY_NAMES,
    kind=st.sampled_from(ESTIMATORS),
)
def test_a_directory_that_is_not_a_store_is_refused_and_left_untouched(
    files, folder, kind, tmp_path_factory
):
    store = tmp_path_factory.mktemp("foreign") / "store"
    inside = store / folder if folder is not None and folder not in files else store
    inside.mkdir(parents=True)
    for name, content in files.items():
        (inside / name).write_bytes(content)
    first = sorted(entry.name for entry in store.iterdir())[0]
    message = (
        f"{store} exists and is not a datatrace store (it holds {first}",
        "pass an empty or new directory",
    )
    assert_refused(lambda: estimator(kind, store).fit(TRAIN), ValueError, message, store)


@pytest.mark.parametrize("content", [b"", b"not json", b"\x00\xff"])
def test_a_directory_whose_zarr_json_is_not_json_is_refused_as_not_a_store(content, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_bytes(content)
    message = ("exists and is not a datatrace store", "pass an empty or new directory")
    assert_refused(lambda: estimator(dt.TRAK, store).fit(TRAIN), ValueError, message, store)


# -- text classification and causal language models (tiny Hugging Face models) --------------------

N_TEXTS, WIDTH = 6, 7


@pytest.fixture(scope="module")
def hf_models():
    pytest.importorskip("transformers")
    return tiny_bert(num_labels=N_CLASSES), tiny_gpt2()


@st.composite
def bad_token_ids(draw, ids: torch.Tensor):
    """``input_ids`` with one id that is too large for the vocabulary, negative, or not a whole
    number; the messages name its index within the batch (the whole set is one batch)."""
    row, position = draw(st.integers(0, len(ids) - 1)), draw(st.integers(0, ids.shape[1] - 1))
    at = f"example {row} at position ({position})"
    ids = ids.clone()
    kind = draw(st.sampled_from(["too large", "negative", "fraction"]))
    if kind == "too large":
        ids[row, position] = value = draw(st.integers(VOCAB, VOCAB + 1000))
        fragments = (
            f"the column 'input_ids' holds the token id {value} (at {at}), out of range",
            f"input embedding has {VOCAB} rows",
            "the model's own tokenizer",
        )
        return Malformed(ids, ValueError, fragments, row)
    if kind == "negative":
        ids[row, position] = value = draw(st.integers(-1000, -1))
        fragments = (
            f"the column 'input_ids' holds a negative id ({value} at {at})",
            "pad_token_id",
        )
        return Malformed(ids, ValueError, fragments, row)
    # float64 ids, some with a fraction that a cast to the model's float32 would round away.
    ids = ids.double()
    ids[row, position] += draw(st.floats(1e-12, 1e-8) | st.floats(0.01, 0.99))
    fragments = (
        "the column 'input_ids' are floating point and not whole numbers",
        f"at {at}",
        "token ids are integers",
    )
    return Malformed(ids, ValueError, fragments, row)


def text_set() -> dict[str, torch.Tensor]:
    ids, mask = padded_tokens(N_TEXTS, WIDTH, seed=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(N_TEXTS) % N_CLASSES}


@st.composite
def malformed_text_set(draw):
    """A text-classification set with malformed token ids or labels (or a mask of the wrong
    width), and what it must raise."""
    data = text_set()
    column = draw(st.sampled_from(["input_ids", "labels", "attention_mask"]))
    if column == "input_ids":
        bad = draw(bad_token_ids(data["input_ids"]))
    elif column == "labels":
        bad = draw(
            st.one_of(
                bad_label_values(N_TEXTS, N_CLASSES, st.integers(0, N_TEXTS - 1), N_TEXTS),
                bad_label_shapes(N_TEXTS, N_CLASSES, N_TEXTS),
                bad_label_lengths(N_TEXTS, N_CLASSES),
            )
        )
    else:
        extra = draw(st.integers(1, 3))
        mask = torch.cat([data["attention_mask"], torch.ones(N_TEXTS, extra, dtype=torch.long)], 1)
        fragments = (
            "ran the model on the first example of the batch",
            "the model failed",
            "Check that the inputs have the shape and dtype",
        )
        bad = Malformed(mask, ValueError, fragments)
    return replace(bad, value={**data, column: bad.value})


@pytest.mark.filterwarnings("error::datatrace.tasks.InputDtypeWarning")  # ids are not cast
@EXAMPLES
@given(bad=malformed_text_set())
def test_malformed_text_classification_data_is_refused(bad, hf_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("text") / "store"
    task = dt.TextClassification()
    # One batch: the probing forward pass sees only its first text, every row is checked.
    fit = estimator(dt.TRAK, store, hf_models[0], task, batch_size=N_TEXTS).fit
    assert_refused(lambda: fit(bad.value), bad.error, bad.fragments, store)


def causal_set() -> dict[str, torch.Tensor]:
    prompts = [[1, 3 + row] for row in range(N_TEXTS)]
    continuations = [[10 + row, 20 + row, 30][: 1 + row % 3] for row in range(N_TEXTS)]
    return causal_lm_examples(prompts, continuations, pad_token_id=0)


@st.composite
def malformed_causal_set(draw):
    """A causal-LM set with malformed input ids or labels, and what it must raise."""
    data = causal_set()
    labels, width = data["labels"].clone(), data["labels"].shape[1]
    kind = draw(st.sampled_from(["input ids", "label too large", "label negative", "shape"]))
    if kind == "input ids":
        bad = draw(bad_token_ids(data["input_ids"]))
        return replace(bad, value={**data, "input_ids": bad.value})
    attributed = torch.nonzero(labels != IGNORE_INDEX).tolist()
    row, position = draw(st.sampled_from(attributed))
    if kind == "label too large":
        labels[row, position] = value = draw(st.integers(VOCAB, VOCAB + 1000))
        fragments = (
            f"hold the token id {value}, out of range",
            f"logits cover {VOCAB} tokens",
            "the model's own tokenizer",
        )
        return Malformed({**data, "labels": labels}, ValueError, fragments)
    if kind == "label negative":
        value = draw(st.integers(-1000, -1).filter(lambda value: value != IGNORE_INDEX))
        labels[row, position] = value
        fragments = (
            f"hold {value}, neither a token id nor ignore_index (-100)",
            "mark the tokens that are not attributed",
        )
        return Malformed({**data, "labels": labels}, ValueError, fragments)
    cut = draw(st.integers(1, width - 1))
    if draw(st.booleans()):
        fragments = (
            f"have shape ({N_TEXTS}, {width - cut}) but input_ids ({N_TEXTS}, {width})",
            "causal_lm_examples builds them",
        )
        return Malformed({**data, "labels": labels[:, cut:]}, ValueError, fragments)
    fragments = (f"have shape ({N_TEXTS},)", "takes (batch_size, seq_len) token ids")
    return Malformed({**data, "labels": labels[:, cut]}, ValueError, fragments)


@pytest.mark.filterwarnings("error::datatrace.tasks.InputDtypeWarning")  # ids are not cast
@EXAMPLES
@given(bad=malformed_causal_set())
def test_malformed_causal_lm_data_is_refused(bad, hf_models, tmp_path_factory):
    store = tmp_path_factory.mktemp("causal") / "store"
    fit = estimator(dt.TRAK, store, hf_models[1], dt.CausalLM(), batch_size=N_TEXTS).fit
    assert_refused(lambda: fit(bad.value), bad.error, bad.fragments, store)


# -- diffusion (a denoiser of one convolution, and a noise schedule without diffusers) ------------

N_IMAGES, N_DRAWS, N_STEPS = 4, 2, 50
SAMPLE = (1, 4, 4)


class Denoiser(nn.Module):
    """``model(x_t, t)``: one convolution of the noisy image (the timestep is not used)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, noisy, timesteps):
        return self.conv(noisy)


def diffusion_set() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "x0": torch.rand(N_IMAGES, *SAMPLE, generator=generator),
        "timesteps": torch.randint(0, N_STEPS, (N_IMAGES, N_DRAWS), generator=generator),
        "noise": torch.randn(N_IMAGES, N_DRAWS, *SAMPLE, generator=generator),
    }


@st.composite
def malformed_diffusion_set(draw):
    """A diffusion set with timesteps outside the schedule or not whole numbers, noise or draw
    weights of the wrong shape, or integer images; and what it must raise."""
    data = diffusion_set()
    timesteps = data["timesteps"].clone()
    row, draw_index = draw(st.integers(0, N_IMAGES - 1)), draw(st.integers(0, N_DRAWS - 1))
    kind = draw(st.sampled_from(["outside", "fraction", "noise", "weights", "integer images"]))
    if kind == "outside":
        value = draw(st.integers(-1000, -1) | st.integers(N_STEPS, 1000))
        timesteps[row, draw_index] = value
        fragments = (f"hold {value}, outside the schedule", f"timesteps are 0 … {N_STEPS - 1}")
        return Malformed({**data, "timesteps": timesteps}, ValueError, fragments)
    if kind == "fraction":
        timesteps = timesteps.double()
        timesteps[row, draw_index] += draw(st.floats(0.01, 0.99))
        fragments = ("not whole numbers", "timesteps index the noise schedule")
        return Malformed({**data, "timesteps": timesteps}, ValueError, fragments)
    if kind == "noise":
        shape = (N_IMAGES, N_DRAWS + draw(st.integers(1, 2)), *SAMPLE)
        fragments = (f"noise has shape {shape}", "expected (batch, draws, *sample_shape)")
        return Malformed({**data, "noise": torch.zeros(shape)}, ValueError, fragments)
    if kind == "weights":
        weights = torch.ones(N_IMAGES, N_DRAWS + draw(st.integers(1, 2)))
        fragments = (
            f"draw_weights has shape {tuple(weights.shape)}",
            f"expected (batch, draws) = {(N_IMAGES, N_DRAWS)}",
        )
        return Malformed({**data, "draw_weights": weights}, ValueError, fragments)
    images = (data["x0"] * 255).to(draw(st.sampled_from([torch.uint8, torch.int64])))
    fragments = ("'x0' must be a floating tensor of clean images",)
    return Malformed({**data, "x0": images}, TypeError, fragments)


@EXAMPLES
@given(bad=malformed_diffusion_set())
def test_malformed_diffusion_data_is_refused(bad, tmp_path_factory):
    store = tmp_path_factory.mktemp("diffusion") / "store"
    task = dt.Diffusion(SimpleNamespace(alphas_cumprod=torch.linspace(0.99, 0.01, N_STEPS)))
    fit = estimator(dt.TRAK, store, Denoiser(), task, batch_size=N_IMAGES).fit
    assert_refused(lambda: fit(bad.value), bad.error, bad.fragments, store)


# -- datatrace unlearn ----------------------------------------------------------------------------

N_DIGITS, DIGIT_CLASSES = 20, 10
runner = CliRunner()


@pytest.fixture(scope="module")
def unlearn_files(tmp_path_factory):
    """A digits MLP (untrained: only the checks run), its inputs and a forget set, as files."""
    from datatrace.demo import make_model

    folder = tmp_path_factory.mktemp("unlearn")
    torch.save(make_model("mlp", seed=0).state_dict(), folder / "model.pt")
    inputs = np.random.default_rng(0).random((N_DIGITS, 64), dtype=np.float32)
    np.save(folder / "x.npy", inputs)
    np.save(folder / "forget.npy", np.arange(3))
    return folder


def unlearn(files: Path, run: Path):
    """`datatrace unlearn gradient-ascent` of the files, with the labels ``run/y.npy``; its
    outputs go to ``run/out``."""
    options = {
        "--inputs": files / "x.npy",
        "--labels": run / "y.npy",
        "--forget": files / "forget.npy",
        "--out": run / "out" / "u.pt",
        "--margins": run / "out" / "margins.npy",
        "--epochs": 1,
        "--threads": 0,  # leave torch's threads as the tests set them
    }
    arguments = [
        "unlearn",
        "gradient-ascent",
        files / "model.pt",
        *[part for option in options.items() for part in option],
    ]
    return runner.invoke(app, [str(argument) for argument in arguments])


def assert_one_error_line_and_nothing_written(files: Path, labels, run: Path, fragments):
    """`datatrace unlearn` with ``labels`` exits with 1 and a single line ``error: ...`` that
    holds each of ``fragments``, and writes nothing in ``files`` or ``run``."""
    np.save(run / "y.npy", labels)
    before = snapshot(files), snapshot(run)
    result = unlearn(files, run)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert (snapshot(files), snapshot(run)) == before


@EXAMPLES
@given(
    bad=st.one_of(
        bad_label_values(N_DIGITS, DIGIT_CLASSES, st.integers(0, N_DIGITS - 1), N_DIGITS),
        bad_label_shapes(N_DIGITS, DIGIT_CLASSES, N_DIGITS),
    )
)
def test_unlearn_refuses_malformed_labels_with_one_error_line(bad, unlearn_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert_one_error_line_and_nothing_written(unlearn_files, bad.value.numpy(), run, bad.fragments)


@pytest.mark.parametrize("labels", ["complex", "strings"])
def test_unlearn_refuses_labels_of_a_wrong_type_with_one_error_line(
    labels, unlearn_files, tmp_path
):
    classes = np.arange(N_DIGITS) % DIGIT_CLASSES
    values = classes.astype(np.complex64) if labels == "complex" else classes.astype(str)
    assert_one_error_line_and_nothing_written(unlearn_files, values, tmp_path, ("labels",))


def test_unlearn_takes_whole_number_float_labels_as_their_classes(unlearn_files, tmp_path):
    classes = np.arange(N_DIGITS) % DIGIT_CLASSES
    states, margins = {}, {}
    for name, labels in {"int": classes, "float": classes.astype(np.float64)}.items():
        run = tmp_path / name
        run.mkdir()
        np.save(run / "y.npy", labels)
        result = unlearn(unlearn_files, run)
        assert result.exit_code == 0, result.output
        states[name] = torch.load(run / "out" / "u.pt", weights_only=True)
        margins[name] = np.load(run / "out" / "margins.npy")
    assert all(torch.equal(states["int"][key], states["float"][key]) for key in states["int"])
    np.testing.assert_array_equal(margins["float"], margins["int"])


def test_positions_take_indices_whole_floats_and_boolean_masks_and_refuse_the_rest():
    from datatrace._arguments import positions

    mask = np.zeros(6, bool)
    mask[[1, 4]] = True
    assert positions(mask, 6, "indices").tolist() == [1, 4]
    assert positions([[3], [0]], 6, "indices").tolist() == [3, 0]
    assert positions(np.array([2.0, 5.0]), 6, "indices").tolist() == [2, 5]
    assert positions([], 6, "indices").tolist() == []
    with pytest.raises(ValueError, match="forget_indices must be integer positions"):
        positions([2.5], 6, "forget_indices")
    with pytest.raises(ValueError, match="integer positions"):
        positions(["a"], 6, "indices")
    with pytest.raises(ValueError, match=r"one entry per example \(6\)"):
        positions(mask[:5], 6, "indices")
