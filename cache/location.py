"""Where kdpipe's outputs live: a local path, or a URL of object storage (`s3://bucket/key`, `gs://...`).

`location(text)` is the one place a path string becomes a path object. A local path (and a `file://` URL) stays a
plain `pathlib.Path`, so nothing local changes; any other URL becomes a `upath.UPath` over its fsspec filesystem
(s3fs for `s3://`, gcsfs for `gs://`), which offers the pathlib methods kdpipe uses (`/`, `name`, `parent`,
`is_file`, `iterdir`, `read_bytes`, ...). The few operations that differ (writing a file whole, deleting a tree,
opening it with zarr, sizing it) are here, each with its local and its object-storage form.

Credentials and endpoints come only from the environment and fsspec's configuration, never from kdpipe's options:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_ENDPOINT_URL` (botocore reads them), or
`FSSPEC_S3_ENDPOINT_URL` / `~/.config/fsspec/s3.json` (fsspec applies them to every filesystem it makes). So no
secret ever reaches a store's attributes, a summary or an args file: kdpipe records the URL alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What kdpipe passes to every object-storage filesystem. No listing cache: zarr writes through a filesystem
# instance of its own, so a cached listing here would miss the splits and chunks it wrote.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}, "gs": {}, "gcs": {}}
LOCAL_SCHEMES = ("file", "local")  # URLs that name a local path
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# Modules whose exceptions are object storage's (the network, the service, its credentials), not a local fault.
REMOTE_MODULES = ("s3fs", "gcsfs", "adlfs", "botocore", "aiobotocore", "aiohttp", "fsspec", "upath")
REMOTE_MODULES += ("zarr.storage._fsspec",)


class LocationError(ValueError):
    """A URL kdpipe cannot use: an unknown scheme, or one whose filesystem package is not installed."""


def is_url(text: str | os.PathLike) -> bool:
    return isinstance(text, str) and bool(URL.match(text))


def location(text: str | os.PathLike):
    """A local `Path` for a path or `file://` URL; a `UPath` for any other URL (its filesystem must be installed)."""
    if isinstance(text, Path) or not isinstance(text, str):
        return text if isinstance(text, Path) or is_remote(text) else Path(text)
    if not is_url(text):
        return Path(text)
    scheme = _scheme(text)
    if scheme in LOCAL_SCHEMES:
        return Path(unquote(urlparse(text).path))
    import fsspec
    from upath import UPath

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        package = PACKAGES.get(scheme, f"the fsspec filesystem for {scheme}://")
        raise LocationError(f"{text}: {scheme}:// needs {package} (pip install {package})") from None
    except ValueError:
        raise LocationError(f"{text}: unknown URL scheme {scheme}://") from None
    return UPath(text.rstrip("/"), **STORAGE_OPTIONS.get(scheme, {}))


def local_folder(text: str | os.PathLike, command: str) -> Path:
    """`text` as a local path, for a command that writes only to a file system (`kdpipe summary`, ...): a URL of
    object storage is refused in one line, never taken for a local folder named after its scheme (`s3:`)."""
    if is_object_storage(text):
        raise LocationError(f"{text}: kdpipe {command} {LOCAL_ONLY}")
    return location(text)


LOCAL_ONLY = "writes to a local folder only, not to object storage"


def is_object_storage(text: str | os.PathLike) -> bool:
    """Whether `text` is a URL of object storage (not a path, not a `file://` URL)."""
    return is_url(text) and _scheme(str(text)) not in LOCAL_SCHEMES


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def is_remote(path: Any) -> bool:
    """Whether `path` is on object storage (a UPath that is not a local path)."""
    return not isinstance(path, (str, Path)) and hasattr(path, "fs") and hasattr(path, "protocol")


def absolute(path) -> str:
    """The location as recorded in a summary or the store: an absolute local path, or the URL."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def zarr_store(path, read_only: bool):
    """What `zarr.open_group` opens: the local path as a string (zarr's LocalStore), or an FsspecStore."""
    if not is_remote(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=dict(path.storage_options), read_only=read_only)


def put_bytes(path, data: bytes) -> None:
    """One object written whole: a single PUT (a multipart upload for a large one), which object storage makes visible
    all at once or not at all, so no temporary object and no rename are needed."""
    path.fs.pipe_file(path.path, data)


def walk_files(path) -> Iterator[str]:
    """The files under a folder or prefix, as paths relative to it with `/` separators."""
    if is_remote(path):
        root = path.path.rstrip("/") + "/"
        for key in path.fs.find(path.path):
            if key.startswith(root):
                yield key[len(root) :]
        return
    for folder, _, files in os.walk(path):
        rel = Path(folder).relative_to(path)
        for name in files:
            yield (rel / name).as_posix()


def remove_tree(path) -> None:
    """Deletes a folder, or every object under a prefix."""
    if is_remote(path):
        if path.fs.find(path.path):
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    shutil.rmtree(path)


def tree_bytes(path) -> int:
    """Bytes of the files under a folder or prefix (0 when there is none)."""
    if is_remote(path):
        return sum(int(info.get("size") or 0) for info in path.fs.find(path.path, detail=True).values())
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def remote_cause(err: BaseException) -> bool:
    """Whether an exception came from object storage: raised, or caused, inside its client libraries."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__module__.startswith(REMOTE_MODULES):
            return True
        tb = err.__traceback__
        while tb is not None:
            if str(tb.tb_frame.f_globals.get("__name__", "")).startswith(REMOTE_MODULES):
                return True
            tb = tb.tb_next
        err = err.__cause__ if err.__cause__ is not None or err.__suppress_context__ else err.__context__
    return False


def remote_message(err: BaseException) -> str:
    """A one-line reason for an object-storage failure (the client's own words, or its exception's name)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    name = type(err).__name__
    if isinstance(err, FileNotFoundError) and (not text or text.count("/") and " " not in text):
        return f"not found ({text})" if text else "not found"
    return text if text and name in text or isinstance(err, OSError) else f"{name}: {text}" if text else name
