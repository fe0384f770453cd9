"""Data adapters: every accepted form reads the same ordered examples."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datatrace.data import Examples, batch_size_of, map_tensors

X = torch.arange(40, dtype=torch.float32).reshape(10, 4)
Y = torch.arange(10)


@pytest.mark.parametrize(
    "data",
    [
        (X, Y),
        [X.numpy(), Y.numpy()],
        TensorDataset(X, Y),
        DataLoader(TensorDataset(X, Y), batch_size=3),
    ],
    ids=["tuple", "numpy", "dataset", "loader"],
)
def test_every_form_reads_the_same_batches(data):
    examples = Examples(data)
    assert examples.n == 10
    batches = list(examples.batches(2, 9, batch_size=3))
    assert [batch_size_of(b) for b in batches] == [3, 3, 1]
    images = torch.cat([torch.as_tensor(b[0]) for b in batches])
    labels = torch.cat([torch.as_tensor(b[1]) for b in batches])
    assert torch.equal(images, X[2:9]) and torch.equal(labels, Y[2:9])


def test_mapping_of_columns():
    examples = Examples({"input_ids": X.long(), "labels": Y})
    batch = examples.read(3, 5)
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["labels"], Y[3:5])


def test_shuffled_loader_is_refused():
    with pytest.raises(ValueError, match="shuffle=False"):
        Examples(DataLoader(TensorDataset(X, Y), shuffle=True))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        Examples((X, Y[:5]))
    with pytest.raises(TypeError, match="cannot read examples"):
        Examples(42)
    with pytest.raises(IndexError):
        Examples((X, Y)).read(5, 11)
    with pytest.raises(ValueError, match="column 1 of the data is a single number"):
        Examples((X, torch.tensor(3)))
    with pytest.raises(ValueError, match="column 'labels' is a single number"):
        Examples({"input_ids": X, "labels": torch.tensor(3)})
    with pytest.raises(TypeError, match="column 1 of the data holds <U1 values, not numbers"):
        Examples((X, np.array(list("abcdefghij"))))


def test_map_tensors_keeps_structure():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    batch = {"x": (X, [Y]), "pair": Pair(X, Y), "name": "keep"}
    doubled = map_tensors(lambda t: t * 2, batch)
    assert isinstance(doubled["pair"], Pair) and doubled["name"] == "keep"
    assert torch.equal(doubled["x"][1][0], Y * 2)
    np.testing.assert_array_equal(doubled["pair"].a.numpy(), X.numpy() * 2)


def test_tuple_of_nested_columns():
    """(inputs as a dict of tensors, labels): read by rows like flat columns; a list of
    per-example tuples is still a dataset of examples."""
    u, v, y = torch.randn(7, 3), np.arange(14.0).reshape(7, 2), torch.arange(7)
    examples = Examples(({"u": u, "v": v}, y))
    assert examples.n == 7
    inputs, labels = examples.read(2, 5)
    torch.testing.assert_close(inputs["u"], u[2:5])
    torch.testing.assert_close(inputs["v"], torch.as_tensor(v[2:5]))
    torch.testing.assert_close(labels, y[2:5])
    nested = Examples(((u, {"v": v}), y)).read(0, 2)
    torch.testing.assert_close(nested[0][1]["v"], torch.as_tensor(v[:2]))
    with pytest.raises(ValueError, match="different lengths"):
        Examples(({"u": u, "v": v[:6]}, y))
    with pytest.raises(TypeError, match=r"column '0\.name' holds"):
        Examples(({"u": u, "name": np.array(["a"] * 7)}, y))
    per_example = Examples([(u[i], y[i]) for i in range(7)])
    assert per_example.n == 7
    torch.testing.assert_close(per_example.read(0, 3)[0], u[:3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_is_exact_even_where_the_sum_overflows(dtype):
    from datatrace.data import all_finite

    big = torch.finfo(dtype).max
    values = torch.tensor([big, big, -1.0, 0.5], dtype=dtype)  # finite; their sum is not
    assert not torch.isfinite(values.sum()) and all_finite(values)
    assert all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        damaged = values.clone()
        damaged[2] = bad
        assert not all_finite(damaged)
        damaged = torch.ones(3, 4, dtype=dtype)
        damaged[1, 2] = bad
        assert not all_finite(damaged)
