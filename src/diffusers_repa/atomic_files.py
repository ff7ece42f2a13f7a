"""Writing files and folders so that nobody ever reads a half-written one: everything is written beside its target
under a temporary name, then renamed into place (a crash leaves the previous version, and the temporary is removed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)`` on a temporary path in the target's folder, then move it onto ``path``.

    Readers never see a partial file, and a crash leaves the previous version in place (the temporary is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """[`write_file_atomically`] of a UTF-8 text."""
    return write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


@contextmanager
def write_folder_atomically(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path` to write into; when the block ends without error, it is renamed to
    `path`, and on an error it is deleted.

    Args:
        path: the folder to create. It may be absent or an empty folder.
        replace: an existing non-empty `path` is moved aside, the new folder renamed into place, then the old one
            deleted (readers of `path` see the old or the new folder, or for an instant none).

    Raises:
        FileExistsError: `path` is a non-empty folder and `replace` is False, including when another writer
            renamed its folder into place while this one was being written; the written folder is then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield staging
        if replace and path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-")) / path.name
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired.parent, ignore_errors=True)
            return
        try:
            os.replace(staging, path)  # a rename onto an empty folder replaces it, onto a non-empty one fails
        except OSError as error:
            if path.is_dir() and any(path.iterdir()):
                raise FileExistsError(f"{path} exists and is not empty.") from error
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
