"""The writers' lock of an output on object storage: a lock object, taken by a conditional write, held by a lease.

Object storage has no flock, and nothing releases a lock when its holder dies; so the lock is an object
(`features.zarr.lock` beside a store, `kdpipe.lock` in a run folder, as on a local disk) whose content is its
holder's record (PID, host, command, start time, as `cache.lock` writes) plus the lease:

- **Taking it** is a PUT with `If-None-Match: *`: object storage creates the object only when none exists, for one of
  any number of writers racing, and answers the others 412 Precondition Failed.
- **Holding it** is renewing the lease: a thread of the holder rewrites the object every quarter lease
  (`If-Match` its last ETag, so a holder whose lock was taken over finds out, logs it and stops its process).
- **A stale lock** (a holder killed: SIGKILL, a lost machine) is one whose object has not been rewritten for a whole
  lease, measured on the storage's own clock (the response's `Date` against the object's `Last-Modified`, so the
  writers' clocks do not matter; both are whole seconds, so a lock is stale from a lease and one second on). The
  next writer takes it over with a PUT `If-Match` the stale object's ETag: of several writers finding it stale at
  once, exactly one succeeds. A live lock is refused at once, naming the holder.
- **Releasing it** deletes the object (`If-Match` its ETag: never another holder's).

The lease is `KDPIPE_LOCK_LEASE` seconds (default 60): a killed writer's output can be written again that long after
it died; a holder that cannot reach the storage for a whole lease loses its lock. The conditional PUTs are S3's
(AWS S3 since 2024, MinIO, Ceph, moto; s3fs sends them). On a storage without them (any other fsspec filesystem)
the lock is taken the same way (fsspec's `mode="create"`), and a stale one is reported with its age for a person to
delete rather than taken over, since a takeover there could not exclude a second taker.
"""

from __future__ import annotations

import _thread
import calendar
import contextlib
import email.utils
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from .holder import LockError, _held, describe_holder, record
from .location import remote_message

log = logging.getLogger(__name__)

DEFAULT_LEASE = 60.0  # seconds; KDPIPE_LOCK_LEASE overrides it


def lease_seconds() -> float:
    value = os.environ.get("KDPIPE_LOCK_LEASE", "")
    try:
        lease = float(value) if value else DEFAULT_LEASE
    except ValueError:
        raise LockError(f"KDPIPE_LOCK_LEASE={value!r}: expected a number of seconds") from None
    if lease <= 0:
        raise LockError(f"KDPIPE_LOCK_LEASE={value!r}: expected a positive number of seconds")
    return lease


class Changed(Exception):
    """A conditional write or delete refused: the object is not (or no longer) the one expected."""


class ObjectLock:
    """`with ObjectLock(output, lock_object, "extract"):` as `cache.lock.OutputLock`, for outputs on object storage."""

    def __init__(self, output, lock_object, command: str) -> None:
        self.output, self.lock_object = output, lock_object
        self.command = _held[0] if _held else command
        self.lease = lease_seconds()
        self._storage = _S3(lock_object) if _is_s3(lock_object.fs) else _Generic(lock_object)
        self._record = {**record(self.command), "lease_seconds": self.lease, "token": uuid.uuid4().hex}
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> ObjectLock:
        try:
            self._take()
        except LockError:
            raise
        except Exception as err:  # no bucket, no credentials, no connection: the client's exceptions vary
            raise LockError(f"cannot write {self.lock_object} to lock {self.output}: {remote_message(err)}") from None
        _held.append(self.command)
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="kdpipe-lock-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        _held.pop()
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self._storage.delete(self._etag)
        except Changed:  # taken over meanwhile: not ours to delete
            pass
        except Exception as err:  # the storage unreachable: the lock expires after its lease
            log.warning(
                "%s: could not delete the lock %s (%s); it expires after its lease",
                *(self.output, self.lock_object, remote_message(err)),
            )

    def _payload(self) -> bytes:
        renewed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return json.dumps({**self._record, "renewed": renewed}).encode()

    def _take(self) -> None:
        for _ in range(3):  # the lock may be released between our attempt to create it and our read of it
            try:
                self._etag = self._storage.create(self._payload())
                return
            except FileExistsError:
                pass
            found = self._storage.read()
            if found is None:
                continue
            holder, etag, age = found
            who = _describe(holder, self.lock_object)
            lease = _lease_of(holder, self.lease)
            if age < lease + self._storage.resolution:
                raise LockError(
                    f"{self.output} is in use by {who} (its lease of {lease:g} s renewed {max(age, 0):.0f} s ago)"
                )
            if etag is None:
                raise LockError(
                    f"{self.output} is locked by {who}, whose lease of {lease:g} s expired {age - lease:.0f} s ago; "
                    f"this storage cannot take a lock over safely: delete {self.lock_object} once no writer runs"
                )
            try:
                self._etag = self._storage.replace(self._payload(), etag)
            except Changed:  # renewed, or taken over by another writer, since we read it
                continue
            log.warning(
                "%s: took over the lock of %s, whose lease of %g s expired %.0f s ago",
                *(self.output, who, lease, age - lease),
            )
            return
        raise LockError(f"{self.output} is in use: its lock {self.lock_object} changed as it was read")

    def _renew_until_stopped(self) -> None:
        """Rewrites the lock every quarter lease; a lock found taken over (or deleted) stops the process."""
        while not self._stop.wait(self.lease / 4):
            try:
                self._etag = self._storage.replace(self._payload(), self._etag)
            except Changed:
                log.error(
                    "%s: the lock %s was taken over after this process did not renew it for %g s; stopping",
                    *(self.output, self.lock_object, self.lease),
                )
                _thread.interrupt_main()
                return
            except Exception as err:  # the storage unreachable for now: the next renewal tries again
                log.warning("%s: could not renew the lock %s: %s", self.output, self.lock_object, remote_message(err))


