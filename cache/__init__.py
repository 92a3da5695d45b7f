"""The kdpipe feature store: teacher features, labels and logits in a Zarr v3 group, written by chunk."""

from .schema import FORMAT_VERSION
from .store import ArraySpec, FeatureStore, SplitStore, StoreError

__all__ = ["FORMAT_VERSION", "ArraySpec", "FeatureStore", "SplitStore", "StoreError"]
