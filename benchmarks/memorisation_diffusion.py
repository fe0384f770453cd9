"""Memorisation check for diffusion attribution: is a memorised training image the top proponent?

    python benchmarks/memorisation_diffusion.py      # --help; ~1 min on 1 thread

What runs. A tiny DDPM (``UNet2DModel``, 40 k parameters) is trained on ``--digits`` bundled 8×8
digits until it reproduces them (the set-up of
``tests/test_diffusion.py::test_memorised_images_are_the_top_proponents_at_late_steps``). For
each sampling seed, 12 samples are generated in 50 steps; those ending within ``CLOSE`` mean
squared error of a training digit count as memorised. Each output function (``--outputs``) is
attributed with TRAK at each step of ``--steps``. Reported per seed and output: how many samples
are memorised, and how often their nearest training digit is the top proponent, per step, over
the late steps (``LATE_STEPS``) pooled, and with the late steps' scores summed.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from datatrace import TRAK, SingularKernelWarning
from datatrace.applications.diffusion import (
    DiffusionTrainingExamples,
    attribute_trajectory,
    sample_with_trajectory,
)
from datatrace.applications.diffusion.training import (
    digits_images,
    require_diffusers,
    tiny_unet,
    train_denoiser,
)
from datatrace.tasks import Diffusion

# A sample within this mean squared error of a training digit reproduces it.
CLOSE = 0.02
# The steps the test checks (the last steps before t = 0 that the samples are decided at).
LATE_STEPS = (200, 100, 40)
SAMPLES = 12


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits", type=int, default=8, help="training digits")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="sampling seeds")
    parser.add_argument("--outputs", nargs="+", default=["square_norm", "loss"])
    parser.add_argument("--steps", type=int, nargs="+", default=[780, 400, *LATE_STEPS])
    parser.add_argument("--timesteps", type=int, default=100, help="K draws per training image")
    parser.add_argument("--draws", type=int, default=50, help="noise draws per target")
    parser.add_argument("--proj-dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # k ≥ n here (8 training images): the damping decides the kernel, as the warning says.
    warnings.simplefilter("ignore", SingularKernelWarning)
    late = [step for step in args.steps if step in LATE_STEPS]
    scheduler = require_diffusers().DDPMScheduler(num_train_timesteps=1000)
    train_images = digits_images(8)[0][: args.digits]

    tick = time.process_time()
    model = train_denoiser(
        tiny_unet(block_out_channels=(8, 16)),
        scheduler,
        train_images,
        steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    print(f"trained in {time.process_time() - tick:.1f} s of CPU time\n")

    header = " | ".join(f"t={step}" for step in args.steps)
    print(f"| seed | output | memorised | {header} | late steps | late steps summed |")
    print("|---:|---|---:|" + "---:|" * len(args.steps) + "---:|---:|")
    for seed in args.seeds:
        trajectory = sample_with_trajectory(
            model, scheduler, SAMPLES, seed=seed, num_inference_steps=50, progress=False
        )
        distances = ((trajectory.samples[:, None] - train_images[None]) ** 2).flatten(2).mean(2)
        nearest = distances.argmin(1).numpy()
        close = (distances.min(1).values < CLOSE).nonzero().flatten().numpy()
        for output in args.outputs:
            trak = TRAK(
                model, Diffusion(scheduler, output), proj_dim=args.proj_dim, progress=False
            ).fit(DiffusionTrainingExamples(train_images, scheduler, n_timesteps=args.timesteps))
            journey = attribute_trajectory(trak, trajectory, args.steps, n_draws=args.draws)
            hits = journey.top(1)[:, close, 0] == nearest[close]
            rows = [args.steps.index(step) for step in late]
            summed = journey.scores[rows].sum(0).argmax(1)[close] == nearest[close]
            per_step = " | ".join(f"{rate:.0%}" for rate in hits.mean(1))
            print(
                f"| {seed} | {output} | {len(close)}/{SAMPLES} | {per_step} | "
                f"{hits[rows].mean():.0%} | {np.mean(summed):.0%} |"
            )


if __name__ == "__main__":
    main()
