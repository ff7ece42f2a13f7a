"""Where a pretrained name points: a local folder or a Hub repo id, told apart before any loading or download.

Only the standard library and huggingface_hub's validators are imported, so that scripts can check their
``--model`` / ``--pipeline`` flags in a fraction of a second, before torch and diffusers load.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def check_pretrained_source(
    name_or_path: str | os.PathLike, config_name: str = "model_index.json", what: str = "pipeline"
) -> None:
    """Refuse a local folder that is missing or holds no ``config_name``, before any loading or Hub look-up.

    A name that cannot be a Hub repo id (``./x``, ``/abs/x``, ``~/x``, ``a/b/c``) is a local path; so is ``org/name``
    when ``org`` is an existing local folder (``runs/pipline`` for ``runs/pipeline``). Such a path must be a folder
    with ``config_name`` in it. Any other name is left to the Hub.

    Args:
        name_or_path: a folder or a Hub repo id.
        config_name: the file that marks a saved folder: ``"model_index.json"`` for a pipeline, ``"config.json"``
            for a model.
        what: what the folder holds, for the message (``"pipeline"``, ``"model"``).

    Raises:
        FileNotFoundError: naming the path, with the close names in the nearest existing folder.
        NotADirectoryError: for a file.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / config_name).is_file():
            raise FileNotFoundError(
                f"{name} is a folder without {config_name}: not a saved {what} (save_pretrained writes it)."
            )
        return
    if path.exists():
        raise NotADirectoryError(f"{name} is a file; a saved {what} is a folder with {config_name} in it.")
    try:
        validate_repo_id(name)
        local = len(path.parts) > 1 and path.parent.is_dir()
    except HFValidationError:
        local = True
    if not local:
        return
    existing = next((parent for parent in path.parents if parent.is_dir()), Path("."))
    # The first component that is missing is the one mistyped (`runs/pipline` or `runs/mdoel/pipeline`).
    missing = path.relative_to(existing).parts[0] if path.is_relative_to(existing) else path.name
    close = difflib.get_close_matches(missing, [entry.name for entry in existing.iterdir()], n=3)
    hint = f"; similar names in {existing}/: {', '.join(close)}" if close else ""
    raise FileNotFoundError(f"No such {what} folder: {name} (a local path, not a Hub repo id){hint}.")


class JSONObjectConfigMixin:
    """For diffusers `ConfigMixin` classes: `load_config` refuses a config file that holds anything but a JSON object
    of settings (diffusers would take e.g. a JSON list for a Hub id and report a connection problem). List it before
    `ConfigMixin`'s subclasses in the bases."""

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike | dict, *args, **kwargs):
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if not isinstance(config, dict):
            path = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "") / cls.config_name
            raise ValueError(
                f"{path} must hold a JSON object of {cls.__name__} settings, not a JSON {type(config).__name__}."
            )
        return loaded
