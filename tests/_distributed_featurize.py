"""A small featurization for tests/test_featurize_backends.py, importable by worker processes.

Usage: python _distributed_featurize.py STORE DELAY
    Featurizes into STORE on ``LocalBackend(processes=0)`` (claims, no pool), sleeping DELAY
    seconds in each batch, so that the run can be killed with SIGKILL in the middle of a chunk.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from datatrace import TRAK, Classification
from datatrace.demo import digits_split, make_model

N_TRAIN, CHUNK, PROJ_DIM, BATCH = 96, 16, 32, 8


class Planted(Classification):
    """Classification that can sleep in each batch, or SIGKILL the worker process it runs in
    the first time it sees the batch starting at ``kill_row`` (``marker`` records that it did).
    The driver process (``driver_pid``) is never killed."""

    def __init__(self, delay=0.0, marker=None, kill_row=None, driver_pid=None):
        self.delay, self.marker, self.kill_row, self.driver_pid = (
            delay,
            marker,
            kill_row,
            driver_pid,
        )

    def check_batch(self, model, batch):
        inputs, labels = super().check_batch(model, batch)
        time.sleep(self.delay)
        if (
            self.marker is not None
            and os.getpid() != self.driver_pid
            and not Path(self.marker).exists()
            and self.kill_row is not None
            and torch.equal(inputs[:1], train_data()[0][self.kill_row : self.kill_row + 1])
        ):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return inputs, labels

    def config(self):
        return {"name": "Classification"}


_DATA = None


def train_data():
    global _DATA
    if _DATA is None:
        images, labels = digits_split()[0].as_tuple()
        _DATA = (images[:N_TRAIN], labels[:N_TRAIN])
    return _DATA


def make_trak(store, task=None, **settings):
    return TRAK(
        make_model("mlp", seed=0, hidden=16),
        task or Planted(),
        proj_dim=settings.pop("proj_dim", PROJ_DIM),
        store=store,
        batch_size=BATCH,
        chunk_size=CHUNK,
        progress=False,
        damping_absolute=settings.pop("damping_absolute", 0.1),
        **settings,
    )


def checkpoints():
    return [make_model("mlp", seed=s, hidden=16).state_dict() for s in (1, 2)]


if __name__ == "__main__":
    from datatrace.subsets import LocalBackend

    torch.set_num_threads(1)
    trak = make_trak(sys.argv[1], Planted(delay=float(sys.argv[2])))
    trak.fit(train_data(), checkpoints(), backend=LocalBackend(processes=0))
