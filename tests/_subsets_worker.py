"""A subset experiment on an additive toy model, run by tests/test_subsets.py in other processes.

The "model" trained on a subset is the subset itself; its outputs are the sum of fixed weights
over the subset plus seeded noise, so every row's outputs are known exactly. Each train() call
appends its seed to a log file (O_APPEND: lines from several processes never interleave), which
counts how many times each row was computed.

Usage: python _subsets_worker.py STORE LOG DELAY [READY GO]
    Runs the experiment; with READY and GO, creates READY and waits for GO to exist first (so
    that two workers start at the same moment). Prints the rows it computed as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_TRAIN, N_OUTPUTS, N_MASKS, N_SEEDS, ALPHA, SEED = 40, 5, 24, 2, 0.5, 3
NAME = "toy"
NOISE = 0.01
WEIGHTS = np.random.default_rng(0).normal(size=(N_TRAIN, N_OUTPUTS))


def noise(seed: int) -> np.ndarray:
    return NOISE * np.random.default_rng(seed).normal(size=N_OUTPUTS)


def expected_outputs(mask: np.ndarray, seeds) -> np.ndarray:
    """``(n_seeds, N_OUTPUTS)`` outputs of a row, computed independently of the runner."""
    return np.stack([WEIGHTS[mask].sum(0) + noise(seed) for seed in seeds])


@dataclass(frozen=True)
class Additive:
    """train/evaluate of the toy model; picklable, so usable by process pools and Ray.

    Attributes:
        log: file each train() call appends its seed to (None: no log).
        delay: seconds each train() call sleeps.
        fail_once_dir: if set, the first train() call of each seed creates a marker file there
            and raises; the next call with that seed succeeds.
    """

    log: str | None = None
    delay: float = 0.0
    fail_once_dir: str | None = None

    def train(self, train_indices: np.ndarray, seed: int):
        if self.log is not None:
            with open(self.log, "a") as file:
                file.write(f"{seed}\n")
        if self.fail_once_dir is not None:
            marker = Path(self.fail_once_dir) / str(seed)
            if not marker.exists():
                marker.touch()
                raise RuntimeError(f"planned failure of seed {seed}")
        time.sleep(self.delay)
        return np.asarray(train_indices), seed

    def evaluate(self, model) -> np.ndarray:
        train_indices, seed = model
        return WEIGHTS[train_indices].sum(0) + noise(seed)


def logged_seeds(*logs: Path) -> list[int]:
    seeds = []
    for log in logs:
        if log.exists():
            seeds += [int(line) for line in log.read_text().split()]
    return seeds


def experiment(store):
    from datatrace.subsets import SubsetExperiment

    return SubsetExperiment(
        store,
        NAME,
        n_train=N_TRAIN,
        n_outputs=N_OUTPUTS,
        n_masks=N_MASKS,
        alpha=ALPHA,
        seed=SEED,
        n_seeds=N_SEEDS,
        description={"task": "additive toy"},
    )


if __name__ == "__main__":
    store, log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if len(sys.argv) > 5:
        Path(sys.argv[4]).touch()
        while not os.path.exists(sys.argv[5]):
            time.sleep(0.01)
    toy = Additive(log=log, delay=delay)
    table = experiment(store).run(toy.train, toy.evaluate, progress=False, poll_s=0.1)
    print(json.dumps({"computed": table.last_run_.computed}))
