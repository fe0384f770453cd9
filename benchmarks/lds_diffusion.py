"""LDS of diffusion attribution along the sampling trajectory: Journey TRAK vs D-TRAK outputs.

    python benchmarks/lds_diffusion.py --out runs/lds-diffusion     # --help; ~30 min on 1 thread

What runs. A tiny DDPM (``UNet2DModel``, two levels of 8 and 16 channels, 40 k parameters,
1,000 noise levels) is trained on ``--n-train`` bundled 8×8 digits and generates ``--samples``
images in 50 sampling steps while their trajectory is recorded. Ground truth: ``SubsetExperiment``
trains ``--models`` such DDPMs on random halves of the training set (α = 0.5); every model starts
from the same weights and sees the same timesteps and noise (the default;
``--independent-seeds`` gives each its own seed), so they differ by their data only. Each
model's outputs are the negated denoising losses of the full model's predicted clean images
``x̂_0(t)`` re-noised to ``t`` with fixed noise (averaged over ``--draws`` draws, the same for
every model), for each chosen step ``t`` and generated sample. Attributions: TRAK on the full
model with the ``Diffusion`` task, its output the denoising loss (Journey TRAK) or D-TRAK's
squared norm of the predicted noise, at ``K`` = ``--timesteps`` draws per training image; and,
for scale, the pixel similarity ``−‖x̂_0(t) − x_i‖²``. Reported: LDS per step (mean Spearman
over generated samples) and over all steps' targets pooled (with a 95% bootstrap interval over
those targets), and the number of subset models. Rerunning with the same ``--out`` resumes the
ground truth where it stopped, or reuses it whole (e.g. to compare ``--damping 1 0.1 0.01``,
whose values share one computation of the features).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from datatrace import TRAK, SingularKernelWarning, Store
from datatrace.applications.diffusion import (
    DiffusionTrainingExamples,
    Trajectory,
    attribute_trajectory,
    sample_with_trajectory,
    trajectory_outputs,
)
from datatrace.applications.diffusion.training import (
    digits_images,
    require_diffusers,
    tiny_unet,
    train_denoiser,
)
from datatrace.evaluation.lds import lds
from datatrace.subsets import SubsetExperiment
from datatrace.tasks import Diffusion

# Sampling timesteps attributed and evaluated (of the 50-step DDPM schedule 980, 960, ..., 0).
STEPS = (980, 780, 580, 380, 180, 80, 0)
INFERENCE_STEPS = 50
CHANNELS = (8, 16)


@dataclass(frozen=True)
class Recipe:
    """How every model of the benchmark is trained (the subset table's provenance)."""

    n_train: int
    train_steps: int
    batch_size: int
    lr: float
    train_timesteps: int
    same_seed: bool
    data_seed: int


def training_data(recipe: Recipe) -> torch.Tensor:
    images, _ = digits_images(8)
    order = np.random.default_rng(recipe.data_seed).permutation(len(images))[: recipe.n_train]
    return images[order]


def scheduler_for(recipe: Recipe):
    return require_diffusers().DDPMScheduler(num_train_timesteps=recipe.train_timesteps)


def train_model(recipe: Recipe, indices: np.ndarray, seed: int) -> torch.nn.Module:
    """A DDPM trained on ``training_data(recipe)[indices]``."""
    seed = 0 if recipe.same_seed else seed
    model = tiny_unet(block_out_channels=CHANNELS, seed=seed)
    images = training_data(recipe)[torch.as_tensor(indices)]
    return train_denoiser(
        model,
        scheduler_for(recipe),
        images,
        steps=recipe.train_steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=seed,
    )


def train_full(recipe: Recipe, seed: int) -> torch.nn.Module:
    """A DDPM trained on the whole training set from seed ``seed`` (an ensemble member)."""
    model = tiny_unet(block_out_channels=CHANNELS, seed=seed)
    return train_denoiser(
        model,
        scheduler_for(recipe),
        training_data(recipe),
        steps=recipe.train_steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=seed,
    )


def evaluate_model(
    recipe: Recipe, trajectory: Trajectory, draws: int, model: torch.nn.Module
) -> np.ndarray:
    """``(n_steps × n_samples,)`` negated denoising losses of the trajectory's targets."""
    task = Diffusion(scheduler_for(recipe), "loss")
    return trajectory_outputs(model, task, trajectory, STEPS, n_draws=draws, seed=0).reshape(-1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lds-diffusion"))
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--models", type=int, default=40, help="subset models (ground truth)")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--samples", type=int, default=16, help="generated samples (targets)")
    parser.add_argument("--draws", type=int, default=10, help="noise draws per target")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[10, 100], help="K values")
    parser.add_argument(
        "--checkpoints",
        type=int,
        nargs="+",
        default=[1, 3],
        help="ensemble sizes: full-data models trained with seeds 0, 1, ...",
    )
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument(
        "--damping",
        type=lambda text: text if text == "auto" else float(text),
        nargs="+",
        default=["auto"],
        help='"auto" (TRAK\'s default rule) and/or relative damping values (features are '
        "computed once and reused for each)",
    )
    parser.add_argument(
        "--independent-seeds",
        action="store_true",
        help="train each subset model from its own seed instead of the same one",
    )
    parser.add_argument("--backend", default="local", help='"local" or "processes"')
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", SingularKernelWarning)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(
        n_train=args.n_train,
        train_steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        train_timesteps=1000,
        same_seed=not args.independent_seeds,
        data_seed=0,
    )
    scheduler = scheduler_for(recipe)
    train_images = training_data(recipe)

    tick = time.perf_counter()
    full = train_full(recipe, seed=0)
    full_seconds = time.perf_counter() - tick
    ensemble = [full.state_dict()] + [
        train_full(recipe, seed).state_dict() for seed in range(1, max(args.checkpoints))
    ]
    trajectory = sample_with_trajectory(
        full, scheduler, args.samples, seed=1, num_inference_steps=INFERENCE_STEPS, progress=False
    )
    nearest = ((trajectory.samples[:, None] - train_images[None]) ** 2).flatten(2).mean(2)
    print(
        f"full model trained in {full_seconds:.0f} s; samples' mean squared distance to their "
        f"nearest training digit: median {nearest.min(1).values.median():.3f}"
    )

    experiment = SubsetExperiment(
        args.out / "store",
        "lds-diffusion",
        n_train=args.n_train,
        n_outputs=len(STEPS) * args.samples,
        n_masks=args.models,
        alpha=0.5,
        seed=0,
        description={**asdict(recipe), "samples": args.samples, "draws": args.draws},
    )
    tick = time.perf_counter()
    experiment.run(
        functools.partial(train_model, recipe),
        functools.partial(evaluate_model, recipe, trajectory, args.draws),
        backend=args.backend,
    )
    truth = experiment.results()
    outputs = truth.outputs.reshape(len(truth.masks), len(STEPS), args.samples)
    print(f"{len(truth.masks)} subset models ready in {time.perf_counter() - tick:.0f} s")

    methods: list[tuple[str, np.ndarray, float]] = []
    pixel = np.stack(
        [
            -((trajectory.pred_original_at(t)[:, None] - train_images[None]) ** 2)
            .flatten(2)
            .mean(2)
            .numpy()
            for t in STEPS
        ]
    )
    methods.append(("pixel similarity −‖x̂_0(t) − x_i‖²", pixel, 0.0))
    for output, name in (("loss", "Journey TRAK (loss)"), ("square_norm", "D-TRAK (‖ε_θ‖²)")):
        for n_timesteps in args.timesteps:
            # One in-memory store per output and K: each checkpoint's features are computed
            # once, then reused by the larger ensembles and the other damping values.
            features = Store()
            train = DiffusionTrainingExamples(train_images, scheduler, n_timesteps=n_timesteps)
            for n_checkpoints in args.checkpoints:
                for damping in args.damping:
                    tick = time.perf_counter()
                    trak = TRAK(
                        full,
                        Diffusion(scheduler, output),
                        proj_dim=args.proj_dim,
                        damping=damping,
                        store=features,
                        progress=False,
                    ).fit(train, ensemble[:n_checkpoints])
                    journey = attribute_trajectory(trak, trajectory, STEPS, n_draws=args.draws)
                    label = f"{name}, K = {n_timesteps}, {n_checkpoints} checkpoint(s)"
                    if len(args.damping) > 1:
                        label += f", λ = {damping}"
                    methods.append((label, journey.scores, time.perf_counter() - tick))

    results = []
    for name, scores, seconds in methods:
        per_step = [
            lds(scores[s], truth.masks, outputs[:, s], bootstrap=0) for s in range(len(STEPS))
        ]
        pooled = lds(
            np.concatenate(list(scores)), truth.masks, outputs.reshape(len(truth.masks), -1)
        )
        results.append(
            {
                "method": name,
                "lds_mean": pooled.mean,
                "ci": pooled.ci,
                "per_step": {t: r.mean for t, r in zip(STEPS, per_step)},
                "seconds": seconds,
            }
        )

    print(
        f"\nLDS on {args.samples} generated samples × {len(STEPS)} steps; ground truth "
        f"{len(truth.masks)} DDPMs trained on random halves of {args.n_train} digits "
        f"({args.train_steps} steps of {args.batch_size}, "
        f"{'same' if recipe.same_seed else 'independent'} seeds); k = {args.proj_dim}, relative "
        f"damping {', '.join(str(d) for d in args.damping)}, {args.draws} noise draws per "
        f"target; total {time.perf_counter() - started:.0f} s (seconds per row: features are "
        "computed by the first row that needs them and reused after)\n"
    )
    header = " | ".join(f"t={t}" for t in STEPS)
    print(f"| method | LDS (all steps) | 95% CI | {header} | seconds |")
    print("|---|---:|---|" + "---:|" * len(STEPS) + "---:|")
    for row in results:
        low, high = row["ci"]
        steps = " | ".join(f"{row['per_step'][t]:.3f}" for t in STEPS)
        print(
            f"| {row['method']} | {row['lds_mean']:.3f} | {low:.3f} to {high:.3f} | {steps} | "
            f"{row['seconds']:.0f} |"
        )
    (args.out / "results.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
