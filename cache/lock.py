"""One writer per output: the exclusive lock every writing kdpipe command holds on its output while it runs.

The lock is an flock(2) on a sidecar file, taken through `filelock` without waiting, so a second writer fails at
once and is told who holds the output. The operating system drops an flock when the process holding it ends,
however it ends, so the lock of a killed process (SIGKILL, the OOM killer, a lost session) is simply taken over by
the next writer: there is no stale lock to clean up. While held, the lock file holds its holder's PID, host, command
and start time as JSON; its holder removes it as it releases it (`OutputLock.__exit__` says why that is safe), so a
finished output holds no lock file; only a killed holder's stays, until the next writer takes it over.

A store's lock is beside it (`features.zarr.lock` next to `features.zarr`), never inside: the store stays a plain
Zarr group (zarr warns about foreign files in a group; `kdpipe verify` reads arrays only) that `--overwrite` can
delete whole while the lock is held. A run folder's lock is inside the folder (`pipeline.layout.FOLDER_LOCK`).

An output on object storage (`s3://...`) has no flock: its lock is an object at the same place, `ObjectLock`
(`cache.object_lock`), created with a conditional write and held by a lease its holder renews. `lock_output` picks
the one that fits the lock's location; both hold the same record and refuse a second writer with the same line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from filelock import FileLock, Timeout

from .holder import LockError, _held, describe_holder, record
from .location import is_remote, location

ATTEMPTS = 3  # tries at a lock whose file its holder may remove between our open and our flock


def store_lock(store: Path) -> Path:
    """A store's lock file: beside the store, named after it."""
    return store.with_name(store.name + ".lock")


def lock_output(output, lock_file, command: str):
    """The lock of `output` for `with`: an flock on a local lock file (`OutputLock`), a leased lock object on object
    storage (`cache.object_lock.ObjectLock`)."""
    lock_file = location(lock_file)
    if is_remote(lock_file):
        from .object_lock import ObjectLock

        return ObjectLock(location(output), lock_file, command)
    return OutputLock(output, lock_file, command)


class OutputLock:
    """`with OutputLock(output, lock_file, "extract"):` holds `output`'s lock for the block; LockError at once when
    another process holds it. A lock taken inside another (a report's runs) records the outer command."""

    def __init__(self, output: str | Path, lock_file: str | Path, command: str) -> None:
        self.output, self.lock_file = Path(output), Path(lock_file)
        self.command = _held[0] if _held else command
        self._lock = FileLock(self.lock_file, timeout=0, on_acquired=self._write_record)
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            taken = self._take()
        except OSError as err:  # a read-only folder, a file system without flock
            raise LockError(f"cannot write {self.lock_file} to lock {self.output}: {err.strerror or err}") from None
        if not taken:
            raise LockError(f"{self.output} is in use by {_holder(self.lock_file)}")
        _held.append(self.command)
        return self

    def _take(self) -> bool:
        """Whether the flock was taken at once (False: another process holds it). An attempt that met a file its
        holder removed as it released it (`_remove_file`) is made again, on the lock file now at the path."""
        for _ in range(ATTEMPTS):
            try:
                self._lock.acquire()
                return True
            except (Timeout, _Removed):
                if self.lock_file.exists():
                    return False
        return False

    def __exit__(self, *exc) -> None:
        _held.pop()
        try:
            os.ftruncate(self._fd, 0)  # the record goes with the hold
            self._remove_file()
        finally:
            self._lock.release()

    def _remove_file(self) -> None:
        """Unlinks the lock file while its flock is still held, so that no output keeps an empty lock file.

        Why this cannot let two writers hold one output: a writer that opened this file just before the unlink may
        win its flock once this one is released, but it then holds a lock on a file no other writer can open again;
        `_write_record` (run under the new flock) sees that the file is no longer the one at the lock's path and
        refuses it, and `_take` tries again on the path, where every later writer meets one new file. Unlinking
        before the release, not after, is what keeps this true: after it, another writer could already hold the
        flock on this very file, and the unlink would take its lock file from under it. Only our own file is
        removed (the path may name another inode by then), and a lock file that cannot be removed (a folder made
        read-only meanwhile) is left: an empty leftover is untidy, never wrong.
        """
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self._fd), os.stat(self.lock_file)):
                self.lock_file.unlink()

    def _write_record(self, fd: int) -> None:
        """Called by filelock with the locked file's descriptor, before `acquire` returns; a file its holder removed
        as this process opened it is refused (`_Removed` rolls the acquisition back, see `_remove_file`)."""
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
        except FileNotFoundError:
            current = False
        if not current:
            raise _Removed(self.lock_file)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record(self.command)).encode(), 0)


class _Removed(Exception):
    """The lock file this process flocked was removed by its previous holder before the flock was won."""


def _holder(lock_file: Path) -> str:
    """Who holds a lock, from its record: `PID N on HOST (kdpipe COMMAND) since TIME`."""
    try:
        return describe_holder(json.loads(lock_file.read_text()))
    except (OSError, ValueError, TypeError, KeyError):  # taken a moment ago, its record not written yet
        return f"another process (its lock {lock_file} holds no record yet)"
