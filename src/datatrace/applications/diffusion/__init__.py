"""Attribution for diffusion models along the sampling trajectory (Journey TRAK, D-TRAK).

The few lines a user writes::

    from datatrace import TRAK
    from datatrace.tasks import Diffusion
    from datatrace.applications.diffusion import (
        DiffusionTrainingExamples, sample_with_trajectory, attribute_trajectory,
    )

    task = Diffusion(scheduler, output="loss")              # or "square_norm" (D-TRAK)
    train = DiffusionTrainingExamples(images, scheduler, n_timesteps=10, seed=0)
    trak = TRAK(unet, task, proj_dim=2048).fit(train, checkpoints)
    trajectory = sample_with_trajectory(unet, scheduler, n=16, seed=1, num_inference_steps=50)
    journey = attribute_trajectory(trak, trajectory, steps=[980, 500, 20], n_draws=10)
    journey.scores                   # (n_steps, n_generated, n_train)
    journey.at_step(500).proponents(0)

``diffusers`` is needed only for the bundled tiny models
(:mod:`datatrace.applications.diffusion.training`);
the task, data and sampling work with any scheduler exposing ``alphas_cumprod`` (and ``step``
returning ``pred_original_sample`` for sampling) and any denoiser ``model(x_t, t, **condition)``.
"""

from datatrace.applications.diffusion.data import (
    DiffusionTargets,
    DiffusionTrainingExamples,
    encode_images,
)
from datatrace.applications.diffusion.journey import (
    TrajectoryAttributions,
    attribute_trajectory,
    trajectory_outputs,
)
from datatrace.applications.diffusion.sampling import Trajectory, sample_with_trajectory

__all__ = [
    "DiffusionTargets",
    "DiffusionTrainingExamples",
    "Trajectory",
    "TrajectoryAttributions",
    "attribute_trajectory",
    "encode_images",
    "sample_with_trajectory",
    "trajectory_outputs",
]
