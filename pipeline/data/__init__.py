"""Data in: dataset loaders and their file formats, fingerprints, and the replayable augmentation policies."""
