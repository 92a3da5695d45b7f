"""kdpipe's version, declared once: the package metadata (pyproject.toml), `kdpipe --version` and every summary and
store that records which kdpipe wrote it read it from here, so no module imports the package root for it."""

__version__ = "0.1.0"
