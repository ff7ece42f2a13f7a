"""Entry-point helper: a user's mistake ends the script with one actionable line, a bug keeps its traceback.

    def main(argv: list[str]) -> None:
        args = parse_args(argv)  # cheap checks first; heavy imports (torch, datasets) after them
        ...

    if __name__ == "__main__":
        sys.exit(run_cli(main))

A user error (see `USER_ERRORS`: a bad value, a missing file, a busy output folder, an unreachable source, a broken
YAML config, or any [`UserError`]) prints ``<script>: error: <message>`` as the last line on stderr and exits with
status 2, as argparse does for a bad flag. A multi-line message prints its detail lines first and its first line,
the summary, last. ``--debug`` anywhere on the command line (removed before `main` sees it) or
``DIFFUSERS_REPA_DEBUG=1`` re-raises instead, with the full traceback. Any other exception is a bug and keeps its
traceback.

Only the standard library and PyYAML are imported here, so that ``--help`` and a bad flag stay fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

DEBUG_FLAG = "--debug"
DEBUG_ENV = "DIFFUSERS_REPA_DEBUG"
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix (its message says how); entry points show it without a traceback."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    yaml.YAMLError,
)


def _debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _summary_of_yaml_error(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's several lines (context, marks, a caret) as one: what is wrong, and where."""
    mark = error.problem_mark
    where = f" in {mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = f" ({error.context})" if error.context else ""
    return f"invalid YAML{where}: {error.problem}{context}"


def _format_user_error(error: BaseException, prog: str) -> str:
    """Detail lines first, then ``<prog>: error: <summary>``, so that the summary is the last line."""
    text = _summary_of_yaml_error(error) if isinstance(error, yaml.MarkedYAMLError) else str(error)
    lines = text.strip().splitlines() or [type(error).__name__]
    return "\n".join([*lines[1:], f"{prog}: error: {lines[0]}"])


def run_cli(
    main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, prog: str | None = None
) -> int:
    """Run `main(argv)` and turn a user error into one line on stderr; returns the exit status for `sys.exit`.

    Args:
        main: the script's body; gets the command-line arguments without ``--debug``; returns an exit status or
            None (0).
        argv: the arguments (default: ``sys.argv[1:]``).
        prog: the script name in the error line (default: that of ``sys.argv[0]``, as argparse shows it).

    Returns:
        `main`'s status, or 2 after a user error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        return main([arg for arg in argv if arg != DEBUG_FLAG]) or 0
    except USER_ERRORS as error:
        if debug:
            raise
        sys.stdout.flush()  # what the script printed before comes first
        print(_format_user_error(error, prog or Path(sys.argv[0]).name), file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
