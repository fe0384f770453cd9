"""Journey TRAK on a small DDPM trained on the bundled digits: which training images shaped each
generated image, and when along its sampling trajectory.

A tiny ``UNet2DModel`` (two resolution levels, ~160 k parameters) is trained on CPU as a DDPM on
scikit-learn's 8×8 digits (optionally upsampled), samples are generated while their trajectory is
recorded, and every chosen sampling step is attributed with one fitted TRAK. The result is an HTML
page: one row per generated sample, with the predicted clean image ``x̂_0(t)`` at each chosen step
above the training images that most lower its denoising loss there. A few minutes on one CPU
thread::

    pip install "datatrace[diffusion]"
    python examples/diffusion_digits.py --out runs/diffusion-digits      # --help for options

Reruns with the same ``--out`` reuse the trained model and the stored training features.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from datatrace import TRAK
from datatrace.applications.diffusion import (
    DiffusionTrainingExamples,
    attribute_trajectory,
    sample_with_trajectory,
)
from datatrace.applications.diffusion.report import write_trajectory_report
from datatrace.applications.diffusion.training import (
    digits_images,
    require_diffusers,
    tiny_unet,
    train_denoiser,
)
from datatrace.report import Section
from datatrace.tasks import Diffusion


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("diffusion-digits"))
    parser.add_argument("--n-train", type=int, default=500, help="training digits")
    parser.add_argument("--size", type=int, default=8, help="image side (8: native digits)")
    parser.add_argument("--train-steps", type=int, default=1500, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-timesteps", type=int, default=1000, help="DDPM noise levels")
    parser.add_argument("--inference-steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--samples", type=int, default=8, help="generated samples")
    parser.add_argument("--steps", type=int, default=6, help="attributed steps, evenly spaced")
    parser.add_argument(
        "--output", default="square_norm", help='"square_norm" (D-TRAK) or "loss" (Journey TRAK)'
    )
    parser.add_argument("--timesteps", type=int, default=10, help="K draws per training image")
    parser.add_argument("--draws", type=int, default=10, help="noise draws per target")
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--top", type=int, default=4, help="training images shown per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    diffusers = require_diffusers()
    timings: dict[str, float] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    images, labels = digits_images(args.size)
    order = np.random.default_rng(args.seed).permutation(len(images))[: args.n_train]
    train_images, train_labels = images[order], labels[order]
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=args.train_timesteps)

    model = tiny_unet(sample_size=args.size, block_out_channels=(16, 32), seed=args.seed)
    recipe = {
        key: getattr(args, key)
        for key in ("n_train", "size", "train_steps", "batch_size", "lr", "train_timesteps", "seed")
    }
    checkpoint = args.out / "model.pt"
    if checkpoint.exists() and json.loads((args.out / "model.json").read_text()) == recipe:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        model.eval()
        timings["training (reused)"] = 0.0
    else:
        start = time.perf_counter()
        train_denoiser(
            model,
            scheduler,
            train_images,
            steps=args.train_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            progress=True,
        )
        timings["training"] = time.perf_counter() - start
        torch.save(model.state_dict(), checkpoint)
        (args.out / "model.json").write_text(json.dumps(recipe, indent=2))

    start = time.perf_counter()
    trajectory = sample_with_trajectory(
        model,
        scheduler,
        args.samples,
        seed=args.seed + 1,
        num_inference_steps=args.inference_steps,
    )
    timings["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    task = Diffusion(scheduler, args.output)
    train = DiffusionTrainingExamples(
        train_images, scheduler, n_timesteps=args.timesteps, seed=args.seed
    )
    trak = TRAK(
        model, task, proj_dim=args.proj_dim, store=args.out / f"store-{args.output}", seed=args.seed
    )
    trak.fit(train)
    timings["training features"] = time.perf_counter() - start

    start = time.perf_counter()
    steps = trajectory.evenly_spaced_steps(args.steps)
    journey = attribute_trajectory(trak, trajectory, steps, n_draws=args.draws, seed=args.seed)
    timings["attributing the steps"] = time.perf_counter() - start

    nearest = nearest_training_images(trajectory.samples, train_images)
    top_final = journey.at_step(steps[-1]).top(1).indices[:, 0]
    rows = [
        (
            j,
            int(nearest[j]),
            int(train_labels[nearest[j]]),
            int(top_final[j]),
            int(train_labels[top_final[j]]),
        )
        for j in range(args.samples)
    ]
    path = write_trajectory_report(
        args.out / "report.html",
        journey,
        trajectory,
        train_images,
        samples=range(args.samples),
        k=args.top,
        train_labels=train_labels,
        summary={
            "output function": args.output,
            "model": f"UNet2DModel, {sum(p.numel() for p in model.parameters()):,} parameters",
            "K timesteps per training image": args.timesteps,
            "proj_dim": args.proj_dim,
        },
        sections=[
            Section(
                "Nearest training image of each final sample",
                "For comparison: the training image closest in pixels to each generated sample, "
                "and the top proponent at the last attributed step.",
                columns=(
                    "sample",
                    "nearest training image",
                    "its label",
                    "top proponent at the last step",
                    "its label",
                ),
                rows=rows,
            ),
            Section(
                "Timings (seconds)",
                columns=("stage", "seconds"),
                rows=[(stage, seconds) for stage, seconds in timings.items()],
            ),
        ],
    )
    for stage, seconds in timings.items():
        print(f"{stage:>24}: {seconds:6.1f} s")
    print(f"report: {path}")


def nearest_training_images(samples: torch.Tensor, train_images: torch.Tensor) -> np.ndarray:
    """Index of the training image closest (mean squared pixel difference) to each sample."""
    distances = ((samples[:, None] - train_images[None]) ** 2).flatten(2).mean(2)
    return distances.argmin(1).numpy()


if __name__ == "__main__":
    main()
