"""How good an attribution is, and the settings chosen by it.

- :mod:`~datatrace.evaluation.lds` — the linear datamodeling score (classic and small-drop
  protocols) and predicted subset outputs.
- :mod:`~datatrace.evaluation.counterfactual` — counterfactual removal and brittleness.
- :mod:`~datatrace.evaluation.tuning` — choosing TRAK's damping by the LDS.

Users reach these through ``datatrace`` (``dt.lds``, ``dt.counterfactual_removal``, ...).
"""
