"""Who holds an output's lock: the record both kinds of lock keep (an flock's file, `cache.lock`; a lock object on
object storage, `cache.object_lock`), the error they raise, and the locks this process holds. Its own module so that
neither lock module imports the other for them."""

from __future__ import annotations

import os
import socket
import time

_held: list[str] = []  # the commands of the locks this process holds, outermost first


class LockError(Exception):
    """An output another process is writing, or one that cannot be locked at all."""


def record(command: str) -> dict:
    """Who holds a lock: this process, running `command`, since now."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe_holder(record: dict) -> str:
    """`PID N on HOST (kdpipe COMMAND) since TIME`; KeyError or TypeError for a record that is not one."""
    return f"PID {record['pid']} on {record['host']} (kdpipe {record['command']}) since {record['since']}"
