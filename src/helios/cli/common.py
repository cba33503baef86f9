"""What the `helios` subcommands share: exit codes, the failure class, quieting other libraries, path checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class GenerationFailed(RuntimeError):
    """A failure after generation started (not bad input): exit code 1."""


def quiet_libraries(debug: bool) -> None:
    """Keep transformers' progress bars and advice out of the command's output (--debug keeps them)."""
    if debug:
        return
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    for name in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_writable(path: Path, what: str) -> None:
    """Fail now, not after an hour of generation, if `path` cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the folder {parent} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.")
    except OSError as err:
        raise PermissionError(f"{what} {path} cannot be written: cannot create a file in {parent} "
                              f"({err.strerror or err})") from err
    os.close(fd)
    os.unlink(probe)
