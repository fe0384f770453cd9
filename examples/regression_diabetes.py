"""TRAK on a regression model: which patients did the prediction for a new one come from?

scikit-learn's bundled diabetes data (442 patients, 10 standardised measurements, disease
progression after a year as the target): 350 training and 92 test patients, MLPs
``10 → 64 → 64 → 1`` (tanh) trained on the squared error with Adam. ``datatrace.Regression``
attributes each test prediction to the training patients (output: the prediction; weight ``Q``:
the residual ``y − ŷ``); the script prints, for a few test patients, the training patients that
raised and lowered their prediction most, then checks the scores with the linear datamodeling
score against models trained on random halves of the training set. About 10 seconds on one
CPU thread (LDS 0.72 there)::

    python examples/regression_diabetes.py                 # --help for options
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import datatrace as dt


def diabetes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x[:350].mean(0)) / x[:350].std(0)
    y = (y - y[:350].mean()) / y[:350].std()
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    return x[:350], y[:350], x[350:], y[350:]


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            optimizer.zero_grad()
            F.mse_loss(model(x[batch]).squeeze(1), y[batch]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=3, help="models in TRAK's ensemble")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs per model")
    parser.add_argument("--subsets", type=int, default=60, help="half-data models for the LDS")
    parser.add_argument("--show", type=int, default=3, help="test patients printed")
    parser.add_argument("--top-k", type=int, default=3, help="training patients per direction")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    x, y, x_test, y_test = diabetes()

    models = [train(x, y, seed, args.epochs) for seed in range(args.checkpoints)]
    trak = dt.TRAK(models[0], dt.Regression(), progress=False).fit((x, y), models)
    scores = trak.score((x_test, y_test))
    with torch.no_grad():
        predicted = np.mean([m(x_test).squeeze(1).numpy() for m in models], axis=0)
    test_mse = float(((predicted - y_test.numpy()) ** 2).mean())
    print(f"{args.checkpoints} models, test MSE {test_mse:.3f} (standardised target)")
    residual = float(np.median(np.abs(trak.out_to_loss_)))
    print(f"residuals Q of the training patients: median |Q| {residual:.3f}")

    matrix = scores.scores
    for target in range(args.show):
        row = matrix[target]
        up, down = np.argsort(-row)[: args.top_k], np.argsort(row)[: args.top_k]
        print(
            f"\ntest patient {target}: predicted {predicted[target]:+.2f}, "
            f"true {float(y_test[target]):+.2f}"
        )
        for label, picks in (("raised it", up), ("lowered it", down)):
            shown = ", ".join(f"#{i} (y {float(y[i]):+.2f}, score {row[i]:+.4f})" for i in picks)
            print(f"  {label}: {shown}")

    # Ground truth: models trained on random halves, their test predictions.
    generator = np.random.default_rng(0)
    masks = np.zeros((args.subsets, len(x)), dtype=bool)
    outputs = np.zeros((args.subsets, len(x_test)))
    for r in range(args.subsets):
        masks[r, generator.permutation(len(x))[: len(x) // 2]] = True
        rows = torch.as_tensor(np.flatnonzero(masks[r]))
        model = train(x[rows], y[rows], seed=1000 + r, epochs=args.epochs)
        with torch.no_grad():
            outputs[r] = model(x_test).squeeze(1).numpy()
    result = dt.lds(scores, masks, outputs)
    print(
        f"\nLDS against {args.subsets} half-data models: {result.mean:.3f} "
        f"({result.ci[0]:.3f}–{result.ci[1]:.3f}); {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
