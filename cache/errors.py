"""The store's errors, importable without Zarr: the command line catches them before any store is opened."""

from __future__ import annotations


class StoreError(Exception):
    """A store that is missing, foreign, newer, incomplete or inconsistent with what the caller expects."""


class DamagedStoreError(StoreError):
    """A store whose root metadata is missing or unreadable: `kdpipe extract --overwrite` rebuilds it."""
