"""On-disk (or in-memory) storage of features, kernels, masks, outputs and scores."""

from datatrace.store.store import CheckpointFeatures, Store, StoreMismatchError

__all__ = ["CheckpointFeatures", "Store", "StoreMismatchError"]
