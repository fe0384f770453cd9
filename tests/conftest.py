import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from datatrace.demo.subsets import torch_threads

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    small models and products gain nothing from intra-op threads, and with other processes on
    the cores torch's spinning threads make them many times slower."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits():
    """Bundled 8×8 digits scaled to [0, 1]: (X (1797, 64) float32, y (1797,) int64)."""
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def make_mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


class SmallCNN(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = nn.functional.max_pool2d(torch.relu(self.norm(self.conv(x))), 2)
        return self.head(x.flatten(1))


def train(model: nn.Module, X, y, steps: int = 100, lr: float = 0.05, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_mlps(digits):
    """Three MLPs trained on the first 300 digits with different seeds: (models, X, y)."""
    X, y = digits
    models = [train(make_mlp(seed), X[:300], y[:300], seed=seed) for seed in range(3)]
    return models, X, y


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
