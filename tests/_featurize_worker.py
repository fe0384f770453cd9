"""Featurizes into a store slowly, to be killed mid-run by tests/test_store.py.

Usage: python _featurize_worker.py STORE_PATH DELAY_SECONDS
"""

import sys
import time

import torch
from torch.utils.data import Dataset

from datatrace import TRAK, Classification
from datatrace.demo import digits_split, make_model

N_TRAIN, CHUNK, PROJ_DIM = 192, 16, 64


class SlowDigits(Dataset):
    """The first N_TRAIN digits; each read sleeps, so that the run takes long enough to kill."""

    def __init__(self, delay: float):
        self.images, self.labels = digits_split()[0].as_tuple()
        self.delay = delay

    def __len__(self):
        return N_TRAIN

    def __getitem__(self, index):
        time.sleep(self.delay)
        return self.images[index], self.labels[index]


def make_trak(store):
    model = make_model("mlp", seed=0, hidden=16)
    return TRAK(
        model,
        Classification(),
        proj_dim=PROJ_DIM,
        store=store,
        batch_size=8,
        chunk_size=CHUNK,
        progress=False,
    )


def checkpoints():
    return [make_model("mlp", seed=s, hidden=16).state_dict() for s in (1, 2)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    make_trak(sys.argv[1]).fit(SlowDigits(float(sys.argv[2])), checkpoints())