def _describe(holder: dict | None, lock_object) -> str:
    try:
        return describe_holder(holder)
    except (KeyError, TypeError):
        return f"another process (its lock {lock_object} holds no record)"


def _lease_of(holder: Any, default: float) -> float:
    """The lease the holder took (its own KDPIPE_LOCK_LEASE), else ours."""
    lease = holder.get("lease_seconds") if isinstance(holder, dict) else None
    return float(lease) if isinstance(lease, (int, float)) and lease > 0 else default


def _is_s3(fs) -> bool:
    return type(fs).__module__.startswith("s3fs")


def _parse(data: bytes) -> dict | None:
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


class _S3:
    """Conditional PUT and DELETE (`If-None-Match: *`, `If-Match: ETag`) through s3fs; ages on the storage's clock."""

    resolution = 1.0  # seconds: `Date` and `Last-Modified` are whole seconds, so an age read is within 1 s

    def __init__(self, lock_object) -> None:
        self.fs = lock_object.fs
        self.bucket, _, self.key = lock_object.path.partition("/")

    def create(self, data: bytes) -> str:
        """The new object's ETag; FileExistsError when one exists."""
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, etag: str) -> str:
        """Rewrites the object only while its ETag is `etag`; Changed otherwise."""
        return self._put(data, IfMatch=etag)

    def _put(self, data: bytes, **condition: str) -> str:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            if "IfMatch" in condition:
                raise Changed from None
            raise
        except FileExistsError:
            raise
        except OSError as err:
            if _precondition_failed(err):
                if "IfNoneMatch" in condition:
                    raise FileExistsError(self.key) from None
                raise Changed from None
            raise
        return response["ETag"]

    def read(self) -> tuple[dict | None, str, float] | None:
        """(record, ETag, seconds since it was written, on the storage's clock), or None when there is no lock."""
        from fsspec.asyn import sync

        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return response, await response["Body"].read()

        try:
            response, body = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        now = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return _parse(body), response["ETag"], (now - response["LastModified"]).total_seconds()

    def delete(self, etag: str | None) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except FileNotFoundError:
            pass
        except OSError as err:
            if _precondition_failed(err):
                raise Changed from None
            raise


def _precondition_failed(err: OSError) -> bool:
    cause = err.__cause__
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed" or "pre-condition" in str(err)


class _Generic:
    """Any other fsspec filesystem: exclusive create (`mode="create"`), plain rewrites; ages on the holder's clock."""

    resolution = 1.0  # the record's time is in whole seconds

    def __init__(self, lock_object) -> None:
        self.fs, self.path = lock_object.fs, lock_object.path

    def create(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data, mode="create")

    def replace(self, data: bytes, etag: None) -> None:
        if not self.fs.exists(self.path):
            raise Changed
        self.fs.pipe_file(self.path, data)

    def read(self) -> tuple[dict | None, None, float] | None:
        try:
            holder = _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        renewed = holder.get("renewed") if holder else None
        try:
            written = calendar.timegm(time.strptime(renewed, "%Y-%m-%dT%H:%M:%SZ"))
        except (TypeError, ValueError):
            written = time.time()
        return holder, None, time.time() - written

    def delete(self, etag: None) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)
