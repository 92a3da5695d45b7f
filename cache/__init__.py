"""The kdpipe feature store: teacher features, labels and logits in a Zarr v3 group, written by chunk.

The store's names (`cache.schema`) import nothing heavy; the store itself (Zarr) loads on first use (PEP 562), so
reading a name or a default does not import Zarr.
"""

import importlib
from typing import Any

from .errors import StoreError
from .schema import FORMAT_VERSION

_STORE = ("ArraySpec", "FeatureStore", "SplitStore")
__all__ = ["FORMAT_VERSION", "StoreError", *_STORE]


def __getattr__(name: str) -> Any:
    if name not in _STORE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".store", __name__), name)
