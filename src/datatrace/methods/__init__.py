"""Attribution methods: each one turns a model, a task and data into
:class:`~datatrace.Attributions`.

- :mod:`~datatrace.methods.trak` — TRAK (projected after-kernel, ensembled over checkpoints), built
  on :mod:`~datatrace.methods.kernel` (the damped kernel and its solves), with
  :mod:`~datatrace.methods.incremental` (adding and removing training examples) and
  :mod:`~datatrace.methods.retrieval` / :mod:`~datatrace.methods.faiss_index` (top-k over
  score matrices larger than memory).
- :mod:`~datatrace.methods.baselines` — gradient dot product, gradient cosine, representation
  similarity.
- :mod:`~datatrace.methods.influence` — influence functions with EK-FAC, K-FAC, diagonal or
  identity curvature.
- :mod:`~datatrace.methods.metagradients` — exact metagradients through a deterministic training
  run (:mod:`~datatrace.methods.training`).
- :mod:`~datatrace.methods.datamodels` — sparse linear datamodels fitted to subset experiments
  (:mod:`~datatrace.methods.lasso`).

Layers: methods use tasks, grads, the store and the result object, never evaluation, subsets'
experiments or applications. Users reach everything through ``datatrace`` (``dt.TRAK``, ...).
"""
