"""The store's names: where every array and attribute lives, in one place (docs/store.md is checked against it).

    features.zarr/                 attrs[ATTR_KEY]: format version, provenance, config hash, `complete`
      <split>/                     attrs: num_samples, block_rows, fingerprint, `complete`, `arrays`
        features/<tap>             (N, *tap_shape) float16, chunked along N only
        labels, indices            (N,) int64
        logits                     (N, num_classes) float32
        progress                   (num_blocks,) uint8, one chunk per block: 1 once the block is fully written
        views/<v>/                 v = 1..views-1, augmented views; attrs as the split's
          features/<tap>, logits   the teacher on view v of each row, chunked as view 0's (the split's own)
          params                   (N, 5) int32: the view's crop box on its canvas and flip (attrs["columns"])
          progress                 the view's own block flags

Code outside `cache/` names arrays through these, never by building a path.
"""

from __future__ import annotations

FORMAT_VERSION = 1
STORE_NAME = "features.zarr"  # the store's name inside an extract output folder
ATTR_KEY = "kdpipe"  # the store root's attribute holding kdpipe's metadata
PICKED_BY = (
    "picked_by"  # the metadata entry recording the scores that chose a store's taps (`kdpipe extract --layers picked:`)
)
FEATURES = "features"
LABELS = "labels"
INDICES = "indices"  # each row's sample index in its dataset split
LOGITS = "logits"
PROGRESS = "progress"
VIEWS = "views"
PARAMS_ARRAY = "params"  # an augmented view's replay parameters (`pipeline.data.augment.PARAMS`)
# The chunks' codec unless `--compression` names another. Picked by benchmarks/p5_storage.py on real activations: 0.45
# of float32 bytes (zstd:1:shuffle 0.30) at 4x the encode and decode speed of zstd, which the teacher's cores and the
# streamed distillation loader both feel.
DEFAULT_COMPRESSION = "lz4:5:bitshuffle"


def feature_path(tap: str) -> str:
    """The path of a teacher tap's cached features inside a split (or a view)."""
    return f"{FEATURES}/{tap}"


def view_path(view: int, path: str) -> str:
    """An array's path inside its split: `path` for view 0, `views/<v>/path` for an augmented view."""
    return path if view == 0 else f"{VIEWS}/{view}/{path}"
