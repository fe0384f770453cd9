"""On-disk (or in-memory) storage of features, kernels, masks, outputs and scores."""

from datatrace.store.store import CheckpointFeatures, Store, StoreMismatchError
from datatrace.store.verify import StoreCorruptionError, VerifyReport, verify_store

__all__ = [
    "CheckpointFeatures",
    "Store",
    "StoreCorruptionError",
    "StoreMismatchError",
    "VerifyReport",
    "verify_store",
]
