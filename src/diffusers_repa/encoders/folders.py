"""Writing a model folder so that nobody ever reads a half-written one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
