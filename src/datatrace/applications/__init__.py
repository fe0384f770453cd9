"""What attributions are used for.

- :mod:`~datatrace.applications.modeldiff` — compare two learning algorithms through the training
  data they rely on.
- :mod:`~datatrace.applications.unlearning` — machine unlearning by datamodel matching, with the
  KLoM metric.
- :mod:`~datatrace.applications.diffusion` — attribution of each step of a diffusion model's
  sampling trajectory (Journey TRAK).

Applications use the public names of the layers below them. Users reach them through
``datatrace`` (``dt.ModelDiff``, ``dt.datamodel_matching``, ...) or
``datatrace.applications.diffusion``.
"""
