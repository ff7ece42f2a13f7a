"""One training run per output folder: a lock file that a second run on the same `--output_dir` refuses to share.

Two runs writing checkpoints, samples and the export into one folder would mix their files and resume from each
other's checkpoints. The main process of a run takes `output_dir/.run.lock` before it writes anything; the file is
created atomically (`O_CREAT | O_EXCL`) and names its owner (pid, host, start time, command), so that the refusal
can say which run holds the folder.

A lock left by a run that was killed (no clean exit removed it) is taken over when it can be proven stale: it names
this host and its pid is no longer alive. A lock from another host is never taken over, because whether that process
lives cannot be checked from here. An unreadable lock file (empty, truncated, not JSON) is refused too: it may be a
run that is just writing it, and guessing wrong would let two runs share the folder.

Light (no torch, no Hub libraries): a script can take the lock before its heavy imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

from ..cli import UserError

logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".run.lock"


class OutputDirInUseError(UserError, RuntimeError):
    """Another training run holds the lock on this `--output_dir` (or its lock file cannot be read)."""


def _pid_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    except OSError:  # e.g. an invalid pid: nothing runs under it
        return False
    return True


def _remove_if_owned(path: Path, content: str, created_dir: Path | None) -> None:
    """Delete the lock file if it still holds `content` (never another run's lock), then the folder this lock
    created if nothing else was written into it, so that a run that fails before its first write leaves no trace."""
    try:
        if path.read_text() == content:
            path.unlink()
    except OSError:
        return
    if created_dir is not None:
        with contextlib.suppress(OSError):  # not empty: the run wrote something worth keeping
            created_dir.rmdir()


class RunLock:
    """The lock of one run on its output folder; returned by [`acquire_run_lock`].

    Use it as a context manager or call `release()` (idempotent). If neither happens, the lock is released when the
    object is garbage-collected or the interpreter exits; a killed process leaves the file, which the next run on
    the same host recognises as stale.

    Attributes:
        path: the lock file.
        owner: what the file says about this run (`pid`, `hostname`, `started`, `command`).
    """

    def __init__(self, path: Path, owner: dict[str, Any], content: str, created_dir: Path | None):
        self.path = path
        self.owner = owner
        self._finalizer = weakref.finalize(self, _remove_if_owned, path, content, created_dir)

    @property
    def held(self) -> bool:
        """True until `release()` (or garbage collection) ran."""
        return self._finalizer.alive

    def release(self) -> None:
        """Delete the lock file (if it is still this run's); calling it again does nothing."""
        self._finalizer()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def _describe_owner(owner: dict[str, Any]) -> str:
    return f"pid {owner.get('pid')} on host {owner.get('hostname')!r}, started {owner.get('started')}"


def _read_owner(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The owner recorded in an existing lock file (None if it cannot be parsed) and the file's raw text."""
    text = path.read_text()
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return None, text
    valid = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("hostname"), str)
    return (owner if valid else None), text


def _refuse_unless_stale(path: Path, hostname: str) -> str | None:
    """Raise `OutputDirInUseError` unless the existing lock file is stale; returns its text if it is (to remove),
    None if it vanished meanwhile (released: try again)."""
    output_dir = path.parent
    try:
        other, text = _read_owner(path)
    except FileNotFoundError:
        return None
    if other is None:
        raise OutputDirInUseError(
            f"{output_dir} is locked by {path}, which cannot be read (a run may be starting right now, or a crash "
            f"left it damaged); if no other run uses this folder, delete {path}."
        )
    fix = f"wait for it to finish, pass another --output_dir, or delete {path} if that run is dead"
    if other["hostname"] != hostname:
        raise OutputDirInUseError(
            f"{output_dir} is in use by another training run ({_describe_owner(other)}), which runs on another "
            f"host, so whether it is still alive cannot be checked from here: {fix}."
        )
    if other["pid"] == os.getpid():
        raise OutputDirInUseError(
            f"{output_dir} is already locked by this process ({_describe_owner(other)}): release the earlier run's "
            "lock (e.g. let its trainer finish) before starting another on the same folder."
        )
    if _pid_is_alive(other["pid"]):
        raise OutputDirInUseError(f"{output_dir} is in use by another training run ({_describe_owner(other)}): {fix}.")
    logger.warning(
        f"Taking over the lock on {output_dir} left by a run that is no longer alive ({_describe_owner(other)})."
    )
    return text


def acquire_run_lock(output_dir: str | os.PathLike, command: list[str] | None = None) -> RunLock:
    """Take the lock on `output_dir` for this process, or refuse because another run holds it.

    Creates `output_dir` if needed (and removes it again on release if the run wrote nothing into it). Call it on
    the main process only, before the run writes anything into `output_dir`.

    Args:
        output_dir: the run's `--output_dir`.
        command: the command line recorded in the lock for the refusal message of a second run (default:
            `sys.argv`).

    Returns:
        The held [`RunLock`].

    Raises:
        OutputDirInUseError: a live run (or one on another host, or an unreadable lock file) holds the folder. The
            one-line message names the folder, the other run and the ways out.
        NotADirectoryError: `output_dir` exists and is a file.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file; pass a folder (new or of this run).")
    created_dir = None if output_dir.exists() else output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE_NAME
    hostname = socket.gethostname()
    owner = {
        "pid": os.getpid(),
        "hostname": hostname,
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": list(sys.argv if command is None else command),
    }
    content = json.dumps(owner, indent=2) + "\n"
    # Two attempts: the second follows the removal of a stale lock (a concurrent run may have won the race).
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale_text = _refuse_unless_stale(path, hostname)
            if stale_text is not None:
                _remove_if_owned(path, stale_text, created_dir=None)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        return RunLock(path, owner, content, created_dir)
    raise OutputDirInUseError(
        f"{output_dir}: another run took the lock while a stale one was removed; wait for it to finish or pass "
        "another --output_dir."
    )
